"""The compiled hot path (``hotpath_c/*.c``), bound to the layout.

The C code knows no offset of its own: :func:`ring` hands it the field
offsets of :func:`shm_protocol.layout.slot_dtype`, and :func:`load` checks at
import that its state and error codes are the layout's. A build that cannot
be loaded (no compiler at install, a foreign build, another Python ABI) is a
:class:`HotPathUnavailable` at start, naming the fix; nothing serves on a
half-working path.
"""

from __future__ import annotations

import functools
from types import ModuleType

import numpy as np

from .errors import HotPathUnavailable, SidecarUnavailable
from .layout import ETA_NONE, ETA_PARK, SLOT_ALIGN, SLOT_FIELDS, SidecarState, SlotError, SlotState

REBUILD_HINT = ("rebuild it in this environment: pip install -e . (or make venv), which needs gcc and the "
                "Python headers (Debian/Ubuntu: apt-get install gcc python3-dev)")

#: Timer slack of threads that wait on the hot path: the kernel's default of
#: 50 us makes every timed wake-up up to 50 us late (bench/hot_path.py --sleeps).
TIMER_SLACK_NS = 1000


#: What Ring.poll returns: answered; the budget ran out; park (the ETA is far,
#: the sidecar asks waiters to park, or more work is queued than spinners fit).
POLL_TIMEOUT, POLL_ANSWERED, POLL_PARK = 0, 1, 2


@functools.cache
def load() -> ModuleType:
    """The extension module, checked against the layout (once per process)."""
    try:
        from . import _hotpath
    except ImportError as exc:
        raise HotPathUnavailable(f"shm-embed's compiled hot path (shm_protocol._hotpath) cannot be loaded: {exc}; "
                                 + REBUILD_HINT) from exc
    states = {f"ST_{s.name}": int(s) for s in SlotState}
    errors = {f"E_{e.name}": int(e) for e in SlotError if hasattr(_hotpath, f"E_{e.name}")}
    polls = {"POLL_TIMEOUT": POLL_TIMEOUT, "POLL_ANSWERED": POLL_ANSWERED, "POLL_PARK": POLL_PARK,
             "ETA_NONE": ETA_NONE, "ETA_PARK": ETA_PARK}
    wrong = [k for k, v in {**states, **errors, **polls}.items() if getattr(_hotpath, k, None) != v]
    if wrong:
        raise HotPathUnavailable(f"the compiled hot path disagrees with the layout on {', '.join(wrong)}: "
                                 "it was built from other sources; " + REBUILD_HINT)
    _hotpath.set_timer_slack(TIMER_SLACK_NS)
    return _hotpath


def field_offsets(dtype: np.dtype) -> dict[str, int]:
    """Byte offset of every slot field in ``dtype`` (a slot_dtype)."""
    return {name: int(dtype.fields[name][1]) for name in SLOT_FIELDS}


def ring(slots: np.ndarray, *, queued: np.ndarray | None = None):
    """A C ``Ring`` over a C-contiguous array of slots (one ring's, or all of
    them), with the offsets of its own dtype. ``queued``: the header's
    one-element ``ready_slots`` view, which waiters read to stop spinning."""
    hp = load()
    dtype = slots.dtype
    max_texts = dtype.fields["segments"][0].shape[0]
    max_tokens = dtype.fields["tokens"][0].shape[0]
    dim = dtype.fields["out"][0].shape[1]
    if dtype.itemsize % SLOT_ALIGN:
        raise HotPathUnavailable(f"slot size {dtype.itemsize} is not a multiple of {SLOT_ALIGN}")
    flat = slots.reshape(-1)
    return hp.Ring(flat.view(np.uint8), dtype.itemsize, field_offsets(dtype), max_texts, max_tokens, dim,
                   queued if queued is not None else None)


def liveness(header: np.ndarray):
    """The quick liveness check (``_hotpath.Liveness``) of a mapped header
    (a 0-d HEADER_DTYPE view), at the layout's offsets."""
    hp = load()
    fields = header.dtype.fields
    return hp.Liveness(header.reshape(1).view(np.uint8), fields["state"][1], fields["sidecar_pid"][1],
                       fields["heartbeat_ns"][1], fields["loop_deadline_ns"][1], int(SidecarState.READY))


def semaphore(name: str):
    """This process's own handle on an existing named semaphore (for the hot
    path's posts and waits; posix_ipc keeps creating and removing them).
    SidecarUnavailable when it is gone or this user may not open it."""
    hp = load()
    try:
        return hp.Sem(name)
    except FileNotFoundError:
        raise SidecarUnavailable(f"no semaphore {name}: the sidecar is gone", reason="absent") from None
    except PermissionError:
        raise SidecarUnavailable(f"semaphore {name} exists but this user may not open it",
                                 reason="permission") from None


def wordpiece(tokenizer_json: str):
    """The compiled BERT tokenizer for ASCII text (``_hotpath.WordPiece``)
    when ``tokenizer_json`` (a tokenizer.json's text) is of exactly the shape
    it reproduces: BertNormalizer (no accent stripping beyond lowercasing,
    which ASCII has none of), BertPreTokenizer, WordPiece, and a
    ``[CLS] $A [SEP]`` template, its added tokens matched on the raw text
    (``normalized: false``, which the caller looks for). None for anything else: those tokenizers
    always run in the tokenizers library."""
    import json

    try:
        spec = json.loads(tokenizer_json)
        norm, pre, model, post = (spec.get(k) or {} for k in ("normalizer", "pre_tokenizer", "model",
                                                             "post_processor"))
        if norm.get("type") != "BertNormalizer" or not norm.get("clean_text", True):
            return None
        if pre.get("type") != "BertPreTokenizer" or model.get("type") != "WordPiece":
            return None
        vocab = model["vocab"]
        if any(t.get("normalized") for t in spec.get("added_tokens") or []):
            return None  # matched after normalizing (lowercased): only the library does that
        single = post.get("single") if post.get("type") == "TemplateProcessing" else None
        shape = [next(iter(piece)) for piece in single or []]
        if shape != ["SpecialToken", "Sequence", "SpecialToken"]:
            return None
        specials = post["special_tokens"]
        cls_ids = specials[single[0]["SpecialToken"]["id"]]["ids"]
        sep_ids = specials[single[2]["SpecialToken"]["id"]]["ids"]
        if len(cls_ids) != 1 or len(sep_ids) != 1:
            return None
        return load().WordPiece(vocab, vocab[model["unk_token"]], cls_ids[0], sep_ids[0],
                                bool(norm.get("lowercase", True)), int(model.get("max_input_chars_per_word", 100)),
                                model.get("continuing_subword_prefix") or "")
    except (KeyError, TypeError, ValueError, StopIteration, AttributeError):
        return None
