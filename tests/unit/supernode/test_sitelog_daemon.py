"""The site daemon's log for hospital IT: one record per event, polls at debug level only, every
Flower line once, no JSON inside a JSON string, human lines on stderr, rotation by size.

Real processes print the lines (Flower's own logger, the paced SuperNode against a closed port,
a ClientApp's site event) and the real supervisor relays them."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedhealth.errors import ConfigError
from fedhealth.service.process import flower_env
from fedhealth.service.supervisor import Child, Relayed, Supervisor
from fedhealth.supernode.daemonlog import setup_site_logging
from fedhealth.supernode.settings import load
from fedhealth.supernode.sitestatus import watch_line

POLLS = 25
# What the SuperNode prints for each message it pulls and answers (Flower 1.39's own calls,
# start_client_internal._pull_and_store_message / _push_messages), through Flower's logger,
# with the logging the paced SuperNode configures.
_SUPERNODE_LIKE = f"""
import json, logging, sys
from logging import INFO
from fedhealth.supernode.paced import configure_logging
configure_logging()
from flwr.common.logger import log
from fedhealth.clientapp.events import Trained
from fedhealth.clientapp.sitelog import emit, install_site_logging
install_site_logging()
log(INFO, "Starting Flower SuperNode")
log(INFO, "SuperNode ID: %s", 42)
for n in range({POLLS}):
    for verb, done in (("Receiving", "Received"), ("Sending", "Sent")):
        log(INFO, "")
        log(INFO, "[RUN %s, ROUND %s]", 7, 1)
        log(INFO, "%s: %s message (ID: %s)", verb, "train", format(n, "064x"))
        log(INFO, "%s successfully", done)
emit(logging.getLogger("fedhealth.site"),
     Trained(site="a", round=1, loss=0.5, epsilon=1.0, epsilon_cap=8.0),
     "site %s round %d: trained", "a", 1)
print(json.dumps({{"ts": "2026-01-01T00:00:00Z", "level": "warning", "logger": "child.json",
                  "msg": "disk nearly full", "free_mb": 12}}), flush=True)
