"""Sequence classification on the worker's side: checking what is to be
classified (texts, or (text, text) pairs), tokenizing it for the sidecar,
and turning the logits the sidecar writes into each label's score as
transformers' ``pipeline("text-classification", top_k=None)`` gives them.
The sidecar only runs the model (layout: a classifier's ``out`` row holds
its raw logits, one per label); the labels come from the model folder's
config.json (:func:`shm_protocol.model_files.classifier_config`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInput
from .layout import Activation
from .tokenizer import Tokenized, WorkerTokenizer, check_token_budget

#: One input: a text, or a (text, text_pair) pair.
ClassifyInput = str | tuple[str, str]


@dataclass
class ClassifyResult:
    """Label scores of one classify request with what it cost."""

    scores: np.ndarray  # float32 (n_inputs, n_labels): each label's score, in the labels' order
    labels: tuple[str, ...]  # the model's labels (id2label), in the order of ``scores``' columns
    token_counts: np.ndarray  # int (n_inputs,): tokens of each input after truncation
    model: str
    queue_ns: int
    compute_ns: int
    tokenize_ns: int = 0

    @property
    def total_tokens(self) -> int:
        return int(self.token_counts.sum())

    def ranked(self, top_k: int | None = None) -> list[list[dict]]:
        """Per input, ``{"label", "score"}`` best first (ties in the labels'
        order), cut to ``top_k`` (None: every label): the pipeline's answer."""
        out = []
        for row in self.scores:
            order = np.argsort(-row, kind="stable")[:top_k]
            out.append([{"label": self.labels[i], "score": float(row[i])} for i in order])
        return out


def check_inputs(inputs) -> list[ClassifyInput]:
    """``inputs`` as a list of texts and (text, text_pair) tuples, or
    InvalidInput naming the first one that is neither."""
    if isinstance(inputs, str):
        raise InvalidInput("inputs must be a list of texts or (text, text_pair) pairs, not one string "
                           "(wrap it in a list)")
    if isinstance(inputs, Mapping):  # its keys would be classified: {"text": ..., "text_pair": ...} as two words
        raise InvalidInput("inputs must be a list of texts or (text, text_pair) pairs, not a dict "
                           "(a pair is a tuple (text, text_pair) in the list)")
    if not isinstance(inputs, Iterable):
        raise InvalidInput(f"inputs must be a list of texts or (text, text_pair) pairs, not {type(inputs).__name__}")
    out: list[ClassifyInput] = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item):
            out.append((item[0], item[1]))
        else:
            raise InvalidInput(f"inputs[{i}] must be a string or a pair of strings, not {_describe(item)}")
    return out


def _describe(item) -> str:
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return "a pair holding a non-string"
        return f"a {type(item).__name__} of {len(item)} item{'' if len(item) == 1 else 's'}"
    return type(item).__name__


def tokenize_inputs(tok: WorkerTokenizer, inputs: Sequence[ClassifyInput], *, truncate: bool,
                    max_tokens: int | None) -> Tokenized:
    """Texts tokenized as the pipeline's tokenizer call does (special tokens
    around each) and pairs as a cross-encoder's (``[CLS] text [SEP] pair
    [SEP]`` with segment ids 1 on the second part), in input order; a text
    over the model's limit is cut (``truncate``) or RequestTooLarge, and
    so are more than ``max_tokens`` tokens in all."""
    t0 = time.perf_counter_ns()
    n = len(inputs)
    ids: list = [None] * n
    lengths = np.zeros(n, np.int64)
    segments = np.zeros(n, np.int64)
    singles = [i for i, item in enumerate(inputs) if isinstance(item, str)]
    if singles:
        one = tok.tokenize_request([inputs[i] for i in singles], prompt=None, truncate=truncate,
                                   max_tokens=max_tokens)
        for i, row, length in zip(singles, one.ids, one.lengths):
            ids[i], lengths[i] = row, length
    for i, item in enumerate(inputs):
        if not isinstance(item, str):
            pair = tok.tokenize_pairs(item[0], [item[1]], truncate=truncate, max_tokens=max_tokens)
            ids[i], lengths[i], segments[i] = pair.ids[0], pair.lengths[0], pair.segments[0]
    check_token_budget(lengths, max_tokens)
    texts = [item if isinstance(item, str) else item[0] for item in inputs]
    return Tokenized(texts, ids, lengths, time.perf_counter_ns() - t0, segments if segments.any() else None)


def activate_labels(logits: np.ndarray, activation: Activation) -> np.ndarray:
    """A classifier's logits (rows x labels) through its activation, as the
    pipeline applies it: softmax over each row (single-label), sigmoid on
    each score (multi-label); float32."""
    wide = logits.astype(np.float64)
    if activation == Activation.SOFTMAX:
        wide = np.exp(wide - wide.max(axis=1, keepdims=True))
        wide /= wide.sum(axis=1, keepdims=True)
    elif activation == Activation.SIGMOID:
        wide = 1.0 / (1.0 + np.exp(-wide))
    return wide.astype(np.float32)
