"""The attacks, one function each: what is tried, what must refuse it, what happened, evidence.

Each function returns a :class:`Row` whose ``refused`` is computed from what was observed, so a
row fails when its defence is missing (a Control API reachable from a site's vantage answers,
a plaintext HTTP/2 handshake is answered, an app's code leaves its marker).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhealth.service.process import BIN, stop_groups
from fedhealth.superlink.service import wait_port
from fedhealth.testing.attacks_lab import OPERATOR, Lab
from fedhealth.testing.loopback import free_ports, superlink_listen

ACTIVATED = "SuperNode ID:"  # Flower's SuperNode logs its node id once the SuperLink accepted it
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@dataclass
class Row:
    """One attack's outcome.

    Parameters
    ----------
    attack : str
        Short name.
    tried : str
        What was tried.
    expected : str
        The refusal that must happen.
    happened : str
        What happened (filled in by the attack).
    evidence : list of str
        Observations backing ``happened``.
    refused : bool or None
        True: refused as expected (a check: held); False: not; None: could not be tried.
    check : bool
        A check that the consortium still works (the real run), not an attack (default False).
    """

    attack: str
    tried: str
    expected: str
    happened: str = ""
    evidence: list[str] = field(default_factory=list)
    refused: bool | None = None
    check: bool = False


def flwr_try(
    env: dict[str, str], args: list[str], timeout: float = 60.0, *, json_out: bool = True
) -> dict[str, Any]:
    """Run ``flwr <args> --format json`` and report what came back.

    Parameters
    ----------
    env : dict of str to str
        Environment with ``FLWR_HOME`` (its ``config.toml`` holds the connections).
    args : list of str
        The subcommand and its arguments.
    timeout : float, optional
        Seconds (default 60).
    json_out : bool, optional
        Keyword-only. Ask for ``--format json`` (default True; ``flwr log`` has no such
        option: success is its exit status 0).

    Returns
    -------
    dict
        ``ok`` (Flower said success), ``rc``, ``answer`` (the JSON object or None) and
        ``said`` (Flower's error message or the output's tail, one line).
    """
    try:
        done = subprocess.run(
            [str(BIN / "flwr"), *args, *(["--format", "json"] if json_out else [])],
            env=env,
            cwd=env["FLWR_HOME"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "rc": None, "answer": None, "said": f"no answer in {timeout:.0f}s"}
    answer: Any = None
    try:
        answer = json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError:
        pass
    ok = done.returncode == 0 and (
        not json_out or (isinstance(answer, dict) and bool(answer.get("success", True)))
    )
    said = answer.get("error-message", "") if isinstance(answer, dict) else ""
    text = str(said or done.stdout + done.stderr)
    said = " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())[-200:]
    return {"ok": ok, "rc": done.returncode, "answer": answer, "said": said}


def attacker_connections(lab: Lab) -> dict[str, str]:
    """Write the attacker's ``flwr`` connections: every address a site can reach.

    Parameters
    ----------
    lab : Lab
        The consortium.

    Returns
    -------
    dict of str to str
        Connection name -> ``host:port``: the Fleet port on loopback and on the host's
        external address, and the Control port on the external address.
    """
    targets = {"fleet-loopback": f"127.0.0.1:{lab.port}"}
    if lab.external:
        targets["fleet-external"] = f"{lab.external}:{lab.port}"
        targets["control-external"] = f"{lab.external}:{lab.control}"
    home = Path(lab.attacker_env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    ca = lab.attacker / "ca.crt"
    text = '[superlink]\ndefault = "fleet-loopback"\n'
    for name, address in targets.items():
        text += f'\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    (home / "config.toml").write_text(text)
    return targets


def operator_nodes(lab: Lab) -> list[dict[str, Any]]:
    """List the SuperLink's nodes, asked through the operator's loopback Control API."""
    got = flwr_try(lab.operator_env, ["supernode", "ls", OPERATOR])
    nodes = got["answer"].get("nodes", []) if got["ok"] else []
    return [n for n in nodes if isinstance(n, dict)]


def operator_runs(lab: Lab) -> list[dict[str, Any]]:
    """Every run the SuperLink knows, asked through the operator's Control API."""
    got = flwr_try(lab.operator_env, ["ls", OPERATOR])
    runs = got["answer"].get("runs", []) if got["ok"] else []
    return [r for r in runs if isinstance(r, dict)]


