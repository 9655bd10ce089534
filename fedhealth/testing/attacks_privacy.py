"""Privacy attacks on a site: what a curious coordinator can send, against the site's own ledger.

The site approves the app, not the messages: a coordinator (or whoever runs its SuperLink) can
send the approved ClientApp any instruction, with any run config, any round, any model. Each
row here sends such instructions to the site's real ClientApp (:func:`fedhealth.clientapp.app.
make_client_app`, called as Flower's SuperNode calls it) with a real ledger, on real NIfTI data,
and checks what left the site and what the ledger says: the site's policy refuses before
anything is charged, every update that leaves is charged (a retry resends the stored bytes),
concurrent runs never pass the cap together (recomputed with Google's ``dp-accounting``), and a
shortened ledger stops training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedhealth.privacy.policy import SitePolicy
from fedhealth.testing.attacks_rows import Row

SITE = "hospital-p"
CAP, DELTA = 8.0, 1e-5
# A tiny run of the attack lab's shape: a small U-Net on 32 mm patients, two rounds.
OVERRIDES = (
    "rounds=2",
    "model.channels=[4,8]",
    "model.strides=[2]",
    "train.local_epochs=1",
    "train.batch_size=2",
    "data.roi=32",
)


class Site:
    """One site's ClientApp, node config and ledger, as its SuperNode runs them.

    Parameters
    ----------
    root : Path
        The site's own directory (ledger and state), created.
    data : Path
        The site's data directory (only ever read).
    policy : SitePolicy
        The site's privacy policy (site.yaml ``policy:``).
    """

    def __init__(self, root: Path, data: Path, policy: SitePolicy) -> None:
        from fedhealth.clientapp.app import make_client_app

        self.root, self.data, self.policy = root, data, policy
        self.ledger = root / "ledger"
        self.ledger.mkdir(parents=True, exist_ok=True)
        self.app = make_client_app()

    def context(self) -> Any:
        """Return Flower's context with the node config the site daemon writes from site.yaml."""
        from flwr.app import Context, RecordDict

        from fedhealth.protocol import keys as K

        node: dict[str, bool | float | int | str] = {
            K.NODE_DATA_DIR: str(self.data),
            K.NODE_SITE_NAME: SITE,
            K.NODE_LEDGER_DIR: str(self.ledger),
            K.NODE_EPSILON_CAP: CAP,
            K.NODE_DELTA: DELTA,
            K.NODE_POLICY: self.policy.to_json(),
        }
        return Context(run_id=1, node_id=0, node_config=node, state=RecordDict(), run_config={})

    def instruction(
        self,
        overrides: tuple[str, ...] = (),
        *,
        run: str = "run-a",
        server_round: int = 1,
        message_type: str = "train",
    ) -> Any:
        """Build one train instruction as the coordinator would (Hydra: one thread at a time).

        The global model is the same for the same run config (MONAI's init from the run's seed).
        """
        import torch
        from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, Message, RecordDict

        from fedhealth.config import compose, site_settings
        from fedhealth.models import build_model
        from fedhealth.protocol import keys as K

        cfg = compose([*OVERRIDES, *overrides])
        torch.manual_seed(0)  # the coordinator's global model: the same bytes every time
        settings: dict[str, ConfigRecordValues] = {
            **site_settings(cfg),
            K.SERVER_ROUND: server_round,
            K.RUN_KEY: run,
        }
        content = RecordDict(
            {
                K.ARRAYS: ArrayRecord(build_model(cfg.model).state_dict()),
                K.CONFIG: ConfigRecord(settings),
            }
        )
        return Message(content, 0, message_type)

    def deliver(self, msg: Any) -> Any:
        """Hand ``msg`` to the site's ClientApp, as its SuperNode does; return the reply."""
        return self.app(msg, self.context())

    def send(self, overrides: tuple[str, ...] = (), *, run: str = "run-a") -> Any:
        """Build and deliver a round-1 train instruction; return the site's reply."""
        return self.deliver(self.instruction(overrides, run=run))

    def entries(self) -> list[tuple[str, int, float]]:
        """Return the ledger's entries as ``(run, round, epsilon after)``."""
        from fedhealth.privacy.ledger import PrivacyLedger

        if not (self.ledger / "ledger.sqlite").exists():
            return []
        with PrivacyLedger(self.ledger / "ledger.sqlite", SITE) as db:
            return [(e.run, e.round, e.epsilon_after) for e in db.entries]

    def phases(self) -> list[tuple[float, float, int]]:
        """Return the ledger's DP phases ``(noise multiplier, sample rate, steps)``."""
        from fedhealth.privacy.ledger import PrivacyLedger

        with PrivacyLedger(self.ledger / "ledger.sqlite", SITE) as db:
            return list(db.history())

    def snapshot(self) -> str:
        """Return sha256 over every file under the ledger directory (ledger, mark, releases)."""
        digest = hashlib.sha256()
        for path in sorted(p for p in self.ledger.rglob("*") if p.is_file()):
            digest.update(path.relative_to(self.ledger).as_posix().encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()


def update_bytes(reply: Any) -> bytes:
    """Return the update a train reply carries, as bytes (empty for an error reply)."""
    from fedhealth.protocol import keys as K

    if reply.has_error() or K.ARRAYS not in reply.content.array_records:
        return b""
    arrays = reply.content.array_records[K.ARRAYS]
    return b"".join(arrays[key].data for key in sorted(arrays))


def _outcome(reply: Any) -> str:
    if reply.has_error():
        return f"error {reply.error.code}: ...{reply.error.reason[-60:]}"
    return f"an update ({len(update_bytes(reply))} bytes)"


def _refused_before_training(
    site: Site, name: str, tried: str, send: Callable[[], Any], field: str
) -> Row:
    """Check that ``send`` is refused with reply 1007 naming ``field`` and nothing is charged."""
    row = Row(name, tried, f"reply 1007 [policy: {field}]; ledger unchanged, no update")
    before = site.snapshot()
    reply = send()
    after = site.snapshot()
    row.evidence += [f"reply: {_outcome(reply)}", f"ledger files unchanged: {before == after}"]
    row.refused = (
        reply.has_error()
        and reply.error.code == 1007
        and reply.error.reason.endswith(f"[policy: {field}]")
        and before == after
    )
    row.happened = "refused before training, nothing charged" if row.refused else "NOT refused"
    return row


def policy_rows(strict: Site, plain: Site) -> list[Row]:
    """Send one instruction per field the site's policy bounds: each refused, nothing charged.

    ``strict`` keeps the default policy (DP and secure aggregation required); ``plain`` allows
    plain train instructions, so each bound is the first limit its instruction breaks.
    """
    cases = [
        ("DP switched off", strict, ("privacy=off",), "require_dp"),
        ("plain train, secure agg. required", strict, (), "require_secure_aggregation"),
        ("rounds over the site's limit", plain, ("rounds=500",), "max_rounds_per_run"),
        ("clip norm out of bounds", plain, ("privacy.max_grad_norm=1000",), "max_grad_norm"),
        ("local epochs over the limit", plain, ("train.local_epochs=50",), "max_local_epochs"),
        ("learning rate out of bounds", plain, ("train.lr=50",), "lr"),
        ("a model the site does not train", plain, ("model=segresnet",), "models"),
        ("noise above ceiling", plain, ("privacy.noise_multiplier=40",), "max_noise_multiplier"),
    ]  # fmt: skip
    rows = []
    for name, site, overrides, field in cases:

        def send(site: Site = site, overrides: tuple[str, ...] = overrides) -> Any:
            return site.send(overrides)

        tried = f"a train instruction with {' '.join(overrides) or 'no secure aggregation'}"
        rows.append(_refused_before_training(site, name, tried, send, field))
    return rows


def secure_sum_too_small(site: Site) -> Row:
    """Announce a secure sum of two sites (each could subtract its own update from the sum)."""
    from flwr.app import ConfigRecord, ConfigRecordValues, Message, RecordDict

    from fedhealth.protocol import keys as K

    def advertise() -> Any:
        record: dict[str, ConfigRecordValues] = {
            K.SECAGG_SITE_ID: 1,
            K.SECAGG_NEIGHBOURS: [2],
            K.SECAGG_THRESHOLD: 2,
            K.SECAGG_CLIP: 8.0,
            K.SECAGG_LEVELS: 1 << 20,
            K.SECAGG_MAX_EXAMPLES: 1024,
            K.SECAGG_SIZE: 2,
        }
        content = RecordDict({K.SECAGG: ConfigRecord(record)})
        return site.app(Message(content, 0, f"train.{K.STAGE_ADVERTISE}"), site.context())

    return _refused_before_training(
        site,
        "secure sum of 2 sites",
        "a secure-aggregation round announcing 2 sites (the site's policy: at least 3)",
        advertise,
        "min_secagg_sites",
    )


def replays(site: Site, other_data: Path) -> Row:
    """Ask round 1 again with another seed, learning rate, or after the data changed."""
    row = Row(
        "replay: other seed, lr, dataset",
        "round 1 of run-a asked again with seed=123, with train.lr=0.05, and after the site's "
        "dataset changed (one patient fewer), each with the same global model",
        "each retry resends the first update byte for byte; the ledger keeps one entry",
    )
    first = update_bytes(site.send(run="replay"))
    again = [
        update_bytes(site.send(("seed=123",), run="replay")),
        update_bytes(site.send(("train.lr=0.05",), run="replay")),
    ]
    data, site.data = site.data, other_data
    try:
        again.append(update_bytes(site.send(run="replay")))
    finally:
        site.data = data
    charged = [e for e in site.entries() if e[0] == "replay"]
    same = [a == first for a in again]
    row.evidence += [f"first update {len(first)} bytes; retries identical: {same}"]
    row.evidence += [f"ledger entries for the run: {len(charged)}"]
    row.refused = bool(first) and all(same) and len(charged) == 1
    row.happened = "the same bytes resent, charged once" if row.refused else "a new release"
    return row


def same_instruction_twice(site: Site) -> Row:
    """Send the same instruction in two runs: the updates must differ, both charged."""
    row = Row(
        "same instruction, two runs",
        "the same run config, seed, round and global model sent as two runs",
        "two different updates (noise from the site's secret randomness), each charged",
    )
    before = len(site.entries())
    one = update_bytes(site.send(run="twice-1"))
    two = update_bytes(site.send(run="twice-2"))
    added = len(site.entries()) - before
    row.evidence += [f"updates differ: {one != two}; ledger entries added: {added}"]
    row.refused = bool(one) and bool(two) and one != two and added == 2
    row.happened = "different noise, two charges" if row.refused else "reproducible or uncharged"
    return row


def concurrent_runs(root: Path, data: Path, policy: SitePolicy, rate: float, steps: int) -> Row:
    """Send two runs at once to a ledger near its cap: never both past it."""
    from fedhealth.privacy.accounting import plan_noise
    from fedhealth.privacy.budget import RoundRequest, SiteBudget, charge_round
    from fedhealth.privacy.independent import independent_epsilon
    from fedhealth.privacy.ledger import PrivacyLedger

    site = Site(root, data, policy)  # rate and steps: as the site measured them for this run
    earlier = plan_noise([], rate, steps, 6.0, DELTA)  # a past run spent about 6 of 8
    assert earlier is not None
    with PrivacyLedger(site.ledger / "ledger.sqlite", SITE) as db:
        past = RoundRequest("earlier", 1, 1, rate, steps, 0.5, "rdp", fixed_noise=earlier)
        charge_round(db, SiteBudget(CAP, DELTA, db.path), past, "earlier", SITE)
    sigma = plan_noise([(earlier, rate, steps)], rate, steps, 7.5, DELTA)  # each fits alone
    row = Row(
        "concurrent runs at the cap",
        f"two runs sent at once to a ledger at epsilon ~6 of {CAP:g}, each asking a round that "
        f"fits alone (noise {sigma:.3f})",
        "one trains, the other is refused (1004); the composed epsilon (dp-accounting) <= cap",
    )
    replies: dict[str, Any] = {}

    sent = {n: site.instruction((f"privacy.noise_multiplier={sigma}",), run=n) for n in "xy"}

    def run(name: str) -> None:
        replies[name] = site.deliver(sent[name])

    threads = [threading.Thread(target=run, args=(n,)) for n in sent]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    released = [n for n, r in replies.items() if update_bytes(r)]
    refused = [n for n, r in replies.items() if r.has_error() and r.error.code == 1004]
    composed = independent_epsilon(site.phases(), DELTA)
    row.evidence += [
        f"released: {released}; refused with 1004: {refused}",
        f"ledger entries: {len(site.entries())}; composed epsilon (dp-accounting) {composed:.3f}",
    ]
    row.refused = len(released) == 1 and len(refused) == 1 and composed <= CAP
    row.happened = "one run charged, one refused" if row.refused else "both passed"
    return row


def truncated_ledger(site: Site) -> Row:
    """Delete the ledger's last entry: training must stop."""
    row = Row(
        "ledger truncation",
        "the last entry deleted from the site's ledger.sqlite, then a new round sent",
        "reply 1005 (ledger), nothing trained; the site stops until the ledger is restored",
    )
    path = site.ledger / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        table = next(t for t in tables if "entr" in t)
        db.execute(f"DELETE FROM {table} WHERE rowid = (SELECT MAX(rowid) FROM {table})")  # noqa: S608
    reply = site.send(run="after-truncation")
    row.evidence += [f"reply: {_outcome(reply)}"]
    row.refused = reply.has_error() and reply.error.code == 1005
    row.happened = "refused: the ledger shrank" if row.refused else "trained on a shortened ledger"
    return row


def one_patient_fewer(data: Path, out: Path) -> Path:
    """Copy ``data``'s datalist without its first training patient (image paths absolute)."""
    raw = json.loads((data / "dataset.json").read_text())
    for key in ("training", "test"):
        for entry in raw[key]:
            for name in ("image", "label"):
                entry[name] = str((data / entry[name]).resolve())
    raw["training"] = raw["training"][1:]
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps(raw))
    return out


def privacy_rows(workdir: Path, data: Path) -> list[Row]:
    """Run every privacy row against fresh sites under ``workdir`` (``data`` is only read).

    Parameters
    ----------
    workdir : Path
        Where the sites' ledgers go (created).
    data : Path
        A site's data directory (a Decathlon ``dataset.json`` with patient ids).

    Returns
    -------
    list of Row
        The rows, in the table's order.
    """
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    workdir.mkdir(parents=True, exist_ok=True)
    strict = Site(workdir / "strict", data, SitePolicy(models=["unet"]))
    plain_policy = dataclasses.replace(strict.policy, require_secure_aggregation=False)
    plain = Site(workdir / "plain", data, plain_policy)
    rows = policy_rows(strict, plain)
    rows.append(secure_sum_too_small(strict))
    rows.append(replays(plain, one_patient_fewer(data, workdir / "changed-data")))
    rows.append(same_instruction_twice(plain))
    _, rate, steps = plain.phases()[0]  # what one round of this run costs at this site
    rows.append(truncated_ledger(plain))
    rows.append(concurrent_runs(workdir / "concurrent", data, plain_policy, rate, int(steps)))
    shutil.rmtree(workdir / "changed-data", ignore_errors=True)
    return rows
