"""Does federation help? FedAvg vs centralized (pooled data) vs local-only, same 4 non-IID sites.

    python benchmarks/quality.py [overrides...]
    python benchmarks/quality.py [--seeds 0,1,2] --transport float16 [overrides...]

Prints a table of Dice on every site's test set and on the pooled test sets, the ratio
FedAvg Dice / centralized Dice (published anchor: 0.988-0.99 on brain-tumour MRI; target here
>= 0.97), and whether FedAvg beats every site's local-only model on the pooled test sets.
All three are trained in this one run on the same data with the same epoch budget.

``--transport float16`` (or ``bfloat16``) instead trains FedAvg twice on the same setting, with
the model and every update on the wire in float32 and then in that 16-bit dtype, and prints the
Dice of both and their difference (target: within 0.005). Secure aggregation is off for this
comparison so that every update travels in 16 bits too (a secure sum quantises float32 updates
to its own field: only the global model would be rounded). ``--seeds`` repeats the pair for each
seed (default 0) and prints the mean difference and its spread: one pair cannot separate a
0.005 effect from how far two trajectories part. Two statistics are compared: the final round's
pooled Dice and the mean of the last 5 rounds' (over the last rounds one round moved the pooled
Dice by 0.023, median of 22 runs, and up to 0.09). Finished runs of the pair are read from
their run directories, not trained again, so a longer ``--seeds`` list adds only the new seeds.

Every run trains on one synthetic cohort, written with ``COHORT_SEED`` whatever the run's own
``seed`` (which sets the initial model, the data order and the noise), so a comparison's data does
not depend on which seed ran first on a machine; a ``data.root`` that holds a cohort written with
another seed is refused (by name) rather than read.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

from fedhealth.config import Config, compose
from fedhealth.data.synth import write_cohort
from fedhealth.runs.rundir import RunDir, read_metrics
from fedhealth.simulation import simulate
from fedhealth.training import baselines

DEFAULTS = [
    "sites=4",
    "rounds=30",
    "train.local_epochs=2",
    "privacy=off",
    "train.batch_size=4",
    "train.lr=0.003",
    "train.lr_decay=1.0",
    "data.train_per_site=16",
    "data.test_per_site=8",
    "data.root=data/bench-quality",
    "run_root=runs/bench",
    "run_name=quality-fedavg",
]


COHORT_SEED = 3  # the cohort the 14 float16/float32 pairs quoted in the README trained on
TAIL = 5  # rounds averaged for the second statistic (one round moves the pooled Dice by ~0.02)


def cohort(cfg: Config) -> None:
    """Write (or check) the benchmark's synthetic cohort under ``data.root``, with ``COHORT_SEED``.

    Parameters
    ----------
    cfg : Config
        The run config; nothing is written when it trains on ``data.site_dirs``.

    Raises
    ------
    DataError
        ``data.root`` holds a cohort written with another seed or sizes, or files that are not
        a fedhealth cohort (:func:`fedhealth.data.synth.write_cohort`).
    """
    if not cfg.data.site_dirs:
        write_cohort(
            Path(cfg.data.root).expanduser().resolve(),
            cfg.sites,
            COHORT_SEED,
            cfg.data.train_per_site,
            cfg.data.test_per_site,
            fov=cfg.data.fov,
            heterogeneity=cfg.data.heterogeneity,
        )


def summarise(name: str, gaps: list[float], base: list[float]) -> None:
    """Print the mean of per-seed Dice differences, its spread and what it can resolve."""
    mean = statistics.fmean(gaps)
    print(
        f"{name}: "
        + ", ".join(f"{g:+.4f}" for g in gaps)
        + f"; mean {mean:+.4f}; |mean| <= 0.005: "
        + ("yes" if abs(mean) <= 0.005 else "NO")
    )
    if len(gaps) > 1:  # what the mean can resolve, and how far float32 alone moves by seed
        spread = statistics.stdev(gaps)
        error = spread / len(gaps) ** 0.5
        print(
            f"  sd {spread:.4f}, standard error of the mean {error:.4f}; within 0.005 at two "
            f"standard errors (|mean| + 2 SE <= 0.005): "
            f"{'yes' if abs(mean) + 2 * error <= 0.005 else 'NO'}; float32's own value across "
            f"these seeds: sd {statistics.stdev(base):.4f}"
        )


def compare_transport(dtype: str, overrides: list[str], seeds: list[int]) -> int:
    """Train FedAvg in float32 and in ``dtype`` on the wire, per seed; print Dice and the gaps.

    Each seed trains both (same init, same data order); a run directory that already holds the
    finished run is read, not trained again. Two statistics of the pooled (weighted) Dice are
    compared per seed and as a mean across seeds: the final round's, and the mean of the last
    ``TAIL`` rounds' (less moved by where one round's step happened to land).
    """
    final: dict[str, list[float]] = {"float32": [], dtype: []}
    tail: dict[str, list[float]] = {"float32": [], dtype: []}
    for seed in seeds:
        dice = {}
        for wire in ("float32", dtype):
            cfg = compose(
                [
                    *DEFAULTS,
                    "federation.secure_aggregation=false",
                    *overrides,
                    f"seed={seed}",
                    f"federation.transport_dtype={wire}",
                    f"run_name=quality-transport-{wire}-seed{seed}",
                ]
            )
            cohort(cfg)
            path = Path(cfg.run_root) / str(cfg.run_name)
            if not (path / "manifest.json").is_file() or not RunDir.create(cfg).finished:
                path = simulate(cfg).path  # (a finished run of another config: ConfigError)
            lines = [ln for ln in read_metrics(path) if "evaluate" in ln]
            rounds = [ln["evaluate"]["weighted"]["dice"] for ln in lines[-TAIL:]]
            dice[wire] = (lines[-1]["evaluate"]["sites"], lines[-1]["elapsed_s"])
            final[wire].append(rounds[-1])
            tail[wire].append(statistics.fmean(rounds))
        print(
            f"\nFedAvg Dice with the model and updates on the wire in float32 vs {dtype} "
            f"({cfg.sites} sites, {cfg.rounds} rounds, secure aggregation off, seed {seed}):"
        )
        print(f"{'test set':<12}{'float32':>12}{dtype:>12}{'difference':>12}")
        for site in sorted(dice["float32"][0]):
            a, b = dice["float32"][0][site]["dice"], dice[dtype][0][site]["dice"]
            print(f"{site:<12}{a:>12.4f}{b:>12.4f}{b - a:>+12.4f}")
        for label, stat in (("pooled", final), (f"last {TAIL} mean", tail)):
            a, b = stat["float32"][-1], stat[dtype][-1]
            print(f"{label:<12}{a:>12.4f}{b:>12.4f}{b - a:>+12.4f}")
        print(f"run time {dice['float32'][1]:.0f}s float32, {dice[dtype][1]:.0f}s {dtype}")
    print(
        f"\npooled Dice difference {dtype} - float32 over seeds {seeds} (every seed trains on "
        f"the synthetic cohort in {cfg.data.root}, written with seed {COHORT_SEED}):"
    )
    for label, stat in (("final round", final), (f"mean of the last {TAIL} rounds", tail)):
        gaps = [b - a for a, b in zip(stat["float32"], stat[dtype], strict=True)]
        summarise(label, gaps, stat["float32"])
    return 0


def main(overrides: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    seeds = [0]
    if overrides[:1] == ["--seeds"]:
        seeds, overrides = [int(x) for x in overrides[1].split(",")], overrides[2:]
    if overrides[:1] == ["--transport"]:
        return compare_transport(overrides[1], overrides[2:], seeds)
    cfg = compose([*DEFAULTS, *overrides])
    cohort(cfg)
    sites = baselines.load_sites(cfg)

    t0 = time.perf_counter()
    run = simulate(cfg)
    t_fed = time.perf_counter() - t0
    last = read_metrics(run.path)[-1]["evaluate"]["sites"]
    fed = {s: float(last[s]["dice"]) for s in sites}
    fed_pooled = sum(last[s]["dice"] * last[s]["num-examples"] for s in sites) / sum(
        last[s]["num-examples"] for s in sites
    )

    t0 = time.perf_counter()
    cen = baselines.centralized(cfg, sites)
    t_cen = time.perf_counter() - t0
    t0 = time.perf_counter()
    loc = baselines.local(cfg, sites)
    t_loc = time.perf_counter() - t0

    columns = {f"{cfg.strategy.name}": fed, "centralized": {s: r.dice for s, r in cen.items()}}
    columns.update({f"local:{k}": {s: r.dice for s, r in v.items()} for k, v in loc.items()})
    pooled = {f"{cfg.strategy.name}": fed_pooled, "centralized": baselines.pooled_dice(cen)}
    pooled.update({f"local:{k}": baselines.pooled_dice(v) for k, v in loc.items()})

    print(
        f"\nDice on each site's test set ({cfg.sites} non-IID sites, {cfg.rounds} rounds x "
        f"{cfg.train.local_epochs} local epochs; baselines "
        f"{cfg.rounds * cfg.train.local_epochs} epochs)"
    )
    header = f"{'test set':<12}" + "".join(f"{name:>16}" for name in columns)
    print(header)
    print("-" * len(header))
    for s in sites:
        print(f"{s:<12}" + "".join(f"{columns[c][s]:>16.4f}" for c in columns))
    print(f"{'pooled':<12}" + "".join(f"{pooled[c]:>16.4f}" for c in columns))
    ratio = pooled[cfg.strategy.name] / pooled["centralized"]
    best_local = max(v for k, v in pooled.items() if k.startswith("local:"))
    print(
        f"\nratio {cfg.strategy.name} / centralized Dice (pooled): {ratio:.4f}   "
        f"(target >= 0.97; published anchor 0.988-0.99)"
    )
    above = pooled[cfg.strategy.name] > best_local
    print(
        f"{cfg.strategy.name} pooled Dice {pooled[cfg.strategy.name]:.4f} vs best local-only "
        f"{best_local:.4f}: {'above every local model' if above else 'NOT above every local model'}"
    )
    print(f"wall time: federated {t_fed:.0f}s, centralized {t_cen:.0f}s, local {t_loc:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
