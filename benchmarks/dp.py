"""What does DP-SGD cost? Two figures, each measured side by side in this one run.

    python benchmarks/dp.py [overrides...]

1. Step time and peak memory of a DP-SGD step (Opacus, per-sample clipping + noise) over a
   plain step: same model, same fixed batch, each in a fresh subprocess so peak RSS is its own.
   Anchors: 1.35-1.63x per conv/norm layer, 1.58x end to end for Opacus on CPU. Target <= 1.5x.
2. DP-FedAvg Dice over non-DP FedAvg Dice at epsilon <= 8, delta = 1e-5 per site, 4 non-IID
   sites, same rounds and data. Anchor: 0.958. Target >= 0.95.
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import time

STEP_OVERRIDES = [
    "data.train_per_site=16",
    "data.fov=40",  # 32 voxels per edge at 1.25 mm: one patch per volume, quick to write
    "data.root=data/bench-dp-step",
    "sites=1",
    "train.batch_size=16",
]
FED_DEFAULTS = [
    "sites=4",
    "rounds=15",
    "train.local_epochs=1",
    "data.train_per_site=192",
    "data.fov=40",
    "data.test_per_site=16",
    "train.batch_size=32",
    "privacy.max_grad_norm=0.5",
    "data.root=data/bench-dp192",
    "train.lr_decay=0.85",
    "train.lr=0.003",
    "run_root=runs/bench",
]
# DP-SGD wants a larger step than the non-private run (the noise shrinks Adam's effective step);
# the same decay schedule is used by both.
DP_TUNING = ["train.lr=0.01"]


def step_child(mode: str, overrides: list[str], steps: int = 12, warmup: int = 3) -> dict:
    """Time ``steps`` training steps in this process; returns seconds/step and peak RSS growth."""
    import torch

    from fedhealth.config import compose
    from fedhealth.data.loading import read_datalist
    from fedhealth.models import DP_READY, build_model
    from fedhealth.simulation import ensure_sites
    from fedhealth.training import (
        grad_samplers,  # noqa: F401  (as a site trains)
        seed_everything,
    )
    from fedhealth.training.loop import loss_fn
    from fedhealth.training.scoring import train_loader

    cfg = compose([*STEP_OVERRIDES, *overrides])
    first = ensure_sites(cfg)[0]
    seed_everything(0, 2)
    data = read_datalist(first / "dataset.json")
    loader = train_loader(data.train, cfg, 0)
    batch = next(iter(loader))
    model = build_model(cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if mode == "dp":
        from opacus import PrivacyEngine

        from fedhealth.training.private import site_generator

        model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            noise_generator=site_generator(None),  # as at a site: noise from its OS entropy
            grad_sample_mode=DP_READY[cfg.model.name],
        )
    criterion = loss_fn()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(batch["image"]), batch["label"]).backward()
        optimizer.step()

    import gc

    gc.collect()
    before = _rss_kib()
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Training memory = peak RSS during the steps minus RSS just before the first step (model,
    # data and imports already resident), measured the same way for both modes.
    return {
        "mode": mode,
        "seconds_per_step": seconds,
        "batch": int(batch["image"].shape[0]),
        "peak_rss_mib": peak / 1024,
        "rss_before_steps_mib": before / 1024,
        "training_mib": (peak - before) / 1024,
    }


def _rss_kib() -> int:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def measure_steps(overrides: list[str]) -> dict[str, dict]:
    out = {}
    for mode in ("plain", "dp"):
        done = subprocess.run(
            [sys.executable, __file__, "--step-child", mode, *overrides],
            capture_output=True,
            text=True,
            timeout=1800,
            check=True,
        )
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def federated(overrides: list[str]) -> dict[str, float]:
    from fedhealth.config import compose
    from fedhealth.runs.rundir import read_metrics
    from fedhealth.simulation import simulate

    out = {}
    for name, extra in (("fedavg", ["privacy=off"]), ("dp-fedavg", ["privacy=dp", *DP_TUNING])):
        cfg = compose(
            [
                *FED_DEFAULTS,
                *extra,
                f"run_name=dp-bench-{name}",
                *overrides,
                "privacy.ledger_root=runs/bench/dp-bench-ledgers-" + str(time.time_ns()),
            ]
        )
        t0 = time.perf_counter()
        run = simulate(cfg)
        last = read_metrics(run.path)[-1]
        out[name] = last["evaluate"]["weighted"]["dice"]
        out[f"{name}-seconds"] = time.perf_counter() - t0
        if name == "dp-fedavg":
            from fedhealth.runs.rundir import read_jsonl

            rows = read_jsonl(run.path / "privacy.jsonl")
            out["epsilon-max"] = max(r["epsilon"] for r in rows)
            # the last phase of the site's DP history (simulated sites release their history)
            out["noise-multiplier"] = rows[-1]["history"][-1][0]
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--step-child"]:
        print(json.dumps(step_child(argv[1], argv[2:])))
        return 0
    logging.basicConfig(level=logging.WARNING)
    which = {"steps", "federated"}
    if argv[:1] == ["--only"]:
        which, argv = {argv[1]}, argv[2:]
    if "steps" in which:
        res = measure_steps(argv)
        plain, dp = res["plain"], res["dp"]
        mem_plain = plain["training_mib"]
        mem_dp = dp["training_mib"]
        print(f"\nDP-SGD step vs plain step (batch {plain['batch']}, same model, fixed batch):")
        step_ratio = dp["seconds_per_step"] / plain["seconds_per_step"]
        print(
            f"  time/step   plain {plain['seconds_per_step'] * 1000:8.1f} ms   dp "
            f"{dp['seconds_per_step'] * 1000:8.1f} ms   ratio {step_ratio:.2f}x"
            "   (target <= 1.5x; anchor 1.58x end to end)"
        )
        print(
            f"  training memory (peak RSS - RSS before the first step)   plain {mem_plain:8.1f} MiB"
            f"   dp {mem_dp:8.1f} MiB   ratio {mem_dp / mem_plain:.2f}x   (target <= 1.5x)"
        )
        rss_ratio = dp["peak_rss_mib"] / plain["peak_rss_mib"]
        print(
            f"  whole-process peak RSS   plain {plain['peak_rss_mib']:.0f} MiB   dp "
            f"{dp['peak_rss_mib']:.0f} MiB   ratio {rss_ratio:.2f}x"
        )
    if "federated" in which:
        fed = federated(argv)
        print(f"\nDP-FedAvg vs FedAvg, {FED_DEFAULTS}, DP run also {DP_TUNING}:")
        print(
            f"  weighted Dice  fedavg {fed['fedavg']:.4f}   dp-fedavg {fed['dp-fedavg']:.4f}   "
            f"ratio {fed['dp-fedavg'] / fed['fedavg']:.4f}   (target >= 0.95; anchor 0.958)"
        )
        print(
            f"  max site epsilon {fed['epsilon-max']:.3f} (delta 1e-5), noise multiplier "
            f"{fed['noise-multiplier']:.3f}; wall fedavg {fed['fedavg-seconds']:.0f}s, "
            f"dp-fedavg {fed['dp-fedavg-seconds']:.0f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
