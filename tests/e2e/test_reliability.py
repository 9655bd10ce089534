"""Faults of real networks on a real consortium (TLS, enrolled sites, site daemons, coordinator
service): a site killed mid-round, too few sites, the coordinator killed mid-run. Real processes,
real signals; every wait has a deadline."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedhealth.clientapp import handlers as site_handler
from fedhealth.config import compose, site_settings
from fedhealth.models import build_model
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.protocol.packing import layout, pack, unpack
from fedhealth.runs.checkpoint import CheckpointStore
from fedhealth.runs.rundir import read_metrics
from fedhealth.simulation import simulate

from .consortium import Consortium

pytestmark = pytest.mark.slow

DP_RUN = ["train.local_epochs=1", "federation.round_timeout=90", "strategy.min_sites=3"]


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def _completed(run_dir: Path) -> int:
    """Rounds whose global model is checkpointed (a round's metrics line waits for the folded
    evaluation that comes with the next round's train replies)."""
    path = run_dir / "manifest.json"
    return int(json.loads(path.read_text())["rounds_completed"]) if path.is_file() else 0


def _ledger_rounds(path: Path) -> list[tuple[str, int]]:
    with PrivacyLedger(path) as ledger:
        return [(e.run, e.round) for e in ledger.verify()]


def test_too_few_sites_ends_cleanly_after_the_deadline(cohort, tmp_path):
    c = Consortium(tmp_path, cohort, sites=3)
    try:
        c.start_coordinator()
        for name in c.names[:2]:  # the third enrolled site never comes
            c.start_site(name)
        c.wait_connected(c.names[:2])
        run_dir = tmp_path / "runs" / "few"
        launch = c.launch(
            [
                *DP_RUN,
                "rounds=2",
                "federation.round_timeout=15",
                f"run_root={run_dir.parent}",
                "run_name=few",
            ],
            timeout=300,
        )
        assert c.wait_exit(launch, 300) == 1, c.log("launch")
    finally:
        c.stop()
    manifest = _manifest(run_dir)
    assert "only 2 of the 3 required sites connected within 15s" in manifest["stopped"]["reason"]
    assert manifest["rounds_completed"] == 0
    assert CheckpointStore(run_dir / "checkpoints").rounds() == [0]  # global model unchanged
    assert "run stopped early" in c.log("launch")
    for name in c.names[:2]:  # no site trained or spent anything
        assert (
            not (c.site_dir(name) / "ledger" / "ledger.sqlite").exists()
            or _ledger_rounds(c.site_dir(name) / "ledger" / "ledger.sqlite") == []
        )


def test_site_killed_mid_round_round_completes_with_the_others(cohort, tmp_path, flower_identity):
    c = Consortium(tmp_path, cohort, sites=4)
    victim = "site-3"
    run_dir = tmp_path / "runs" / "kill-site"
    overrides = [*DP_RUN, "sites=4", "rounds=3", f"run_root={run_dir.parent}", "run_name=kill-site"]
    try:
        c.start_coordinator()
        for name in c.names:
            c.start_site(name)
        c.wait_connected(c.names)
        launch = c.launch(overrides)
        state = c.site_dir(victim) / "state"

        def training_round_2() -> bool:  # the victim got round 2's training instruction
            return _completed(run_dir) >= 1 and "train round 2" in str(
                c.status(state).get("activity")
            )

        c.wait(training_round_2, 400, f"{victim} training in round 2")
        for child in c.status(state)["children"].values():  # SuperNode + its ClientApps
            c.kill_group(child["pid"], signal.SIGKILL)
        assert c.wait_exit(launch, 600) == 0, c.log("launch")
    finally:
        c.stop()

    lines = read_metrics(run_dir)
    assert [ln["round"] for ln in lines] == [0, 1, 2, 3]
    assert set(lines[2]["train"]["sites"]) == {"site-0", "site-1", "site-2"}
    assert victim in lines[3]["train"]["sites"], "the killed site rejoins the next round"
    victim_rounds = [r for _, r in _ledger_rounds(c.site_dir(victim) / "ledger" / "ledger.sqlite")]
    assert victim_rounds.count(2) <= 1 and victim_rounds.count(1) == 1
    assert victim_rounds.count(3) == 1

    # The secure aggregate of round 2 equals the numpy weighted average of the three sites'
    # updates. Each site is asked again here with the round-1 model: a retry (same run, round and
    # model) resends the update the site stored when it sent it, with no new spend.
    cfg = compose(overrides)
    store = CheckpointStore(run_dir / "checkpoints")
    before, after = store.load(1), store.load(2)
    run_key = f"kill-site@{_manifest(run_dir)['config_sha256'][:16]}"
    settings = {**site_settings(cfg), "server-round": 2, "run-key": run_key}
    updates, weights = [], []
    assert cfg.federation.pack_arrays  # the default: the global model travels packed
    model_order = {k: before[k] for k in build_model(cfg.model).state_dict()}
    sent = pack(model_order)  # what the coordinator sent
    for name in ("site-0", "site-1", "site-2"):
        index = c.names.index(name)
        node = {
            "data-dir": str(cohort / f"site-{index % 3}"),
            "site-name": name,
            "ledger-dir": str(c.site_dir(name) / "ledger"),
            "epsilon-cap": 8.0,
            "delta": 1e-5,
        }
        msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord(settings)}), 0, "train")
        context = Context(run_id=1, node_id=0, node_config=node, state=RecordDict(), run_config={})
        spent = _ledger_rounds(c.site_dir(name) / "ledger" / "ledger.sqlite")
        # the update as the mask stage computes it, before masking (a secure round)
        site, data, site_cfg, got, seed = site_handler.prepare(
            msg, context, "train", None, None, secure=True
        )
        update = site_handler.train_update(
            msg, context, site, data, site_cfg, got, seed, secure=True
        )
        assert _ledger_rounds(c.site_dir(name) / "ledger" / "ledger.sqlite") == spent
        updates.append(unpack(update.arrays, layout(model_order)))
        weights.append(update.examples)
    for key in after:
        expected = sum(
            w * u[key].astype(np.float64) for w, u in zip(weights, updates, strict=True)
        ) / sum(weights)
        np.testing.assert_allclose(after[key], expected, atol=1e-4, err_msg=key)


