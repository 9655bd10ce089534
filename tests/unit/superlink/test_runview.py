"""The operator's read-only view of runs: ``fedhealth server status`` and ``server logs RUN``."""

from __future__ import annotations

import json

import pytest

from fedhealth.cli import EXIT_USER_ERROR, main


def _run(root, name, manifest, lines, refusals=()):
    run = root / name
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"run": name, **manifest}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "privacy.jsonl").write_text("".join(json.dumps(x) + "\n" for x in refusals))
    return run


def _line(r, dice):
    sites = {s: {"dice": d, "num-examples": 2} for s, d in dice.items()}
    return {
        "round": r,
        "train": {"rejected": {}},
        "evaluate": {"sites": sites, "weighted": {"dice": sum(dice.values()) / len(dice)}},
    }


@pytest.fixture
def run_root(tmp_path):
    root = tmp_path / "state" / "runs"
    _run(
        root,
        "brain-1",
        {"rounds_completed": 2, "rounds_planned": 2, "finished": "t", "mlflow": {"run_id": "abc"}},
        [{"round": 0}, _line(1, {"a": 0.2, "b": 0.4}), _line(2, {"a": 0.5, "b": 0.7})],
    )
    _run(
        root,
        "brain-2",
        {
            "rounds_completed": 1,
            "rounds_planned": 5,
            "finished": "t",
            "stopped": {"round": 2, "reason": "r"},
        },
        [{"round": 0}, _line(1, {"a": 0.1})],
        [{"round": 2, "site": "b", "status": "refused", "reason": "policy: max_rounds_per_run"}],
    )
    return root


def test_status_lists_each_run_with_its_state_round_dice_and_sites(run_root, capsys):
    assert main(["server", "status", "--insecure", "state_dir=" + str(run_root.parent)]) == 0
    out = capsys.readouterr().out
    assert "brain-1" in out and "finished  round 2/2  Dice 0.6000  sites a, b" in out
    assert "brain-2" in out and "stopped   round 1/5  Dice 0.1000  sites a" in out
    assert main(["server", "status", "--insecure", "--json", "--run-root", str(run_root)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["coordinator"] == "not running"  # nothing listens on the default port
    assert status["sites"] is None  # no site registry: none created, status only reads
    assert not (run_root.parent / "sites.json").exists()
    rows = {r["run"]: r for r in status["runs"]}
    assert rows["brain-1"]["mlflow_run"] == "abc" and rows["brain-2"]["state"] == "stopped"


def test_logs_print_every_round_per_site_and_who_was_refused_why(run_root, capsys):
    (run_root / "brain-2" / "metrics.jsonl").open("a").write(
        json.dumps(_line(2, {"a": 0.3})) + "\n"
    )
    assert main(["server", "logs", "brain-2", "--insecure", "--run-root", str(run_root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "round 1/5: Dice 0.1000 (a 0.10)",
        "round 2/5: Dice 0.3000 (a 0.30); refused: b (policy: max_rounds_per_run)",
    ]
    assert main(["server", "logs", "nope", "--insecure", "--run-root", str(run_root)]) == (
        EXIT_USER_ERROR
    )
    assert "not a run directory" in capsys.readouterr().err


def test_launched_runs_show_flower_state_and_a_stop_request(run_root, tmp_path):
    from fedhealth.superlink import launches
    from fedhealth.superlink.runview import runs_status

    home = tmp_path / "launcher"
    _run(run_root, "brain-3", {"rounds_completed": 1, "rounds_planned": 4}, [{"round": 0}])
    launches.record_submission(home, "brain-3", run_root / "brain-3", 7, first=True)
    launches.record_submission(home, "brain-3", run_root / "brain-3", 9)  # resubmitted
    launches.record_submission(home, "brain-4", run_root / "brain-4", 11, first=True)
    assert launches.read(home, "brain-3")["flower_run_ids"] == [7, 9]

    def states(flower):
        rows = runs_status(run_root, launches.records(home), flower)
        return {r["run"]: (r["state"], r["flower_run_id"], r["flower_status"]) for r in rows}

    got = states({9: "running", 11: "pending"})
    assert got["brain-3"] == ("running", 9, "running")
    assert got["brain-4"] == ("submitted", 11, "pending")  # no run directory yet
    assert got["brain-1"] == ("finished", None, None)  # launched elsewhere: no record
    assert states({9: "finished:stopped"})["brain-3"][0] == "stopped by the operator"
    assert states({9: "finished:failed"})["brain-3"][0] == "failed"
    # the operator's request is recorded before Flower is asked: seen even while Flower lags
    record = launches.read(home, "brain-3")
    record["stop_requested"] = "2026-11-30T00:00:00+00:00"
    (home / "runs" / "brain-3.json").write_text(json.dumps(record))
    assert launches.stop_requested(home, "brain-3")
    assert states({9: "running"})["brain-3"][0] == "stopped by the operator"
    # launching the run again (to resume it) clears the old request
    launches.record_submission(home, "brain-3", run_root / "brain-3", 12, first=True)
    assert not launches.stop_requested(home, "brain-3")


def test_stop_names_the_runs_it_knows_when_the_name_is_unknown(tmp_path, capsys):
    from fedhealth.superlink import launches

    home = tmp_path / "state" / "launcher"
    launches.record_submission(home, "brain-1", tmp_path / "runs" / "brain-1", 3, first=True)
    code = main(["server", "stop", "brain-9", "--insecure", "--state-dir", str(tmp_path / "state")])
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "no run named 'brain-9'" in err and "brain-1" in err
    with pytest.raises(Exception, match="not a run name"):
        launches.read(home, "../etc")


def test_a_relative_run_root_is_resolved_once_under_the_coordinators_state_dir(tmp_path):
    import os

    from fedhealth.serverapp.runconfig import write_run_config
    from fedhealth.superlink.launcher import run_config_for
    from fedhealth.superlink.settings import load

    s = load(None, [f"state_dir={tmp_path / 'coordinator'}"], insecure=True, role="launch")
    elsewhere = tmp_path / "operator-shell"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)  # the launcher's working directory is not the ServerApp's
    try:
        cfg = run_config_for(s, ["run_root=runs", "run_name=brain-1"])
    finally:
        os.chdir(cwd)
    assert cfg.run_root == str((tmp_path / "coordinator" / "runs").resolve())
    # what the ServerApp receives names the same absolute directory
    toml = write_run_config(cfg, tmp_path / "brain-1.toml").read_text()
    assert str((tmp_path / "coordinator" / "runs").resolve()) in toml
    assert run_config_for(s, [f"run_root={tmp_path / 'abs'}"]).run_root == str(tmp_path / "abs")
    assert run_config_for(s, []).run_name  # a fixed name even when none is given
