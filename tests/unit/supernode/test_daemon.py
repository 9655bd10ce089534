"""Site daemon settings, preflight and status: each failure names the item, file or key."""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading

import pytest

from fedhealth.errors import ConfigError
from fedhealth.security.certs import create_ca, create_server_cert, create_site_keys
from fedhealth.supernode import daemon as site


@pytest.fixture
def keys(tmp_path):
    ca = create_ca(tmp_path / "certs")
    create_server_cert(ca, tmp_path / "certs", ["localhost", "127.0.0.1"])
    create_site_keys(tmp_path / "certs", "hospital-a")
    return tmp_path / "certs"


def _settings(tmp_path, keys, cohort, port=1, **extra):
    values = {
        "name": "hospital-a",
        "coordinator": f"127.0.0.1:{port}",
        "ca": keys / "ca.crt",
        "auth_key": keys / "sites" / "hospital-a" / "auth.key",
        "data_dir": cohort / "site-0",
        "ledger_dir": tmp_path / "ledger",
        "state_dir": tmp_path / "state",
        **extra,
    }
    return site.load(None, [f"{k}={v}" for k, v in values.items()])


def test_site_yaml_relative_paths_and_errors_name_the_key(tmp_path):
    (tmp_path / "site.yaml").write_text(
        "name: hospital-a\ncoordinator: link.example.org:9092\nca: keys/ca.crt\n"
        "auth_key: keys/auth.key\ndata_dir: data\nledger_dir: ledger\n"
    )
    s = site.load(tmp_path / "site.yaml", ["epsilon_cap=3.5"])
    assert s.ca == str(tmp_path / "keys" / "ca.crt") and s.epsilon_cap == 3.5
    argv = site.supernode_argv(s)
    assert "--isolation" in argv
    assert argv[1:6] == ["-m", "fedhealth.supernode.paced", "--pull-interval", "0.5", "--"]
    assert argv[argv.index("--superlink") + 1] == "link.example.org:9092"
    with pytest.raises(ConfigError, match="pull_interval=5.0"):
        site.load(tmp_path / "site.yaml", ["pull_interval=5"])
    assert "epsilon-cap=3.5" in site.node_config(s)
    with pytest.raises(ConfigError, match="key epsilon_cap"):
        site.load(tmp_path / "site.yaml", ["epsilon_cap=lots"])
    with pytest.raises(ConfigError, match="key colour"):
        site.load(tmp_path / "site.yaml", ["colour=blue"])
    with pytest.raises(ConfigError, match="missing data_dir"):
        site.load(None, ["name=a", "coordinator=h:1", "ca=x", "auth_key=y", "ledger_dir=l"])
    with pytest.raises(ConfigError, match="coordinator='nohost'"):
        site.load(tmp_path / "site.yaml", ["coordinator=nohost"])
    with pytest.raises(ConfigError, match="'ca' and 'auth_key' are required"):
        site.load(None, ["name=a", "coordinator=h:1", "data_dir=d", "ledger_dir=l"])
    with pytest.raises(ConfigError, match="not found"):
        site.load(tmp_path / "missing.yaml", [])


def _tls_server(keys):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(keys / "server.crt", keys / "server.key")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_check_passes_on_a_ready_site(tmp_path, keys, cohort):
    server = _tls_server(keys)
    try:
        items = site.check(_settings(tmp_path, keys, cohort, server.getsockname()[1]))
    finally:
        server.close()
    assert [(i.name, i.ok) for i in items] == [
        ("data", True),
        ("ca", True),
        ("auth_key", True),
        ("ledger", True),
        ("coordinator", True),
    ], items
    assert "6 training scans" in items[0].detail and "certificate verified" in items[-1].detail


def test_check_names_every_failure(tmp_path, keys, cohort):
    key = keys / "sites" / "hospital-a" / "auth.key"
    os.chmod(key, 0o644)
    foreign = create_ca(tmp_path / "foreign")
    del foreign
    broken = tmp_path / "broken"
    (broken / "imagesTr").mkdir(parents=True)
    (broken / "dataset.json").write_text(
        json.dumps(
            {"training": [{"image": "imagesTr/p.nii.gz", "label": "imagesTr/p.nii.gz"}], "test": []}
        )
    )
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / "ledger.sqlite").write_bytes(b"not a database at all" * 100)
    server = _tls_server(keys)
    try:
        s = _settings(
            tmp_path,
            keys,
            cohort,
            server.getsockname()[1],
            data_dir=broken,
            ca=tmp_path / "foreign" / "ca.crt",
        )
        items = {i.name: i for i in site.check(s)}
    finally:
        server.close()
    assert not items["data"].ok and "p.nii.gz" in items["data"].detail
    assert not items["auth_key"].ok and "chmod 600" in items["auth_key"].detail
    assert not items["ledger"].ok and "ledger.sqlite" in items["ledger"].detail
    assert not items["coordinator"].ok and "TLS failed" in items["coordinator"].detail
    closed = _settings(tmp_path, keys, cohort, _closed_port())
    assert "not reachable" in site.check(closed)[-1].detail


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_status_reports_a_dead_daemon_and_the_ledger(tmp_path, keys, cohort):
    s = _settings(tmp_path, keys, cohort)
    assert site.status(s)["daemon"] == "never started"
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "status.json").write_text(
        json.dumps({"pid": 2**22 + 12345, "state": "connected", "since": "then"})
    )
    report = site.status(s)
    assert report["daemon"]["state"] == "not running (last state 'connected')"
    assert report["privacy"] == {"epsilon_spent": 0.0, "epsilon_cap": 8.0, "rounds_trained": 0}


def test_status_lines_from_the_supernode_update_the_status(tmp_path):
    sup = site.Supervisor(tmp_path / "status.json")
    site.watch_line(sup, "supernode", "INFO :      SuperNode ID: 1234")
    assert sup.status["state"] == "connected" and sup.status["node_id"] == "1234"
    site.watch_line(sup, "executor", "INFO fedhealth.site: site a round 3: train started")
    assert sup.status["activity"].startswith("train round 3 since")
    site.watch_line(
        sup,
        "supernode",
        "INFO fedhealth.site: site a round 3: trained, loss 0.5000, epsilon 2.500 of 8.0",
    )
    assert sup.status["last_trained"]["round"] == 3 and sup.status["last_trained"]["epsilon"] == 2.5
    site.watch_line(sup, "supernode", "ERROR : Failed to activate SuperNode")
    assert sup.status["state"] == "refused"