def test_coordinator_killed_at_round_3_resumes_at_round_4(cohort, tmp_path):
    overrides = [
        *DP_RUN,
        "sites=3",
        "rounds=6",
        "federation.secure_aggregation=false",
        # after the restart each site re-activates, and may still be finishing the round the
        # killed coordinator sent: on 2 busy cores that can take longer than the defaults
        "federation.round_timeout=240",
        "federation.rejoin_wait=120",
    ]

    # The uninterrupted run with the same seed and fresh ledgers, on Flower's simulation engine:
    # same sites (site-0..2 on the same data), same code path for training and aggregation.
    # DP noise comes from each site's secret randomness; to compare two runs, both sets of sites
    # fix their own noise seed (site.yaml dp_noise_seed; privacy.simulated_noise_seed).
    reference = simulate(
        compose(
            [
                *overrides,
                f"data.root={cohort}",
                f"run_root={tmp_path / 'runs'}",
                "run_name=reference",
                f"privacy.ledger_root={tmp_path / 'reference-ledgers'}",
                "privacy.simulated_noise_seed=7",
            ]
        )
    )
    assert reference.manifest["rounds_completed"] == 6

    def consortium(name: str) -> Consortium:
        c = Consortium(  # a plain-FedAvg run: these sites allow it explicitly
            tmp_path / name,
            cohort,
            sites=3,
            site_settings=("dp_noise_seed=7", "policy.require_secure_aggregation=false"),
        )
        c.start_coordinator()
        for site in c.names:
            c.start_site(site)
        c.wait_connected(c.names)
        return c

    c = consortium("killed")
    run_dir = tmp_path / "runs" / "killed"
    try:
        launch = c.launch([*overrides, f"run_root={run_dir.parent}", "run_name=killed"])
        c.wait(lambda: _completed(run_dir) >= 3, 400, "round 3 completed")
        superlink = c.status(c.root / "coordinator")["children"]["superlink"]["pid"]
        for proc_name, proc, _ in c.procs.running:
            if proc_name == "coordinator":
                c.kill_group(proc.pid, signal.SIGKILL)
        c.kill_group(superlink, signal.SIGKILL)  # SuperLink and the ServerApp under it
        (c.root / "coordinator" / "status.json").unlink()
        c.start_coordinator("coordinator-restarted")
        assert c.wait_exit(launch, 600) == 0, c.log("launch")
    finally:
        c.stop()

    manifest = _manifest(run_dir)
    assert [r["after_round"] for r in manifest["resumed"]] == [3]
    assert [ln["round"] for ln in read_metrics(run_dir)] == list(range(7))
    final = CheckpointStore(run_dir / "checkpoints").load(6)
    reference = CheckpointStore(tmp_path / "runs" / "reference" / "checkpoints").load(6)
    for key in reference:
        np.testing.assert_allclose(final[key], reference[key], atol=1e-6, rtol=0, err_msg=key)
    for name in c.names:  # every round charged once: no epsilon counted twice
        rounds = _ledger_rounds(c.site_dir(name) / "ledger" / "ledger.sqlite")
        assert sorted(r for _, r in rounds) == [1, 2, 3, 4, 5, 6], (name, rounds)
        assert len({run for run, _ in rounds}) == 1
        with (
            PrivacyLedger(c.site_dir(name) / "ledger" / "ledger.sqlite") as mine,
            PrivacyLedger(tmp_path / "reference-ledgers" / name / "ledger.sqlite") as theirs,
        ):
            assert mine.entries[-1].epsilon_after == pytest.approx(theirs.entries[-1].epsilon_after)
