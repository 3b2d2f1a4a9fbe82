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
