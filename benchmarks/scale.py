"""How does a simulated federation grow? 10, 100 and 1,000 sites x 3 rounds, side by side.

    python benchmarks/scale.py [--sites 10 100 1000] [overrides...]

Each size runs in a fresh process (so its peak memory is its own): a small U-Net, 4 training
patients and 1 test patient per site (20 mm phantoms, 16^3 patches), DP-SGD at every site and
secure aggregation with SecAgg+'s logarithmic neighbour graph (``federation.secagg_degree=-1``:
2 * ceil(log2 n) neighbours, so each site's key agreements and mask expansions stay near
constant), every site sampled every round. Printed per size: seconds per round (the whole run,
Ray start included, divided by the rounds), the cohort's synthesis time, peak memory of the
whole process tree (the driver, Ray and every site actor, sampled every 0.5 s from /proc), and the
bytes each site received and sent per round (every message of every stage, counted by a client
mod at the site). Targets on 2 cores: 100 sites < 4 minutes, 1,000 sites < 30 minutes and
< 4 GB peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BASE = [
    "rounds=3",
    "model.channels=[4,8]",
    "model.strides=[2]",
    "data.train_per_site=4",
    "data.test_per_site=1",
    "data.fov=20",
    "data.patch_size=16",
    "train.batch_size=4",
    "train.local_epochs=1",
    "federation.secagg_degree=-1",
    "federation.round_timeout=3600",
    "strategy.min_sites=2",
    "tracking.enabled=false",
]


class ByteCounter:
    """A Flower client mod: append each instruction's and reply's payload size to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, msg: Any, context: Any, call_next: Any) -> Any:
        """Pass ``msg`` on; record its size and the reply's (bytes of every value carried)."""
        from fedhealth.clientapp.egress import payload_bytes

        down = len(payload_bytes(msg))
        reply = call_next(msg, context)
        up = len(payload_bytes(reply))
        site = context.node_config.get("partition-id")
        line = json.dumps({"site": site, "type": msg.metadata.message_type, "down": down, "up": up})
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
        return reply


def _tree_rss_bytes(root: int) -> int:
    """Sum the resident memory of ``root`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, stack, page = 0, [root], os.sysconf("SC_PAGE_SIZE")
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * page
        except OSError:
            pass
        stack += children.get(pid, [])
    return total


def child(n: int, overrides: list[str], work: Path) -> dict[str, Any]:
    """Run one size in this process; return its figures."""
    from fedhealth.config import compose
    from fedhealth.simulation import ensure_sites, simulate

    cfg = compose(
        [
            *BASE,
            f"sites={n}",
            f"data.root={work / f'cohort-{n}'}",
            f"run_root={work / 'runs'}",
            f"run_name=scale-{n}",
            f"privacy.ledger_root={work / f'ledgers-{n}'}",
            *overrides,
        ]
    )
    t0 = time.perf_counter()
    ensure_sites(cfg)
    synth = time.perf_counter() - t0
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], _tree_rss_bytes(os.getpid()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    counts = work / f"bytes-{n}.jsonl"
    counts.unlink(missing_ok=True)
    t0 = time.perf_counter()
    run = simulate(cfg, [ByteCounter(str(counts))])
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    rounds = int(run.manifest["rounds_completed"])
    lines = [json.loads(x) for x in counts.read_text().splitlines()]
    return {
        "sites": n,
        "rounds": rounds,
        "stopped": run.manifest.get("stopped", {}).get("reason"),
        "seconds": seconds,
        "seconds_per_round": seconds / max(rounds, 1),
        "synth_seconds": synth,
        "peak_gb": peak[0] / 1e9,
        "down_per_site_round": sum(x["down"] for x in lines) / (n * max(rounds, 1)),
        "up_per_site_round": sum(x["up"] for x in lines) / (n * max(rounds, 1)),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        n, work = int(argv[1]), Path(argv[2])
        print(json.dumps(child(n, argv[3:], work)))
        return 0
    sizes = [10, 100, 1000]
    if argv[:1] == ["--sites"]:
        argv = argv[1:]
        sizes = []
        while argv and argv[0].isdigit():
            sizes.append(int(argv.pop(0)))
    work = Path("runs/bench-scale").resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(n), str(work), *argv],
            capture_output=True,
            text=True,
            timeout=7200,
            check=False,
        )
        if done.returncode != 0:
            print(f"{n} sites: failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{n} sites done: {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    print(
        f"\n{'sites':>6} {'rounds':>6} {'s/round':>8} {'total s':>8} {'synth s':>8} "
        f"{'peak GB':>8} {'KB down/site/round':>19} {'KB up/site/round':>17}"
    )
    for r in rows:
        print(
            f"{r['sites']:>6} {r['rounds']:>6} {r['seconds_per_round']:>8.1f} {r['seconds']:>8.0f} "
            f"{r['synth_seconds']:>8.0f} {r['peak_gb']:>8.2f} "
            f"{r['down_per_site_round'] / 1e3:>19.1f} {r['up_per_site_round'] / 1e3:>17.1f}"
            + (f"   stopped: {r['stopped']}" if r["stopped"] else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
