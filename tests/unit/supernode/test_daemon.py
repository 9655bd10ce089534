"""Site daemon settings, preflight and status: each failure names the item, file or key."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest

from fedhealth.clientapp.events import EVENT_MARKER
from fedhealth.errors import ConfigError
from fedhealth.security.certs import create_ca, create_server_cert, create_site_keys
from fedhealth.service.supervisor import Child, Supervisor
from fedhealth.supernode import daemon
from fedhealth.supernode.preflight import check
from fedhealth.supernode.settings import load
from fedhealth.supernode.sitestatus import status, watch_line


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
    return load(None, [f"{k}={v}" for k, v in values.items()])


def test_site_yaml_relative_paths_and_errors_name_the_key(tmp_path):
    (tmp_path / "site.yaml").write_text(
        "name: hospital-a\ncoordinator: link.example.org:9092\nca: keys/ca.crt\n"
        "auth_key: keys/auth.key\ndata_dir: data\nledger_dir: ledger\n"
    )
    s = load(tmp_path / "site.yaml", ["epsilon_cap=3.5"])
    assert s.ca == str(tmp_path / "keys" / "ca.crt") and s.epsilon_cap == 3.5
    argv = daemon.supernode_argv(s)
    assert "--isolation" in argv
    assert argv[1:6] == [
        "-m",
        "fedhealth.supernode.paced",
        "--pull-interval",
        "0.5",
        "--enforce-approval",
    ]
    gate = argv[: argv.index("--")]  # the app gate is the launcher's, before Flower's args
    assert gate[gate.index("--apps-log") + 1] == str(Path(s.state_dir).resolve() / "apps.jsonl")
    assert "--approved-app" not in gate  # nothing approved: every app is refused
    approved = load(tmp_path / "site.yaml", [f"approved_apps=[{'AB' * 32}]"])
    assert approved.approved_apps == ["ab" * 32]
    argv = daemon.supernode_argv(approved)
    assert argv[argv.index("--approved-app") + 1] == "ab" * 32
    with pytest.raises(ConfigError, match="approved_apps"):
        load(tmp_path / "site.yaml", ["approved_apps=[abc]"])
    assert argv[argv.index("--superlink") + 1] == "link.example.org:9092"
    with pytest.raises(ConfigError, match="pull_interval=5.0"):
        load(tmp_path / "site.yaml", ["pull_interval=5"])
    assert "--heartbeat-interval" not in argv  # Flower's 30 s: its SuperNode unchanged
    argv = daemon.supernode_argv(load(tmp_path / "site.yaml", ["heartbeat_interval=12"]))
    assert argv[argv.index("--heartbeat-interval") + 1] == "12.0"
    assert argv.index("--heartbeat-interval") < argv.index("--")  # the launcher's, not Flower's
    for bad in ("5", "1801"):
        with pytest.raises(ConfigError, match=f"heartbeat_interval={float(bad)}"):
            load(tmp_path / "site.yaml", [f"heartbeat_interval={bad}"])
    assert "epsilon-cap=3.5" in daemon.node_config(s)
    with pytest.raises(ConfigError, match="key epsilon_cap"):
        load(tmp_path / "site.yaml", ["epsilon_cap=lots"])
    with pytest.raises(ConfigError, match="key colour"):
        load(tmp_path / "site.yaml", ["colour=blue"])
    with pytest.raises(ConfigError, match="missing data_dir"):
        load(None, ["name=a", "coordinator=h:1", "ca=x", "auth_key=y", "ledger_dir=l"])
    with pytest.raises(ConfigError, match="coordinator='nohost'"):
        load(tmp_path / "site.yaml", ["coordinator=nohost"])
    with pytest.raises(ConfigError, match="'ca' and 'auth_key' are required"):
        load(None, ["name=a", "coordinator=h:1", "data_dir=d", "ledger_dir=l"])
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.yaml", [])


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
        items = check(_settings(tmp_path, keys, cohort, server.getsockname()[1]))
    finally:
        server.close()
    assert [(i.name, i.ok) for i in items] == [
        ("data", True),
        ("ca", True),
        ("auth_key", True),
        ("ledger", True),
        ("policy", True),
        ("apps", False),  # nothing approved: the site would refuse every app
        ("coordinator", True),
    ], items
    assert "refuses EVERY app" in items[5].detail
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
        items = {i.name: i for i in check(s)}
    finally:
        server.close()
    assert not items["data"].ok and "p.nii.gz" in items["data"].detail
    assert not items["auth_key"].ok and "chmod 600" in items["auth_key"].detail
    assert not items["ledger"].ok and "ledger.sqlite" in items["ledger"].detail
    assert not items["coordinator"].ok and "TLS failed" in items["coordinator"].detail
    closed = _settings(tmp_path, keys, cohort, _closed_port())
    assert "not reachable" in check(closed)[-1].detail


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_status_reports_a_dead_daemon_and_the_ledger(tmp_path, keys, cohort):
    s = _settings(tmp_path, keys, cohort)
    assert status(s)["daemon"] == "never started"
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "status.json").write_text(
        json.dumps({"pid": 2**22 + 12345, "state": "connected", "since": "then"})
    )
    report = status(s)
    assert report["daemon"]["state"] == "not running (last state 'connected')"
    assert report["privacy"] == {"epsilon_spent": 0.0, "epsilon_cap": 8.0, "rounds_trained": 0}


def test_flowers_own_lines_update_the_status(tmp_path):
    sup = Supervisor(tmp_path / "status.json")
    watch_line(sup, "supernode", "INFO :      SuperNode ID: 1234")
    assert sup.status["state"] == "connected" and sup.status["node_id"] == "1234"
    watch_line(sup, "supernode", "WARNING :   Connection attempt failed, retrying in 2s")
    assert sup.status["state"] == "reconnecting"
    watch_line(sup, "supernode", "ERROR : Failed to activate SuperNode")
    assert sup.status["state"] == "refused"
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "refused"


# -- site events: a real round's log, through the status reader ------------------------------
TINY = ["model.channels=[2,4]", "model.strides=[2]", "rounds=2", "train.local_epochs=1"]


def _instruction(cohort, ledger: Path, cap: float = 8.0):
    """A real train instruction for hospital-a (site-0 of the cohort) and its context."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fedhealth.config import compose, site_settings
    from fedhealth.models import build_model

    cfg = compose(TINY)
    settings = {**site_settings(cfg), "server-round": 1, "run-key": "status-test"}
    content = RecordDict(
        {
            "arrays": ArrayRecord(build_model(cfg.model).state_dict()),
            "config": ConfigRecord(settings),
        }
    )
    node = {
        "data-dir": str(cohort / "site-0"),
        "site-name": "hospital-a",
        "ledger-dir": str(ledger),
        "epsilon-cap": cap,
        "delta": 1e-5,
        # a plain train instruction; the loss released so the test can compare it
        "site-policy": '{"require_secure_aggregation": false, "release": ["loss"]}',
    }
    context = Context(run_id=1, node_id=0, node_config=node, state=RecordDict(), run_config={})
    return Message(content, 0, "train"), context