"""


@pytest.fixture
def site_logger():
    """Give the test the ``fedhealth`` logger, then put it back as it was."""
    logger = logging.getLogger("fedhealth")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield logger
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def _supervise(tmp_path: Path, argv: list[str], level: int, until=None, env=None):
    """Relay a child's lines through the site daemon's hook; return the records and stderr."""
    stderr = io.StringIO()
    setup_site_logging(tmp_path / "daemon.jsonl", level=level, stream=stderr)
    sup = Supervisor(tmp_path / "status.json", backoff_initial=600, stop_grace=5)

    def hook(child: str, line: str) -> Relayed:
        return watch_line(sup, child, line)

    child = sup.add(Child("supernode", argv, env or dict(os.environ), tmp_path, hook))
    deadline = time.monotonic() + 60
    done = until or (lambda: child.last_exit is not None)
    sup.run(until=lambda: done() or time.monotonic() > deadline, poll=0.05)
    return _records(tmp_path / "daemon.jsonl"), stderr.getvalue().splitlines(), sup


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _nested_json(value: object) -> bool:
    """Whether a value is, or holds, a string that is itself a JSON object or array."""
    if isinstance(value, dict):
        return any(_nested_json(v) for v in value.values())
    if isinstance(value, list):
        return any(_nested_json(v) for v in value)
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            return isinstance(json.loads(value), dict | list)
        except ValueError:
            return False
    return False


def _child_records(records: list[dict]) -> list[dict]:
    """The records of what the child printed (not the supervisor's start and exit records)."""
    own = ("child.start", "child.exit", "child.kill")
    return [r for r in records if r.get("child") == "supernode" and r.get("event") not in own]


def test_at_info_level_the_log_holds_state_changes_once_and_no_polls(tmp_path, site_logger):
    argv = [sys.executable, "-c", _SUPERNODE_LIKE]
    records, stderr, sup = _supervise(tmp_path, argv, logging.INFO)
    relayed = _child_records(records)
    texts = [r["msg"] for r in relayed]
    # the polls: absent; the state changes: once each
    assert not [t for t in texts if re.search(r"Receiving|Received|Sending|Sent|\[RUN", t)]
    assert texts.count("Starting Flower SuperNode") == 1  # not also as "INFO flwr: ..."
    (connected,) = [r for r in relayed if r.get("event") == "site.connected"]
    assert connected["node_id"] == "42" and connected["level"] == "info"
    (run,) = [r for r in relayed if r.get("event") == "site.run.started"]
    assert run["run_id"] == 7 and run["level"] == "info"
    # a site event: its fields are the record's fields, its words the message
    (trained,) = [r for r in relayed if r.get("event") == "site.round.trained"]
    assert trained["msg"] == "site a round 1: trained"
    assert (trained["round"], trained["loss"], trained["epsilon"]) == (1, 0.5, 1.0)
    assert sup.status["last_trained"]["round"] == 1
    # a JSON line: merged, its level and logger kept, its timestamp the daemon's own
    (child_json,) = [r for r in relayed if r.get("source") == "child.json"]
    assert child_json["msg"] == "disk nearly full" and child_json["free_mb"] == 12
    assert child_json["level"] == "warning" and child_json["ts"] != "2026-01-01T00:00:00Z"
    assert not [r for r in records if _nested_json(r)], "JSON inside a JSON string"
    assert len(relayed) == 5, texts  # started, connected, run started, trained, disk
    # stderr: the same records, one human line each
    assert len(stderr) == len(records)
    for line in stderr:
        assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ (INFO|WARNING|ERROR) +\S+: ", line), line
        with pytest.raises(ValueError):
            json.loads(line)
    assert any(line.endswith("supernode: site a round 1: trained") for line in stderr)


def test_at_debug_level_each_poll_line_is_there_once(tmp_path, site_logger):
    argv = [sys.executable, "-c", _SUPERNODE_LIKE]
    records, _, _ = _supervise(tmp_path, argv, logging.DEBUG)
    relayed = _child_records(records)
    sent = [r for r in relayed if r["msg"] == "Sent successfully"]
    assert len(sent) == POLLS and {r["level"] for r in sent} == {"debug"}  # once, not twice
    runs = [r for r in relayed if r["msg"].startswith("[RUN 7")]
    assert len(runs) == 2 * POLLS - 1 and {r["level"] for r in runs} == {"debug"}
    assert sum(r.get("event") == "site.run.started" for r in relayed) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_real_supernode_says_each_line_once_and_a_lost_link_once(tmp_path, site_logger):
    """The paced SuperNode against a port nobody listens on: it retries, with backoff."""
    argv = [
        sys.executable,
        "-m",
        "fedhealth.supernode.paced",
        "--pull-interval",
        "0.5",
        "--",
        "--superlink",
        f"127.0.0.1:{_free_port()}",
        "--insecure",
        "--port",
        str(_free_port()),
        "--isolation",
        "process",
    ]
    log = tmp_path / "daemon.jsonl"

    def retried_three_times() -> bool:
        text = log.read_text() if log.exists() else ""
        return text.count("Connection attempt failed") >= 3

    env = flower_env(tmp_path / "flwr", unbuffered=True)
    records, _, sup = _supervise(tmp_path, argv, logging.DEBUG, retried_three_times, env)
    relayed = _child_records(records)
    texts = [r["msg"] for r in relayed]
    assert texts.count("Starting Flower SuperNode") == 1, texts
    assert texts.count("FastAPI lifespan: startup") == 1, texts
    failed = [r for r in relayed if r["msg"].startswith("Connection attempt failed")]
    assert len(failed) >= 3, texts
    assert failed[0]["level"] == "warning" and failed[0]["event"] == "site.reconnecting"
    assert {r["level"] for r in failed[1:]} == {"debug"}  # still down: said once at info
    at_info = [r["msg"] for r in relayed if r["level"] != "debug"]  # what an idle site logs
    expected = (
        "SuperNode pull interval",
        "Starting Flower",
        "Option `--insecure`",
        "SuperNode term",
    )
    assert all(t.startswith((*expected, "Connection attempt failed")) for t in at_info), at_info
    assert sum(t.startswith("Connection attempt failed") for t in at_info) == 1, at_info


_PRINT_ONCE = """
import logging
import opacus  # its import gives the root logger a handler (logging.basicConfig)
from flwr.common.logger import log
{setup}
log(logging.INFO, "printed once")
"""


@pytest.mark.parametrize(
    "setup",
    [
        "from fedhealth.clientapp.sitelog import install_site_logging; install_site_logging()",
        "from fedhealth.supernode.warm import _child; "
        "_child(lambda spec: None, None, ())  # a warm task's start",
    ],
    ids=["subprocess-clientapp", "warm-task"],
)
def test_a_clientapp_process_prints_flowers_lines_once(setup):
    def count(code: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return (done.stdout + done.stderr).count("printed once")

    assert count(_PRINT_ONCE.format(setup="")) == 2  # the doubling this guards against
    assert count(_PRINT_ONCE.format(setup=setup)) == 1


def test_the_log_rotates_at_its_size_and_keeps_its_backups(tmp_path, site_logger):
    path = tmp_path / "daemon.jsonl"
    human = io.StringIO()
    setup_site_logging(path, max_bytes=2048, backups=2, stream=human)
    log = logging.getLogger("fedhealth.site")
    for n in range(300):
        log.info("record %d", n, extra={"fields": {"event": "test", "n": n}})
    files = [path, path.with_name("daemon.jsonl.1"), path.with_name("daemon.jsonl.2")]
    assert all(f.is_file() for f in files)
    assert not path.with_name("daemon.jsonl.3").exists()  # the oldest beyond 2 backups: gone
    assert all(f.stat().st_size <= 2048 for f in files)
    kept = [r for f in reversed(files) for r in _records(f)]  # oldest first
    numbers = [r["n"] for r in kept if r.get("event") == "test"]
    assert numbers == list(range(numbers[0], 300)) and numbers[0] > 0  # contiguous, newest kept
    for f in files[:2]:  # each file after a rotation starts by saying so
        first = _records(f)[0]
        assert first["event"] == "log.rotated" and "daemon.jsonl.1" in first["msg"]
    assert len(human.getvalue().splitlines()) == 300  # stderr is not rotated, nor JSON
    assert human.getvalue().splitlines()[-1].endswith("INFO    daemon: record 299")


def test_log_settings_have_defaults_and_limits(tmp_path):
    base = ["name=a", "coordinator=h:1", "data_dir=d", "ledger_dir=l", f"state_dir={tmp_path}"]
    s = load(None, base, insecure=True)
    assert (s.log_level, s.log_max_bytes, s.log_backups) == ("info", 10_000_000, 5)
    assert load(None, [*base, "log_level=debug"], insecure=True).log_level_number == logging.DEBUG
    with pytest.raises(ConfigError, match="log_level='loud'"):
        load(None, [*base, "log_level=loud"], insecure=True)
    with pytest.raises(ConfigError, match="log_backups=0"):
        load(None, [*base, "log_backups=0"], insecure=True)
    with pytest.raises(ConfigError, match="log_max_bytes=10"):
        load(None, [*base, "log_max_bytes=10"], insecure=True)


_POLLING_EXECUTOR = """
import logging, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
import httpx
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.send_response(200 if self.path == "/acquire-task" else 503)
        self.end_headers()
    def log_message(self, *args):
        pass
server = HTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_port}"
for _ in range(10):
    httpx.post(url + "/acquire-task")
httpx.post(url + "/down")
"""


def test_without_a_hook_the_supervisor_logs_successful_polls_at_debug_only(tmp_path, site_logger):
    """The coordinator's executors poll over HTTP twice a second; httpx logs each request."""
    setup_site_logging(tmp_path / "daemon.jsonl", stream=io.StringIO())
    sup = Supervisor(tmp_path / "status.json", backoff_initial=600, stop_grace=5)
    child = sup.add(
        Child("executor", [sys.executable, "-c", _POLLING_EXECUTOR], dict(os.environ), tmp_path)
    )
    deadline = time.monotonic() + 60
    sup.run(until=lambda: child.last_exit is not None or time.monotonic() > deadline, poll=0.05)
    relayed = [r for r in _records(tmp_path / "daemon.jsonl") if r["event"] == "child.output"]
    (failed,) = relayed  # the ten successful polls: not at info level
    assert failed["level"] == "info" and failed["msg"].endswith(
        '/down "HTTP/1.0 503 Service Unavailable"'
    )
