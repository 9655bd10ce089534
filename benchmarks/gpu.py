"""fedhealth on a GPU: seconds per round of the main job, a DP step over a plain one, GPU memory.

    python benchmarks/gpu.py [overrides...]

Needs a machine where PyTorch sees CUDA (``torch.cuda.is_available()``); elsewhere it says so and
exits 0 without measuring (nothing in the project depends on a GPU). Measured side by side in
this one run, on ``cuda``:

1. A DP-SGD step (Opacus, per-sample clipping + noise drawn on the GPU from the site's secret
   generator) over a plain step: same model, same fixed batch; time per step (synchronised) and
   peak GPU memory of each.
2. The main job's shape (3 sites, DP and secure aggregation, whole-volume evaluation) with
   ``train.device=cuda`` and ``federation.gpus_per_site`` sharing the GPU: seconds per round.
"""

from __future__ import annotations

import sys
import time
from typing import Any

STEP = ["data.train_per_site=16", "data.fov=40", "data.root=data/bench-gpu-step", "sites=1"]
JOB = [
    "sites=3",
    "rounds=3",
    "train.device=cuda",
    "federation.gpus_per_site=0.3",
    "data.root=data/bench-gpu-job",
    "run_root=runs/bench-gpu",
    "privacy.ledger_root=runs/bench-gpu/ledgers",
]


def dp_step(overrides: list[str], steps: int = 20, warmup: int = 5) -> dict[str, dict]:
    """Time a plain and a DP-SGD step on CUDA; peak GPU memory of each."""
    import torch

    from fedhealth.config import compose
    from fedhealth.data.loading import read_datalist
    from fedhealth.models import DP_READY, build_model
    from fedhealth.simulation import ensure_sites
    from fedhealth.training import (
        grad_samplers,  # noqa: F401  (as a site trains)
        seed_everything,
    )
    from fedhealth.training.device import device_generator
    from fedhealth.training.private import site_generator
    from fedhealth.training.scoring import train_loader

    cfg = compose([*STEP, *overrides])
    seed_everything(0, 2)
    data = read_datalist(ensure_sites(cfg)[0] / "dataset.json")
    loader = train_loader(data.train, cfg, 0)
    cuda = torch.device("cuda")
    batch = {k: v.to(cuda) for k, v in next(iter(loader)).items()}
    out = {}
    for mode in ("plain", "dp"):
        model = build_model(cfg.model).to(cuda)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        if mode == "dp":
            from opacus import PrivacyEngine

            model, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=False,
                noise_generator=device_generator(site_generator(None), cuda),
                grad_sample_mode=DP_READY[cfg.model.name],
            )
        out[mode] = {
            **_time_steps(model, optimizer, batch, steps, warmup),
            "batch": int(batch["image"].shape[0]),
        }
        del model, optimizer
        torch.cuda.empty_cache()
    return out


def _time_steps(model: Any, optimizer: Any, batch: dict, steps: int, warmup: int) -> dict:
    """Seconds per step (synchronised) and peak GPU memory of ``steps`` steps after a warm-up."""
    import torch

    from fedhealth.training.loop import loss_fn

    criterion = loss_fn()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(batch["image"]), batch["label"]).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return {
        "seconds": (time.perf_counter() - t0) / steps,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
    }


def main_job(overrides: list[str]) -> dict[str, float]:
    """Run the main job's shape on CUDA; seconds per round from the run's metrics."""
    import torch

    from fedhealth.config import compose
    from fedhealth.simulation import simulate

    cfg = compose([*JOB, *overrides])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run = simulate(cfg)
    seconds = time.perf_counter() - t0
    return {
        "rounds": float(run.manifest["rounds_completed"]),
        "seconds": seconds,
        "seconds_per_round": seconds / max(1, run.manifest["rounds_completed"]),
    }


def main(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            f"benchmarks/gpu.py: PyTorch {torch.__version__} sees no CUDA device here; nothing "
            "measured (run it on a machine with a GPU)"
        )
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    steps = dp_step(argv)
    plain, dp = steps["plain"], steps["dp"]
    print(f"\nDP-SGD step vs plain step on CUDA (batch {plain['batch']}, same model, fixed batch):")
    print(
        f"  time/step   plain {plain['seconds'] * 1000:8.2f} ms   dp {dp['seconds'] * 1000:8.2f} ms"
        f"   ratio {dp['seconds'] / plain['seconds']:.2f}x"
    )
    print(
        f"  peak GPU memory   plain {plain['peak_mib']:8.1f} MiB   dp {dp['peak_mib']:8.1f} MiB"
        f"   ratio {dp['peak_mib'] / plain['peak_mib']:.2f}x"
    )
    job = main_job(argv)
    print(
        f"\nmain job on CUDA (3 sites, DP + secure aggregation): {job['rounds']:.0f} rounds in "
        f"{job['seconds']:.1f} s, {job['seconds_per_round']:.1f} s per round (Ray start included)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
