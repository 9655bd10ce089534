"""The coordinator's listeners: the gRPC Fleet API for sites, the Control API on loopback only."""

from __future__ import annotations

import pytest

from fedhealth.errors import ConfigError
from fedhealth.superlink.service import superlink_argv
from fedhealth.superlink.settings import is_loopback, load


def _settings(tmp_path, *extra):
    for name in ("ca.crt", "server.crt", "server.key"):
        (tmp_path / name).write_text("-")
    (tmp_path / "enrolled").mkdir(exist_ok=True)
    return load(
        None,
        [
            f"ca={tmp_path / 'ca.crt'}",
            f"cert={tmp_path / 'server.crt'}",
            f"key={tmp_path / 'server.key'}",
            f"enrolled={tmp_path / 'enrolled'}",
            f"state_dir={tmp_path / 'state'}",
            *extra,
        ],
    )


def test_sites_get_a_grpc_fleet_port_and_the_control_api_stays_on_loopback(tmp_path):
    argv = superlink_argv(_settings(tmp_path, "host=0.0.0.0", "port=9092", "control_port=9093"))
    flag = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("--")}
    assert flag["--fleet-api-type"] == "grpc-rere"
    assert flag["--fleet-api-address"] == "0.0.0.0:9092"
    assert (flag["--host"], flag["--port"]) == ("127.0.0.1", "9093")
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert "--disable-runtime-dependency-installation" in argv
    ipv6 = superlink_argv(_settings(tmp_path, "host='::'", "control_host='::1'"))
    assert "[::]:9092" in ipv6 and "::1" in ipv6


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.2", "coordinator.example.org", "::"])
def test_a_control_api_off_loopback_is_refused(tmp_path, host):
    with pytest.raises(ConfigError, match="control_host.*loopback"):
        _settings(tmp_path, f"control_host='{host}'")


def test_fleet_and_control_need_their_own_ports(tmp_path):
    with pytest.raises(ConfigError, match="own ports"):
        _settings(tmp_path, "port=9100", "control_port=9100")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback
