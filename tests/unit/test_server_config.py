"""server.toml loading (SPEC §4.1): every bad file is config_invalid naming the file and the key."""

from __future__ import annotations

import pytest

from portunus.errors import PortunusError
from portunus.server import config as server_config


def _load_with(tmp_path, raw: bytes) -> server_config.ServerConfig:
    (tmp_path / "server.toml").write_bytes(raw)
    return server_config.load(str(tmp_path))


@pytest.mark.parametrize("listen", ["127.0.0.1:²", "127.0.0.1:٣٣", "127.0.0.1:", "127.0.0.1:70000"])
def test_listen_port_must_be_ascii_digits_in_range(tmp_path, listen):
    with pytest.raises(PortunusError) as err:
        _load_with(tmp_path, f'metrics_listen = "{listen}"\n'.encode())
    assert err.value.code == "config_invalid"
    assert "metrics_listen port must be 0-65535" in err.value.message


def test_a_file_that_is_not_utf8_is_config_invalid(tmp_path):
    with pytest.raises(PortunusError) as err:
        _load_with(tmp_path, b'log_format = "json\xff"\n')
    assert err.value.code == "config_invalid"
    assert "server.toml: not UTF-8 text" in err.value.message


def test_a_syntax_error_names_the_file(tmp_path):
    with pytest.raises(PortunusError) as err:
        _load_with(tmp_path, b"log_format = \n")
    assert err.value.code == "config_invalid" and "server.toml: TOML syntax error" in err.value.message


def test_a_valid_file_loads_its_values(tmp_path):
    cfg = _load_with(tmp_path, b'log_format = "compact"\nmetrics_listen = "[::1]:0"\n')
    assert cfg.log_format == "compact"
    assert cfg.metrics_addr == ("::1", 0)
