"""A tiny randomly initialised BERT sentence model, for fast protocol tests
and benchmarks. It shares the bundled model's tokenizer (so token ids,
truncation and vocabulary are the real ones) but has 2 small layers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from shm_protocol.model_files import bundled_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def make_tiny_model(dest: str | os.PathLike, *, hidden: int = 32, layers: int = 2, max_seq_length: int = 256,
                    seed: int = 0) -> Path:
    """Write a sentence-transformers model folder to ``dest`` and return it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    from transformers import BertConfig, BertModel

    dest = Path(dest)
    hf_dir = dest / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    src = bundled_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, hf_dir / name)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=hidden * 2, max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=max_seq_length)
    pooling = Pooling(hidden, pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    out = dest / "st"
    model.save(str(out))
    if not (out / "tokenizer.json").is_file():
        shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    return out


def make_cross_encoder(dest: str | os.PathLike, *, seed: int = 0) -> Path:
    """A cross-encoder folder (what sentence-transformers loads as
    ``CrossEncoder``): the bundled MiniLM's weights with a fresh one-label
    head, for tests and the rerank benchmark. Its scores mean nothing; they
    are deterministic, which is what a comparison needs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import CrossEncoder

    dest = Path(dest)
    torch.manual_seed(seed)
    CrossEncoder(str(bundled_model_path()), num_labels=1, device="cpu").save(str(dest))
    if not (dest / "tokenizer.json").is_file():
        shutil.copy(bundled_model_path() / "tokenizer.json", dest / "tokenizer.json")
    return dest


#: The labels of :func:`make_classifier`'s head.
CLASSIFIER_LABELS = ("negative", "neutral", "positive")


def make_classifier(dest: str | os.PathLike, *, multi_label: bool = False, seed: int = 0) -> Path:
    """A sequence-classification folder (what transformers loads as
    ``AutoModelForSequenceClassification``): the bundled MiniLM's weights
    with a fresh head of :data:`CLASSIFIER_LABELS`, single-label (softmax)
    or ``multi_label`` (``problem_type: multi_label_classification``,
    sigmoid). For tests; its scores mean nothing but are deterministic."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForSequenceClassification

    dest = Path(dest)
    torch.manual_seed(seed)
    labels = dict(enumerate(CLASSIFIER_LABELS))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(bundled_model_path()), num_labels=len(labels), id2label=labels,
        label2id={name: index for index, name in labels.items()},
        problem_type="multi_label_classification" if multi_label else "single_label_classification")
    with torch.no_grad():  # a wider head than the default init's, so that the labels' scores differ
        model.classifier.weight.normal_(0.0, 0.5)
    model.save_pretrained(dest)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled_model_path() / name, dest / name)
    return dest
