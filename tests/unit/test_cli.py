import json

import pytest

from fedhealth.cli import main


def test_data_synth_writes_sites(tmp_path, capsys):
    root = tmp_path / "cohort"
    code = main(
        [
            "data",
            "synth",
            "sites=2",
            f"data.root={root}",
            "data.train_per_site=2",
            "data.test_per_site=1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(root / "site-0" / "dataset.json"), str(root / "site-1" / "dataset.json")]
    assert json.loads((root / "site-1" / "dataset.json").read_text())["numTraining"] == 2


def test_bad_override_is_a_clear_error_and_exit_2(capsys):
    assert main(["simulate", "rounds=zero"]) == 2
    err = capsys.readouterr().err
    assert "rounds" in err and "Traceback" not in err


def test_baseline_local_prints_per_site_dice(cohort, capsys):
    code = main(
        ["baseline", "local", "sites=2", f"data.root={cohort}", "rounds=1", "train.local_epochs=1"]
    )
    assert code == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table) == {"local:site-0", "local:site-1"}
    assert all(set(row) == {"site-0", "site-1", "pooled"} for row in table.values())


def test_version_names_fedhealth_and_its_stack(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("fedhealth 0.1.0 (") and "flwr 1.39.0" in out and "opacus" in out


def test_certs_check_only_reads_so_it_offers_no_rotate(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["certs", "check", "--rotate"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --rotate" in capsys.readouterr().err


def test_simulate_cfg_job_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    assert main(["simulate", "--cfg", "job", "rounds=3", f"run_root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "rounds: 3" in out and "patch_size: 32" in out
    assert not any(tmp_path.iterdir()), "no run started"


def test_help_states_defaults_and_each_baseline_has_its_own(capsys):
    with pytest.raises(SystemExit):
        main(["certs", "init", "--help"])
    assert "(default: certs)" in capsys.readouterr().out
    texts = []
    for kind in ("centralized", "local"):
        with pytest.raises(SystemExit):
            main(["baseline", kind, "--help"])
        texts.append(capsys.readouterr().out)
    assert "pooled" in texts[0] and "alone" in texts[1]


def test_simulate_info_groups_lists_every_group_and_option(capsys):
    from fedhealth.config import config_dir

    assert main(["simulate", "--info", "groups"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()[:-1])
    on_disk = {
        str(p.parent.relative_to(config_dir())) for p in config_dir().rglob("*/*.yaml")
    }  # every folder of options under configs/
    assert set(lines) == on_disk
    assert lines["strategy"] == "fedadam, fedavg, fedprox"
    assert "segresnet" in lines["model"] and "unet" in lines["model"]


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    import fedhealth.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["simulate"].set_defaults(func=interrupted)
    assert main(["simulate"]) == cli.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err.strip() == "fedhealth: interrupted"