def control_attack(lab: Lab, targets: dict[str, str], verb: str, args: list[str]) -> Row:
    """Rows 2-5: a Control API command with a site's credentials against every reachable address.

    Parameters
    ----------
    lab : Lab
        The consortium.
    targets : dict of str to str
        The attacker's connections (:func:`attacker_connections`).
    verb : str
        ``ls``, ``log``, ``stop`` or ``run``.
    args : list of str
        The command's arguments before the connection name.

    Returns
    -------
    Row
        Refused when no address gave a successful answer (and, for ``run``, no new run).
    """
    runs_before = len(operator_runs(lab))
    row = Row(
        f"control API: flwr {verb}",
        f"`flwr {verb}` with the site's ca.crt (+ its auth key at hand) against "
        + ", ".join(targets.values()),
        "refused or unreachable at every address (Control API on coordinator loopback only)",
    )
    answered = []
    plain = verb == "log"
    if verb in ("ls", "log"):  # the same command from the operator's loopback must work
        own = flwr_try(lab.operator_env, [*args, OPERATOR], timeout=45, json_out=not plain)
        row.evidence.append(
            f"control: the operator's loopback 127.0.0.1:{lab.control} "
            + ("answered" if own["ok"] else f"did NOT answer: {own['said']}")
        )
    for name, address in targets.items():
        got = flwr_try(lab.attacker_env, [*args, name], timeout=45, json_out=not plain)
        row.evidence.append(f"{address}: {'ANSWERED' if got['ok'] else 'refused'}: {got['said']}")
        if got["ok"]:
            answered.append(address)
    runs_after = len(operator_runs(lab))
    row.evidence.append(f"runs on the SuperLink before/after: {runs_before}/{runs_after}")
    row.refused = not answered and (verb != "run" or runs_after == runs_before)
    row.happened = "refused everywhere" if row.refused else f"answered at {', '.join(answered)}"
    return row


def start_node(
    lab: Lab, name: str, superlink: str, tls: list[str], key: Path | None
) -> subprocess.Popen[bytes]:
    """Start a bare ``flower-supernode`` as an attacker would (its log: ``<name>.log``)."""
    (port,) = free_ports(1)
    auth = ["--auth-supernode-private-key", str(key)] if key else []
    return lab.procs.start(
        name,
        ["flower-supernode", "--superlink", superlink, "--port", str(port), *tls, *auth],
    )


def watch_node(
    lab: Lab, name: str, proc: subprocess.Popen[bytes], needle: str, timeout: float = 40.0
) -> tuple[bool, str]:
    """Wait until the node's log shows ``needle`` or activation, or the node exits; stop it.

    Returns
    -------
    tuple of (bool, str)
        Whether it was activated (joined the federation), and an evidence line.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        text = lab.log(name)
        if needle in text or ACTIVATED in text:
            break
        time.sleep(0.5)
    text = lab.log(name)
    if proc.poll() is None:
        stop_groups([proc], grace=5)
    activated = ACTIVATED in text
    shown = f"{needle!r} {'in' if needle in text else 'NOT in'} its log"
    return activated, f"{name}: exit {proc.returncode}, {shown}, activated: {activated}"


def rogue_registration(lab: Lab, targets: dict[str, str]) -> Row:
    """Row 1: register a fresh key from a site's vantage, then join with it."""
    pub, key = (lab.attacker / "sites" / "rogue" / f for f in ("auth.pub", "auth.key"))
    row = Row(
        "rogue registration",
        "`flwr supernode register` of a fresh key (site vantage: fleet address + ca.crt) at "
        + ", ".join(targets.values())
        + "; then a SuperNode with that key joins",
        "no Control API at any site-reachable address; the unregistered node is refused "
        "by Flower's auth interceptor and is in no run",
    )
    nodes_before = len(operator_nodes(lab))
    registered = []
    for name, address in targets.items():
        got = flwr_try(lab.attacker_env, ["supernode", "register", str(pub), name, "--name", "x"])
        row.evidence.append(
            f"register at {address}: {'ACCEPTED' if got['ok'] else 'refused'}: {got['said']}"
        )
        if got["ok"]:
            registered.append(address)
    if not lab.external:
        row.evidence.append("no non-loopback address on this host: external sub-tries skipped")
    for address in targets.values():
        host, port = address.rsplit(":", 1)
        row.evidence.append(f"{address}: {tls_version((host, int(port)), lab.attacker / 'ca.crt')}")
    proc = start_node(
        lab,
        "rogue-node",
        f"127.0.0.1:{lab.port}",
        ["--root-certificates", str(lab.attacker / "ca.crt")],
        key,
    )
    activated, line = watch_node(lab, "rogue-node", proc, "Failed to activate")
    nodes_after = len(operator_nodes(lab))
    row.evidence += [line, f"nodes on the SuperLink before/after: {nodes_before}/{nodes_after}"]
    row.refused = not registered and not activated and nodes_after == nodes_before
    row.happened = (
        "registration unreachable; node refused activation"
        if row.refused
        else f"registered at {registered or '-'}, activated: {activated}"
    )
    return row


