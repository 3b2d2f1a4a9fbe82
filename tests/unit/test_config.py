import dataclasses
from pathlib import Path

import pytest

from shm_protocol.config import Settings, env_file_settings, markdown_document, markdown_table
from shm_protocol.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_without_environment():
    settings = Settings.from_env({})
    assert settings.namespace == "shm-embed"
    assert settings.ipc_mode == 0o600
    assert settings.max_wait_us == 4000
    assert settings.use_ipc is True


def test_environment_is_parsed_and_typed():
    settings = Settings.from_env({"SHM_EMBED_RINGS": "3", "SHM_EMBED_TIMEOUT_S": "2.5", "USE_IPC_EMBEDDING": "false",
                                  "SHM_EMBED_GROUP": "shm"})
    assert (settings.rings, settings.timeout_s, settings.use_ipc, settings.ipc_mode) == (3, 2.5, False, 0o660)


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


def test_every_setting_has_one_row_with_its_default_and_meaning():
    rows = [line.split(" | ") for line in markdown_table().splitlines()[2:]]
    assert [row[0].strip("| `") for row in rows] == [field.metadata["env"] for field in dataclasses.fields(Settings)]
    for row, field in zip(rows, dataclasses.fields(Settings), strict=True):
        assert field.metadata["doc"] and row[2].rstrip(" |") == field.metadata["doc"], row
        assert row[1].strip("`") == (str(field.default) if field.default != "" else "(empty)"), row


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

def test_docs_configuration_is_the_generated_text():
    """docs/configuration.md is made by ``python -m shm_protocol.config --markdown``:
    a setting added, removed or reworded in the table without regenerating it fails here."""
    on_disk = (REPO / "docs" / "configuration.md").read_text()
    assert on_disk == markdown_document(), (
        "docs/configuration.md is out of date: python -m shm_protocol.config --markdown > docs/configuration.md")


def test_the_example_environment_file_lists_every_setting_with_its_default():
    example = (REPO / "systemd" / "shm-embed.env.example").read_text()
    assert example.endswith(env_file_settings() + "\n"), (
        "systemd/shm-embed.env.example is out of date: its settings are python -m shm_protocol.config --env")
