"""The worker's pair tokenizer (reranking) against the model's own tokenizer:
the same ids as a (query, document) pair tokenized with truncation, and a
cost bounded by the text, however long both sides are."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from shm_protocol.errors import RequestTooLarge
from shm_protocol.model_files import bundled_model_path, tokenizer_file
from shm_protocol.tokenizer import WorkerTokenizer
from tests.helpers import REPO

CE_LIMIT = 512  # what the test cross-encoder (the bundled weights) reads


@pytest.fixture(scope="module")
def tok_path() -> str:
    return str(tokenizer_file(bundled_model_path()))


def _words(n: int, seed: int) -> str:
    rnd = random.Random(seed)
    vocab = ["worker", "semaphore", "ring", "wakes", "slot", "the", "a", "ünïcödé", "東京", "ไทย", "x9z",
             "posts", "shared-memory", "queue,", "done."]
    return " ".join(rnd.choice(vocab) for _ in range(n))


def test_pairs_are_the_ids_the_models_tokenizer_gives_with_truncation(tok_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bundled_model_path()), model_max_length=CE_LIMIT)
    wt = WorkerTokenizer(tok_path, CE_LIMIT)
    # Short and long on either side, odd and even totals, empty sides: every branch of longest-first.
    sizes = [0, 1, 3, 200, 254, 255, 256, 300, 508, 509, 510, 700, 3000]
    queries = [_words(n, n) for n in sizes]
    docs = [_words(n, 1000 + n) for n in sizes]
    for q in queries:
        got = wt.tokenize_pairs(q, docs, truncate=True, max_tokens=None)
        want = hf([q] * len(docs), docs, truncation=True, max_length=CE_LIMIT)
        assert got.ids == want["input_ids"]
        assert got.lengths.tolist() == [len(x) for x in want["input_ids"]]
        assert got.segments.tolist() == [t.index(1) if 1 in t else 0 for t in want["token_type_ids"]]


def test_pairs_over_the_limit_or_the_budget_are_refused_with_true_counts(tok_path):
    wt = WorkerTokenizer(tok_path, CE_LIMIT)
    q, d = _words(100, 1), _words(2000, 2)
    with pytest.raises(RequestTooLarge, match="document 1") as err:
        wt.tokenize_pairs(q, ["short", d], truncate=False, max_tokens=None)
    assert err.value.actual > 2000
    with pytest.raises(RequestTooLarge, match="the query alone"):
        wt.tokenize_pairs(d, ["short"], truncate=False, max_tokens=None)
    assert wt.tokenize_pairs(q, ["short", d], truncate=True, max_tokens=None).lengths.max() == CE_LIMIT
    with pytest.raises(RequestTooLarge, match="at least") as err:
        wt.tokenize_pairs(d, ["x"] * 100, truncate=True, max_tokens=50_000)  # a long query: 512 per pair
    assert err.value.actual >= 100 * CE_LIMIT


_COST = """
import json, resource, sys, time
from shm_protocol.tokenizer import WorkerTokenizer
from shm_protocol.errors import RequestTooLarge

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

path, text = sys.argv[1], sys.stdin.read()
tok = WorkerTokenizer(path, 512)
query, docs = text[:99_000], [text[i * 1000:i * 1000 + 99_000] for i in range(4)]
tok.tokenize_pairs("warm up", ["the tokenizer"], truncate=True, max_tokens=None)
before, cpu = hwm_kib(), time.process_time()
res = tok.tokenize_pairs(query, docs, truncate=True, max_tokens=None)
assert res.lengths.tolist() == [512] * 4
mid = time.process_time()
refused = False
try:  # 1,800 documents under a long query: over a 300,000-token budget before they are tokenized
    tok.tokenize_pairs(query, [text[:8700]] * 1800, truncate=True, max_tokens=300_000)
except RequestTooLarge:
    refused = True
print(json.dumps({"rss_mib": (hwm_kib() - before) / 1024, "pairs_cpu_s": mid - cpu,
                  "refuse_cpu_s": time.process_time() - mid, "refused": refused}))
"""


def test_long_query_and_long_documents_cost_memory_and_time_bounded_by_their_size(tok_path):
    """A 99,000-character query with four documents as long once took
    gigabytes and many seconds: every pair of both sides' overflow windows
    was kept. A 413 for the token budget comes before the documents are read."""
    text = _words(40_000, 7)
    assert len(text) > 110_000
    out = subprocess.run([sys.executable, "-c", _COST, tok_path], input=text, cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    cost = json.loads(out.stdout)
    assert cost["refused"]
    assert cost["rss_mib"] < 300, cost
    assert cost["pairs_cpu_s"] < 5, cost
    assert cost["refuse_cpu_s"] < 1, cost
