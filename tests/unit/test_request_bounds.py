"""Requests past the token budget are refused before the worker holds
every token of them: regression tests from a hostile review."""

from __future__ import annotations

import pytest

from shm_protocol import long_inputs
from shm_protocol.errors import InvalidInput, RequestTooLarge
from shm_protocol.model_files import bundled_model_path, tokenizer_file
from shm_protocol.tokenizer import WorkerTokenizer

LIMIT = 16


@pytest.fixture(scope="module")
def tok() -> WorkerTokenizer:
    return WorkerTokenizer(str(tokenizer_file(bundled_model_path())), LIMIT)


def test_chunking_counts_the_budget_a_batch_at_a_time(tok):
    """Three texts of about a MiB each, chunked: the first alone is over the
    budget, so the 413 comes before the others are cut into windows (their
    ids, some 3 x 500,000 Python lists of ints, are never held)."""
    text = "ab " * 350_000  # 1,050,000 characters, 350,000 tokens: a batch of its own
    with pytest.raises(RequestTooLarge, match="at least") as refused:
        tok.tokenize_request([text, text, text], prompt=None, truncate=False, max_tokens=300_000,
                             policy=long_inputs.CHUNK)
    assert refused.value.actual < 2 * 350_000  # the later texts were never counted


def test_chunking_within_the_budget_is_counted_exactly(tok):
    got = tok.tokenize_request(["ab " * 40, "cd"], prompt=None, truncate=False, max_tokens=1000,
                               policy=long_inputs.CHUNK)
    total = int(got.lengths.sum())
    assert int(got.token_counts.sum()) == total and len(got.ids) > 2  # windows
    with pytest.raises(RequestTooLarge, match=f"the inputs have {total} tokens"):
        tok.tokenize_request(["ab " * 40, "cd"], prompt=None, truncate=False, max_tokens=total - 1,
                             policy=long_inputs.CHUNK)


def test_truncated_texts_are_tokenized_a_batch_at_a_time_and_refusals_name_the_text(tok):
    """Texts the compiled tokenizer does not take (not ASCII) go to the
    library about a MiB at a time; a refusal still names its text's index."""
    wide = "\u00e9" * (1 << 20)  # one word: [UNK], quickly
    got = tok.tokenize_request([wide, "caf\u00e9 ok", "caf\u00e9 " * 40], prompt=None, truncate=True, max_tokens=None)
    assert got.lengths.tolist() == [3, 4, LIMIT]
    assert got.ids[1] == tok.encode(["caf\u00e9 ok"])[0].ids
    with pytest.raises(RequestTooLarge, match="input 2 has about"):
        tok.tokenize_request([wide, "caf\u00e9 ok", "caf\u00e9 " * 40], prompt=None, truncate=False, max_tokens=None)
    with pytest.raises(InvalidInput, match=r"texts\[2\] is not valid Unicode"):
        tok.tokenize_request([wide, "caf\u00e9 ok", "\ud800"], prompt=None, truncate=True, max_tokens=None)
