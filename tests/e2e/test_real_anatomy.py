"""A federation of three hospitals that store real anatomy differently learns grey/white matter.

The sites come from :mod:`fedhealth.testing.anatomy` (the MNI152 brain, one perturbed copy per
patient): 3 mm RAS int16, 3x3x4 mm LPS float64 ``.nii``, and a 15-degree oblique grid stored
axis-permuted as uint8 with float32 labels. They are given as ``data.site_dirs``, as a
hospital's own folders are, so they are only read: every file's bytes are the same afterwards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedhealth.config import compose
from fedhealth.runs.rundir import read_metrics
from fedhealth.simulation import simulate
from fedhealth.testing import anatomy

pytestmark = pytest.mark.slow

pytest.importorskip("nilearn", reason="nilearn ships the MNI152 template these tests use")

ROUNDS = 4


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_three_real_anatomy_sites_learn_grey_and_white_matter(tmp_path):
    data = tmp_path / "hospitals"
    dirs = anatomy.write_sites(data, n_train=4, n_test=2, seed=0)
    before = _hashes(data)
    cfg = compose(
        [
            f"data.site_dirs=[{','.join(map(str, dirs))}]",
            "model.out_channels=3",
            "data.patch_size=32",
            "data.target_spacing=4.0",
            f"rounds={ROUNDS}",
            "privacy=off",
            f"privacy.ledger_root={tmp_path / 'ledgers'}",
            "train.local_epochs=3",
            "train.batch_size=4",
            "train.lr=0.01",
            "train.lr_decay=1.0",
            f"run_root={tmp_path / 'runs'}",
            "run_name=anatomy",
        ]
    )
    assert cfg.sites == 3 and cfg.federation.secure_aggregation  # the default: SecAgg+
    run = simulate(cfg)

    lines = read_metrics(run.path)
    assert [line["round"] for line in lines] == list(range(ROUNDS + 1))
    names = {"site-a", "site-b", "site-c"}
    for line in lines[1:]:
        assert set(line["train"]["sites"]) == set(line["evaluate"]["sites"]) == names
        assert line["train"]["secure_sum"]["num-examples"] == 12  # 4 patients a site
        for site, metrics in line["evaluate"]["sites"].items():
            assert {"dice", "dice-1", "dice-2"} <= set(metrics), (site, metrics)
            assert metrics["dice"] == pytest.approx((metrics["dice-1"] + metrics["dice-2"]) / 2)
    dice = [line["evaluate"]["weighted"]["dice"] for line in lines[1:]]
    per_class = {
        site: (round(m["dice-1"], 3), round(m["dice-2"], 3))
        for site, m in lines[-1]["evaluate"]["sites"].items()
    }
    print(
        f"weighted Dice by round: {[round(d, 3) for d in dice]}; last round (GM, WM): {per_class}"
    )
    assert dice[-1] > dice[0] + 0.05, dice
    assert dice[-1] > 0.5, dice
    assert run.manifest["rounds_completed"] == ROUNDS and run.manifest["finished"]

    assert _hashes(data) == before  # a hospital's folders are only read
