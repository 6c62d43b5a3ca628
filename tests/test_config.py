"""Configuration precedence: arguments, then SCATTER_* variables, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from scatter import ConfigError
from scatter._config import (
    DEFAULT_ADDRESS,
    default_address,
    is_loopback,
    parse_address,
    resolve_client_config,
    resolve_node_config,
)


def test_defaults_without_environment() -> None:
    config = resolve_client_config(environ={})
    assert config.address == DEFAULT_ADDRESS
    assert config.autostart is True
    assert config.data_dir is None


def test_argument_beats_environment_beats_default() -> None:
    env = {"SCATTER_ADDRESS": "tcp://127.0.0.1:5000"}
    assert resolve_client_config(environ=env).address == "tcp://127.0.0.1:5000"
    assert resolve_client_config("tcp://127.0.0.1:6000", environ=env).address == (
        "tcp://127.0.0.1:6000"
    )


@pytest.mark.parametrize("value, expected", [("0", False), ("1", True), ("", True), ("off", False)])
def test_autostart_variable(value: str, expected: bool) -> None:
    assert resolve_client_config(environ={"SCATTER_AUTOSTART": value}).autostart is expected


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="SCATTER_AUTOSTART"):
        resolve_client_config(environ={"SCATTER_AUTOSTART": "maybe"})
    with pytest.raises(ConfigError, match="SCATTER_ADDRESS"):
        resolve_client_config(environ={"SCATTER_ADDRESS": "localhost:4242"})
    with pytest.raises(ConfigError, match="expected tcp://HOST:PORT"):
        resolve_client_config("http://127.0.0.1:1")


def test_no_autostart_for_an_address_off_this_machine() -> None:
    assert resolve_client_config("tcp://10.1.2.3:4242", environ={}).autostart is False


def test_node_beyond_loopback_needs_a_cluster_secret(tmp_path: Path) -> None:
    config = resolve_node_config("tcp://127.0.0.1:5001", tmp_path, environ={})
    assert config.data_dir == tmp_path and config.secret is None  # the user's own, later
    with pytest.raises(ConfigError, match=r"without a cluster secret.*scatter secret new"):
        resolve_node_config("tcp://0.0.0.0:5001", tmp_path, environ={})
    secret = "x" * 32
    exposed = resolve_node_config("tcp://0.0.0.0:5001", tmp_path, environ={"SCATTER_SECRET": secret})
    assert exposed.secret == secret
    with pytest.raises(ConfigError, match="at least 16 characters"):
        resolve_node_config(environ={"SCATTER_SECRET": "short"})


def test_secret_files_must_be_private(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    key.write_text("y" * 40 + "\n")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        resolve_node_config(secret_file=key, environ={})
    key.chmod(0o600)
    assert resolve_node_config(secret_file=key, environ={}).secret == "y" * 40
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        resolve_node_config(secret_file=tmp_path / "missing.key", environ={})


def test_each_user_has_a_default_address_of_their_own() -> None:
    assert default_address(0) == "tcp://127.0.0.1:4242"
    assert len({default_address(uid) for uid in (0, 1000, 1001, 65534)}) == 4
    for uid in (0, 1000, 65534):
        assert is_loopback(parse_address(default_address(uid))[0])


def test_membership_log_is_off_unless_the_environment_turns_it_on(tmp_path: Path) -> None:
    assert not resolve_node_config(data_dir=tmp_path, environ={}).log_membership
    on = resolve_node_config(data_dir=tmp_path, environ={"SCATTER_LOG_MEMBERSHIP": "1"})
    assert on.log_membership
    with pytest.raises(ConfigError, match="SCATTER_LOG_MEMBERSHIP"):
        resolve_node_config(data_dir=tmp_path, environ={"SCATTER_LOG_MEMBERSHIP": "loud"})


def test_push_budget_from_environment_and_its_bad_values(tmp_path: Path) -> None:
    assert resolve_node_config(data_dir=tmp_path, environ={}).max_push_bytes == 16 * 2**20
    small = resolve_node_config(data_dir=tmp_path, environ={"SCATTER_MAX_PUSH_BYTES": "1"})
    assert small.max_push_bytes == 1
    with pytest.raises(ConfigError, match="SCATTER_MAX_PUSH_BYTES must be a number"):
        resolve_node_config(data_dir=tmp_path, environ={"SCATTER_MAX_PUSH_BYTES": "lots"})
    with pytest.raises(ConfigError, match="max_push_bytes must be at least 1, got 0"):
        resolve_node_config(data_dir=tmp_path, environ={"SCATTER_MAX_PUSH_BYTES": "0"})


def test_node_data_dir_from_environment(tmp_path: Path) -> None:
    config = resolve_node_config(environ={"SCATTER_DATA_DIR": str(tmp_path)})
    assert config.data_dir == tmp_path
    default = resolve_node_config("tcp://127.0.0.1:5002", environ={})
    assert default.data_dir.name == "node-127.0.0.1-5002"
