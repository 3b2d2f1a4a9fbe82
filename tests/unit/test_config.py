import pytest

from shm_protocol.config import Settings, markdown_table
from shm_protocol.errors import ConfigError


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert s.namespace == "shm-embed"
    assert s.ipc_mode == 0o600
    assert s.max_wait_us == 4000
    assert s.use_ipc is True


def test_environment_is_parsed_and_typed():
    s = Settings.from_env({"SHM_EMBED_RINGS": "3", "SHM_EMBED_TIMEOUT_S": "2.5", "USE_IPC_EMBEDDING": "false",
                           "SHM_EMBED_GROUP": "shm"})
    assert (s.rings, s.timeout_s, s.use_ipc, s.ipc_mode) == (3, 2.5, False, 0o660)


@pytest.mark.parametrize("env,match", [
    ({"SHM_EMBED_RINGS": "many"}, "SHM_EMBED_RINGS"),
    ({"SHM_EMBED_RINGS": "0"}, "at least 1"),
    ({"SHM_EMBED_FALLBACK": "remote"}, "one of"),
    ({"SHM_EMBED_NAMESPACE": "a/b"}, "NAMESPACE"),
    ({"SHM_EMBED_DEVICE": "tpu"}, "DEVICE"),
    ({"USE_IPC_EMBEDDING": "maybe"}, "USE_IPC_EMBEDDING"),
])
def test_bad_values_raise_config_error_naming_the_variable(env, match):
    with pytest.raises(ConfigError, match=match):
        Settings.from_env(env)


def test_every_setting_is_documented_in_the_table():
    table = markdown_table()
    import dataclasses

    for f in dataclasses.fields(Settings):
        assert f"`{f.metadata['env']}`" in table
        assert f.metadata["doc"]


def test_the_old_batch_token_variable_sets_both_budgets_with_a_warning():
    from loguru import logger

    warnings: list[str] = []
    sink = logger.add(warnings.append, level="WARNING", format="{message}")
    try:
        old = Settings.from_env({"SHM_EMBED_MAX_BATCH_TOKENS": "4096"})
        mixed = Settings.from_env({"SHM_EMBED_MAX_BATCH_TOKENS": "4096", "SHM_EMBED_CALL_TOKENS": "2048"})
    finally:
        logger.remove(sink)
    assert (old.admit_tokens, old.call_tokens) == (4096, 4096)
    assert (mixed.admit_tokens, mixed.call_tokens) == (4096, 2048)  # the new name wins where set
    assert len(warnings) == 2 and "SHM_EMBED_MAX_BATCH_TOKENS is deprecated" in warnings[0]
    new = Settings.from_env({"SHM_EMBED_ADMIT_TOKENS": "100", "SHM_EMBED_CALL_TOKENS": "200"})
    assert (new.admit_tokens, new.call_tokens) == (100, 200)
    with pytest.raises(ConfigError, match="SHM_EMBED_ADMIT_TOKENS"):
        Settings.from_env({"SHM_EMBED_MAX_BATCH_TOKENS": "0"})