@contextlib.contextmanager
def _clientapp_log():
    """The log handler a ClientApp process gets from make_client_app, writing to a buffer."""
    from fedhealth.clientapp.app import make_client_app

    logger = logging.getLogger("fedhealth")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers.clear()
    try:
        make_client_app()
        (handler,) = logger.handlers  # installed by make_client_app, as in a ClientApp process
        buffer = io.StringIO()
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(buffer)
        yield buffer
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


@pytest.fixture(scope="module")
def trained_round(cohort, tmp_path_factory):
    """The lines a real DP training round prints through the ClientApp's log, and its reply."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedhealth.clientapp import handlers

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    try:
        msg, context = _instruction(cohort, tmp_path_factory.mktemp("ledger"))
        with _clientapp_log() as buffer:
            reply = handlers.handle(msg, context, "train")
    finally:
        TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None
    assert not reply.has_error(), buffer.getvalue()
    return buffer.getvalue().splitlines(), dict(reply.content["metrics"])


def _status_after(lines, path: Path) -> dict:
    sup = Supervisor(path)
    for line in lines:
        watch_line(sup, "clientapp-executor", line)
    return json.loads(path.read_text()) if path.exists() else {}


def _without_times(status: dict) -> dict:
    drop = {"at", "since", "updated", "pid"}
    out = {}
    for key, value in status.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in drop}
        if key == "activity":
            value = value.split(" since ")[0]
        if key not in drop:
            out[key] = value
    return out


def test_a_trained_round_sets_last_trained(trained_round, tmp_path):
    lines, metrics = trained_round
    status = _status_after(lines, tmp_path / "status.json")  # as written to disk
    last = status["last_trained"]
    assert last["round"] == 1
    assert last["loss"] == pytest.approx(metrics["loss"], abs=0)
    assert last["epsilon"] == pytest.approx(metrics["epsilon"], abs=0) and 0 < last["epsilon"] <= 8
    assert last["epsilon_cap"] == 8.0
    assert status["activity"] == "idle" and status["state"] == "connected"
    assert not status.get("budget_exhausted")


def test_the_status_does_not_depend_on_the_wording_of_a_line(trained_round, tmp_path):
    lines, _ = trained_round
    events = [ln for ln in lines if EVENT_MARKER in ln]
    assert len(events) >= 2, lines  # round started, trained
    original = _status_after(lines, tmp_path / "a.json")
    # every human word replaced: the same status
    reworded = [f"completely different words {ln[ln.index(EVENT_MARKER) :]}" for ln in events]
    assert _without_times(_status_after(reworded, tmp_path / "b.json")) == _without_times(original)
    # the human words alone (the event taken off): nothing about the round
    words_only = [ln[: ln.index(EVENT_MARKER)] if EVENT_MARKER in ln else ln for ln in lines]
    assert any("trained" in ln for ln in words_only)
    status = _status_after(words_only, tmp_path / "c.json")
    assert "last_trained" not in status and "activity" not in status


def test_a_reworded_message_from_the_same_emit_gives_the_same_status(tmp_path):
    from fedhealth.clientapp.events import Trained
    from fedhealth.clientapp.sitelog import emit

    trained = Trained(site="hospital-a", round=4, loss=0.25, epsilon=3.5, epsilon_cap=8.0)
    statuses = []
    for n, words in enumerate(("site %s: trained round %d", "%s finished its %dth round")):
        with _clientapp_log() as buffer:
            emit(logging.getLogger("fedhealth.site"), trained, words, "hospital-a", 4)
        (line,) = buffer.getvalue().splitlines()
        assert line.split(" fedhealth.site: ")[1].startswith(words % ("hospital-a", 4))
        statuses.append(_without_times(_status_after([line], tmp_path / f"{n}.json")))
    assert statuses[0] == statuses[1]
    assert statuses[0]["last_trained"] == {
        "round": 4,
        "loss": 0.25,
        "epsilon": 3.5,
        "epsilon_cap": 8.0,
    }


_REFUSING_CHILD = """
import sys
from pathlib import Path
from flwr.supercore.task_identity import TaskIdentity
from fedhealth.clientapp.app import make_client_app
from fedhealth.clientapp import handlers
TINY = {tiny!r}
{instruction}
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
make_client_app()  # the site log, as in every ClientApp process
msg, context = _instruction(Path({cohort!r}), Path({ledger!r}), cap=0.01)
sys.exit(0 if handlers.handle(msg, context, "train").has_error() else 3)
"""


def test_a_budget_refusal_in_a_clientapp_process_reaches_status_json(cohort, tmp_path):
    """The real path: a ClientApp process refuses to train, its stderr goes through the
    supervisor's relay into watch_line, and status.json says the budget is exhausted."""
    script = tmp_path / "clientapp.py"
    script.write_text(
        _REFUSING_CHILD.format(
            tiny=TINY,
            instruction=inspect.getsource(_instruction),
            cohort=str(cohort),
            ledger=str(tmp_path / "l"),
        )
    )
    status_file = tmp_path / "status.json"
    sup = Supervisor(status_file, backoff_initial=600, stop_grace=5)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def hook(child: str, line: str) -> None:
        watch_line(sup, child, line)

    sup.add(Child("clientapp", [sys.executable, str(script)], env, tmp_path, hook))
    deadline = time.monotonic() + 120
    sup.run(until=lambda: "budget" in sup.status or time.monotonic() > deadline, poll=0.1)
    status = json.loads(status_file.read_text())
    assert status["budget_exhausted"] is True, status
    assert status["activity"] == "budget exhausted: refusing to train"
    assert status["budget"]["round"] == 1 and status["budget"]["epsilon_cap"] == 0.01
    assert "last_failed" not in status and "last_trained" not in status