def unregistered_site(lab: Lab) -> Row:
    """Row 10: a full site daemon with a valid key (``fedhealth certs site``) never enrolled."""
    row = Row(
        "unregistered key",
        "`fedhealth site run` with a valid ECDSA key from `fedhealth certs site intruder`, "
        "never enrolled by the operator",
        "SuperNode activation refused (auth interceptor); daemon state `refused`",
    )
    key = lab.certs / "sites" / "intruder" / "auth.key"
    (appio,) = free_ports(1)
    config = lab.site_yaml("intruder", key, lab.site_data("site-1"), appio)
    proc = lab.procs.start("intruder", ["fedhealth", "site", "run", "--config", str(config)])
    state_dir = lab.site_dir("intruder") / "state"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and lab.status(state_dir).get("state") not in (
        "refused",
        "connected",
    ):
        time.sleep(0.5)
    status = lab.status(state_dir)
    stop_groups([proc], grace=10)
    text = lab.log("intruder")
    row.evidence += [
        f"daemon state: {status.get('state')!r} ({status.get('reason', '')})",
        f"'Failed to activate' in its log: {'Failed to activate' in text}; "
        f"activated ({ACTIVATED!r}): {ACTIVATED in text}",
    ]
    row.refused = status.get("state") == "refused" and ACTIVATED not in text
    row.happened = "refused at activation" if row.refused else f"state {status.get('state')}"
    return row


def plaintext(lab: Lab) -> Row:
    """Row 8: an insecure SuperNode and a plaintext HTTP/2 client at the Fleet port."""
    row = Row(
        "plaintext",
        "`flower-supernode --insecure` (no TLS) and a raw plaintext HTTP/2 (h2c) preface to "
        f"127.0.0.1:{lab.port}",
        "no plaintext answer: TLS only (the node never activates; no HTTP/2 SETTINGS frame)",
    )
    proc = start_node(lab, "plaintext-node", f"127.0.0.1:{lab.port}", ["--insecure"], None)
    activated, line = watch_node(lab, "plaintext-node", proc, "Connection attempt failed")
    reply = b""
    try:
        with socket.create_connection(("127.0.0.1", lab.port), timeout=5) as sock:
            sock.sendall(H2_PREFACE)
            sock.settimeout(5)
            reply = sock.recv(64)
    except OSError as exc:
        row.evidence.append(f"h2c: {type(exc).__name__}: {exc}")
    h2_answer = len(reply) >= 9 and reply[3] == 0x04  # a SETTINGS frame: plaintext gRPC
    row.evidence += [
        line,
        f"h2c preface answered with {reply[:16].hex() or 'nothing'} (HTTP/2 SETTINGS: {h2_answer})",
    ]
    row.refused = not activated and not h2_answer
    row.happened = "no plaintext session" if row.refused else "plaintext accepted"
    return row


def tls_version(address: tuple[str, int], ca: Path) -> str:
    """Handshake with ``address`` trusting ``ca``; the TLS version, or why it failed."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    try:
        with socket.create_connection(address, timeout=5) as raw:
            with ctx.wrap_socket(raw) as tls:
                return f"handshake OK ({tls.version()})"
    except (OSError, ssl.SSLError) as exc:
        return f"handshake failed: {exc}"


def foreign_ca(lab: Lab) -> Row:
    """Row 9: a node trusting a foreign CA; a site facing a coordinator with a foreign cert."""
    row = Row(
        "foreign CA",
        "a SuperNode (enrolled key) trusting another CA joins the real coordinator; the real "
        "site-1 (consortium ca.crt, its key) meets an impostor coordinator whose cert another "
        "CA signed",
        "TLS verification fails both ways (CERTIFICATE_VERIFY_FAILED); no activation",
    )
    key = lab.certs / "sites" / "site-1" / "auth.key"
    foreign_root = ["--root-certificates", str(lab.foreign / "ca.crt")]
    proc = start_node(lab, "foreign-trust-node", f"127.0.0.1:{lab.port}", foreign_root, key)
    activated_a, line_a = watch_node(lab, "foreign-trust-node", proc, "CERTIFICATE_VERIFY_FAILED")
    fleet, control = free_ports(2)
    impostor = lab.procs.start(
        "impostor-superlink",
        [
            "flower-superlink",
            *superlink_listen(fleet, control),
            "--ssl-ca-certfile",
            str(lab.foreign / "ca.crt"),
            "--ssl-certfile",
            str(lab.foreign / "server.crt"),
            "--ssl-keyfile",
            str(lab.foreign / "server.key"),
            "--disable-runtime-dependency-installation",
        ],
    )
    try:
        wait_port("127.0.0.1", fleet, 60)
        row.evidence.append(
            "impostor checked against the consortium CA: "
            + tls_version(("127.0.0.1", fleet), lab.certs / "ca.crt")
        )
        real_root = ["--root-certificates", str(lab.certs / "ca.crt")]
        proc = start_node(lab, "site-vs-impostor", f"127.0.0.1:{fleet}", real_root, key)
        activated_b, line_b = watch_node(lab, "site-vs-impostor", proc, "CERTIFICATE_VERIFY_FAILED")
    finally:
        stop_groups([impostor], grace=5, kill_leftovers=True)
    row.evidence += [line_a, line_b]
    verify_failed = all(
        "CERTIFICATE_VERIFY_FAILED" in lab.log(n)
        for n in ("foreign-trust-node", "site-vs-impostor")
    )
    row.refused = verify_failed and not activated_a and not activated_b
    row.happened = "TLS verification failed both ways" if row.refused else "a foreign-CA link held"
    return row
