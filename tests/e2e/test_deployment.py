"""A real SuperLink and two SuperNodes on loopback; the app is submitted with ``flwr run``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedhealth.config import compose
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.runs.checkpoint import CheckpointStore
from fedhealth.runs.rundir import read_jsonl, read_metrics
from fedhealth.serverapp.runconfig import write_run_config
from fedhealth.testing.loopback import (
    Procs,
    flower_env,
    flwr,
    free_ports,
    node_policy,
    superlink_listen,
)

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]


def test_two_supernodes_run_two_rounds_with_flwr_run(cohort, tmp_path):
    env = flower_env(tmp_path / "flwr-home")
    procs = Procs(tmp_path, env)
    link, control, *nodes = free_ports(4)
    try:
        procs.start(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                *superlink_listen(link, control),
                "--database",
                str(tmp_path / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
        )
        procs.wait_port(link)
        procs.wait_port(control)
        for i, port in enumerate(nodes):
            procs.start(
                f"supernode-{i}",
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--port",
                    str(port),
                    "--node-config",
                    f"data-dir='{Path(cohort) / f'site-{i}'}' site-name='hospital-{i}' "
                    f"ledger-dir='{tmp_path / f'ledger-{i}'}' epsilon-cap=8.0 delta=1e-5 "
                    + node_policy(min_secagg_sites=2),  # a secure sum of the two sites
                ],
            )
        home = tmp_path / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "127.0.0.1:{control}"\n'
            "insecure = true\n"
        )
        cfg = compose(
            [
                "sites=2",
                "rounds=2",
                "train.local_epochs=1",
                f"run_root={tmp_path / 'runs'}",
                "run_name=deployed",
                "federation.round_timeout=240",
            ]
        )
        run_config = write_run_config(cfg, tmp_path / "run-config.toml")

        submitted = flwr(
            env,
            ["run", str(PROJECT), "e2e", "--stream", "--run-config", str(run_config)],
            cwd=tmp_path,
            timeout=420,
        )
        listing = flwr(
            env, ["ls", "e2e", "--run-id", str(submitted["run-id"])], cwd=tmp_path, timeout=60
        )
        status = listing["runs"][0]["status"]
        assert status == "finished:completed", f"{listing}\n{procs.logs()}"
    finally:
        procs.stop()

    run = tmp_path / "runs" / "deployed"
    lines = read_metrics(run)
    assert [line["round"] for line in lines] == [0, 1, 2], procs.logs()
    for line in lines[1:]:
        assert set(line["train"]["sites"]) == {"hospital-0", "hospital-1"}
        assert set(line["evaluate"]["sites"]) == {"hospital-0", "hospital-1"}
    store = CheckpointStore(run / "checkpoints")
    assert store.rounds() == [0, 1, 2]
    store.load(2)  # verifies the sha256
    privacy = read_jsonl(run / "privacy.jsonl")
    assert {(row["round"], row["site"]) for row in privacy} == {
        (r, f"hospital-{i}") for r in (1, 2) for i in (0, 1)
    }
    assert all(0 < row["epsilon"] <= 8.0 for row in privacy)
    for i in (0, 1):
        with PrivacyLedger(tmp_path / f"ledger-{i}" / "ledger.sqlite") as ledger:
            assert [e.round for e in ledger.entries] == [1, 2]
    assert (run / "config.yaml").is_file() and (run / "manifest.json").is_file()
