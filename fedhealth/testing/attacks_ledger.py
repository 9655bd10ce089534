"""Privacy rows on the site's ledger: every release charged, concurrent runs, a shortened ledger.

What a curious coordinator can do with instructions the site's policy allows: ask a round again
with another seed, learning rate or after the data changed, deliver it twice at once, send the
same instruction as two runs, race two runs at the cap. The ledger is also shortened behind the
site's back. Each row checks what left the site against what the ledger charged.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from fedhealth.privacy.policy import SitePolicy
from fedhealth.testing.attacks_rows import Row
from fedhealth.testing.attacks_site import CAP, DELTA, SITE, Site, outcome, update_bytes


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


def replay_after_purge(site: Site) -> Row:
    """Ask round 1 again, same global model, after round 3 made the site delete its update."""
    row = Row(
        "replay after the update was purged",
        "round 1, then round 3 (the site keeps only the last 2 rounds' updates), then round 1 "
        "again with the same global model (already charged: no new entry)",
        "refused (reply 1007 [policy: released]): never trained again under the first charge",
    )

    def ask(server_round: int) -> Any:
        msg = site.instruction(("rounds=3",), run="purged", server_round=server_round)
        return site.deliver(msg)

    first, third = update_bytes(ask(1)), update_bytes(ask(3))
    reply = ask(1)
    charged = [e for e in site.entries() if e[0] == "purged"]
    row.evidence += [f"rounds 1 and 3 released: {bool(first) and bool(third)}"]
    row.evidence += [f"round 1 again: {outcome(reply)}; ledger entries for the run: {len(charged)}"]
    row.refused = (
        bool(first)
        and bool(third)
        and reply.has_error()
        and reply.error.code == 1007
        and reply.error.reason.endswith("[policy: released]")
        and len(charged) == 2
    )
    row.happened = "refused, nothing trained or charged" if row.refused else "a second release"
    return row


def retry_while_training(site: Site) -> Row:
    """Deliver the same round twice at once: the retry must wait, then resend the same bytes."""
    row = Row(
        "retry while the first trains",
        "round 1 of a run delivered twice at the same moment (two ClientApp processes)",
        "both replies carry the same bytes; the ledger charges the round once",
    )
    msg = site.instruction(run="at-once")
    twin = site.instruction(run="at-once")
    replies: list[Any] = []
    threads = [
        threading.Thread(target=lambda m=m: replies.append(site.deliver(m))) for m in (msg, twin)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    sent = [update_bytes(r) for r in replies]
    charged = [e for e in site.entries() if e[0] == "at-once"]
    row.evidence += [f"two updates, identical: {len(sent) == 2 and sent[0] == sent[1]}"]
    row.evidence += [f"ledger entries for the run: {len(charged)}"]
    row.refused = len(sent) == 2 and bool(sent[0]) and sent[0] == sent[1] and len(charged) == 1
    row.happened = "one release, sent twice" if row.refused else "two releases under one charge"
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
    row.evidence += [f"reply: {outcome(reply)}"]
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
