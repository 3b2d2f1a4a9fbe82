"""Choosing among several served models, and reading their table, without a sidecar."""

import re

import numpy as np
import pytest

from shm_protocol.errors import ConfigError, LayoutMismatch, ModelNotFound
from shm_protocol.layout import HEADER_DTYPE, MODEL_NAME_BYTES, LayoutParams, ModelEntry, ModelKind
from shm_protocol.model_files import default_model, find_model, fit_name, parse_model_specs

EMBED, RERANK = ModelKind.EMBED, ModelKind.RERANK


def entry(i, name, kind=EMBED, dim=8):
    return ModelEntry(i, name, kind, dim, 16, 100)


def test_an_exact_name_wins_over_a_hub_id_ending_in_another():
    models = [entry(0, "tiny"), entry(1, "org/tiny", dim=4), entry(2, "ce", RERANK, 1)]
    assert find_model(models, "org/tiny", EMBED).index == 1
    assert find_model(models, "tiny", EMBED).index == 0
    assert find_model(models, "sentence-transformers/ce", RERANK).index == 2
    assert find_model(models, None, RERANK).index == 2
    with pytest.raises(ModelNotFound):
        find_model(models, "ce", EMBED)
    with pytest.raises(ModelNotFound) as err:
        find_model([entry(0, "tiny")], None, RERANK)
    assert err.value.requested == ""  # no reranker at all: a 422, not a 404


def test_the_default_is_the_first_embedding_model_even_after_a_reranker():
    assert default_model([entry(0, "ce", RERANK, 1), entry(1, "tiny")]).name == "tiny"
    assert default_model([entry(0, "ce", RERANK, 1)]).name == "ce"


def test_model_specs_refuse_names_one_request_could_confuse():
    assert [e[0] for e in parse_model_specs("a=/x,b=/y;rerank")] == ["a", "b"]
    assert parse_model_specs("a=/x;classify")[0][2] == ("classify",)
    for bad in ("e5=/x,org/e5=/y", "a=/x,a=/y", "a=", "=x", "a=/x;fast", "a=/x;embed;rerank", "a=/x;rerank;classify",
                ",".join(f"m{i}=/x" for i in range(9))):
        with pytest.raises(ConfigError):
            parse_model_specs(bad)


def test_a_folder_name_too_long_for_the_table_is_cut_to_fit():
    name = "ü" * 100  # 200 bytes
    cut = fit_name(name)
    assert len(cut.encode()) <= MODEL_NAME_BYTES and name.startswith(cut)
    assert len(("synthetic:" + fit_name(name, len("synthetic:"))).encode()) <= MODEL_NAME_BYTES


def test_a_model_table_that_does_not_fit_the_layout_is_a_mismatch(tmp_path):
    from shm_protocol.region import Region
    from shm_protocol.segments import Names, unlink_namespace

    names = Names(f"shm-embed-unit-{np.random.default_rng().integers(1 << 40):x}")
    params = LayoutParams(n_rings=1, slots_per_ring=1, max_texts=2, max_tokens=16, dim=8, max_seq_length=16,
                          vocab_size=100)
    region = Region.create(names, params, mode=0o600)
    try:
        region.write_models([entry(0, "a"), entry(1, "ce", RERANK, 1)])
        assert [m.name for m in region.models()] == ["a", "ce"] and region.model_name == "a"
        table = region.header["models"]
        for field, value in (("dim", 9), ("dim", 0), ("max_seq_length", 17), ("vocab_size", 101),
                             ("kind", 7), ("type_vocab_size", 1 << 20)):
            saved = int(table[1][field])
            table[1][field] = value
            with pytest.raises(LayoutMismatch):
                region.models()
            assert region.model_name == ""
            table[1][field] = saved
        region.header["n_models"] = 0
        with pytest.raises(LayoutMismatch):
            region.models()
    finally:
        region.close()
        unlink_namespace(names, lock=True)
    assert HEADER_DTYPE["models"].shape[0] >= 2


def test_a_table_entry_is_checked_against_its_model_folder(real_model_path, tiny_model, cross_encoder_path):
    """What a model folder's files say (its dimension, token limit and kind)
    against a table entry: the sidecar's own entries pass, changed ones are
    LayoutMismatch; the synthetic backend's vectors have a size of their own."""
    from shm_protocol.model_files import check_entry_files, embedding_dimension

    assert embedding_dimension(real_model_path) == 384 and embedding_dimension(tiny_model) == 32

    def table_entry(path, kind=EMBED, dim=384, max_seq_length=256):
        return ModelEntry(0, "m", kind, dim, max_seq_length, 30522, tokenizer_path=str(path / "tokenizer.json"))

    check_entry_files(table_entry(real_model_path))
    check_entry_files(table_entry(tiny_model, dim=32))
    check_entry_files(table_entry(cross_encoder_path, RERANK, dim=1, max_seq_length=512))
    check_entry_files(table_entry(tiny_model, dim=384), synthetic=True)
    for bad in (table_entry(real_model_path, dim=100), table_entry(real_model_path, max_seq_length=128),
                table_entry(cross_encoder_path, dim=1), table_entry(real_model_path, RERANK, dim=1)):
        with pytest.raises(LayoutMismatch):
            check_entry_files(bad)


@pytest.mark.parametrize("requested, device, flags, dtype", [
    ("auto", "cpu", {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "bfloat16"),  # Sapphire Rapids
    ("auto", "cpu", {"avx512f", "avx512_bf16"}, "measure"),  # Cooper Lake, Zen 4: timed at load
    ("auto", "cpu", {"avx2", "fma"}, "float32"),
    ("auto", "cpu", set(), "float32"),  # flags unknown
    ("auto", "cuda", set(), "float16"),
    ("auto", "cuda:1", set(), "float16"),
    ("float32", "cpu", {"amx_bf16"}, "float32"),  # asked for: exact equality with encode
    ("bfloat16", "cpu", set(), "bfloat16"),
])
def test_dtype_auto_follows_the_device_and_the_cpu_s_features(requested, device, flags, dtype):
    from sidecar.model import choose_dtype

    assert choose_dtype(requested, device, frozenset(flags)) == dtype


def test_float16_on_a_cpu_is_refused_with_the_choices():
    from shm_protocol.errors import ConfigError
    from sidecar.model import choose_dtype

    with pytest.raises(ConfigError, match="bfloat16 or auto"):
        choose_dtype("float16", "cpu", frozenset({"amx_bf16"}))


def test_a_classifier_is_found_by_its_folder_and_its_labels_and_activation_read_from_config(
        classifier_path, multi_label_classifier_path, cross_encoder_path, tiny_model):
    from shm_protocol.config import Settings
    from shm_protocol.layout import Activation
    from shm_protocol.model_files import check_entry_files, classifier_config, model_kind, model_specs
    from sidecar.tiny import CLASSIFIER_LABELS

    assert model_kind(classifier_path) == ModelKind.CLASSIFY and model_kind(cross_encoder_path) == RERANK
    single, multi = classifier_config(classifier_path), classifier_config(multi_label_classifier_path)
    assert single.labels == multi.labels == CLASSIFIER_LABELS
    assert (single.activation, multi.activation) == (Activation.SOFTMAX, Activation.SIGMOID)
    specs = model_specs(Settings.from_env({}, models=f"c={classifier_path};classify,t={tiny_model}"))
    assert [s.kind for s in specs] == [ModelKind.CLASSIFY, EMBED]
    with pytest.raises(ConfigError, match="not a sequence-classification model"):
        model_specs(Settings.from_env({}, models=f"c={tiny_model};classify"))
    with pytest.raises(ConfigError, match="no id2label"):
        classifier_config(tiny_model)

    def table_entry(dim):
        return ModelEntry(0, "c", ModelKind.CLASSIFY, dim, 512, 30522,
                          tokenizer_path=str(classifier_path / "tokenizer.json"))

    check_entry_files(table_entry(3))
    for bad in (table_entry(2), ModelEntry(0, "c", ModelKind.CLASSIFY, 3, 256, 30522,
                                           tokenizer_path=str(tiny_model / "tokenizer.json"))):
        with pytest.raises(LayoutMismatch):
            check_entry_files(bad)
    models = [entry(0, "tiny"), entry(1, "clf", ModelKind.CLASSIFY, 3)]
    assert find_model(models, None, ModelKind.CLASSIFY).name == "clf"
    with pytest.raises(ModelNotFound, match="serves embedding, not classification"):
        find_model(models, "tiny", ModelKind.CLASSIFY)


def test_classify_inputs_are_checked_and_logits_activated_as_the_pipeline_does():
    from shm_protocol.classify import ClassifyResult, activate_labels, check_inputs
    from shm_protocol.errors import InvalidInput
    from shm_protocol.layout import Activation

    assert check_inputs(["a", ("b", "c"), ["d", "e"]]) == ["a", ("b", "c"), ("d", "e")]
    for bad, words in (("a", "not one string"), (3, "not int"), ([["a"]], "inputs[0]"), (["a", 1], "inputs[1]"),
                       ([("a", 2)], "inputs[0]")):
        with pytest.raises(InvalidInput, match=re.escape(words)):
            check_inputs(bad)
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], np.float32)
    soft = activate_labels(logits, Activation.SOFTMAX)
    assert np.allclose(soft[0], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum()) and np.allclose(soft[1], [1, 0, 0])
    assert np.allclose(activate_labels(logits[:1], Activation.SIGMOID), 1 / (1 + np.exp(-logits[:1])))
    assert activate_labels(logits, Activation.IDENTITY).tolist() == logits.tolist()
    result = ClassifyResult(soft, ("x", "y", "z"), np.array([3, 4]), "m", 0, 0)
    assert [r["label"] for r in result.ranked()[0]] == ["z", "y", "x"]
    assert result.ranked(top_k=1)[1] == [{"label": "x", "score": pytest.approx(1.0)}]


def test_a_mapping_is_refused_as_inputs_or_texts_instead_of_its_keys_being_classified_or_embedded():
    """Iterating a dict gives its keys: {"text": ..., "text_pair": ...} (the
    pipeline's shape of one pair) would have been classified as the two
    words "text" and "text_pair"."""
    from shm_protocol.classify import check_inputs
    from shm_protocol.errors import InvalidInput
    from shm_protocol.tokenizer import check_texts

    with pytest.raises(InvalidInput, match=r"not a dict.*\(text, text_pair\)"):
        check_inputs({"text": "Is it up?", "text_pair": "It is."})
    with pytest.raises(InvalidInput, match="not a dict"):
        check_texts({"hello": 1, "world": 2})
    assert check_texts({"hello": 1}.keys()) == ["hello"]  # asked for explicitly: fine
