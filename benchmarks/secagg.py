"""Measure what secure aggregation costs.

Plain FedAvg vs SecAgg+ on a real SuperLink with TLS and four enrolled SuperNodes on loopback, a
~30M-parameter 3D U-Net, side by side in one run.

    python benchmarks/secagg.py [--rounds N]

Prints per round: wall time, the sites' training time, the non-training time (wall minus the
slowest site's training), and the bytes each site sent (from each site's egress log).
Anchors: SecAgg 1.73x bytes (Bonawitz 2017); homomorphic encryption 2.7x end-to-end (NVFlare).
Targets: <= 2x bytes, <= 1.5x non-training round time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedhealth.config import compose
from fedhealth.data.synth import write_cohort
from fedhealth.models.factory import build_model, num_parameters
from fedhealth.security.certs import create_ca, create_server_cert, create_site_keys
from fedhealth.testing.loopback import (
    Procs,
    flower_env,
    flwr,
    free_ports,
    node_policy,
    round_costs,
    run_to_completion,
    start_tls_superlink,
)

PROJECT = Path(__file__).resolve().parents[1]
SITES = 4
MODEL = ["model.channels=[40,80,160,320,640]", "model.strides=[2,2,2,2]", "model.num_res_units=2"]


def run(work: Path, rounds: int, env: dict[str, str], *, secure: bool) -> dict[str, Any]:
    name = "secagg" if secure else "plain"
    cfg = compose(
        [
            f"sites={SITES}",
            f"rounds={rounds}",
            "train.local_epochs=1",
            "privacy=off",
            "train.batch_size=1",
            f"federation.secure_aggregation={str(secure).lower()}",
            f"run_root={work / 'runs'}",
            f"run_name={name}",
            "strategy.min_sites=4",
            "federation.round_timeout=900",
            *MODEL,
        ]
    )
    t0 = time.perf_counter()
    run_to_completion(env, PROJECT, "bench", cfg, work)
    rows = round_costs(work / "runs" / name)
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    params = num_parameters(build_model(compose(MODEL).model))
    with tempfile.TemporaryDirectory(prefix="fedhealth-secagg-bench-") as tmp:
        work = Path(tmp)
        write_cohort(work / "data", SITES, seed=0, n_train=1, n_test=1, fov=32)
        keys = work / "certs"
        ca = create_ca(keys)
        create_server_cert(ca, keys, ["127.0.0.1"])
        env = flower_env(work / "flwr-home")
        procs = Procs(work, env)
        link, control, *node_ports = free_ports(SITES + 2)
        (work / "flwr-home").mkdir()
        results = {}
        try:
            start_tls_superlink(procs, keys, link, work / "flwr-home", "bench", control)
            for site in range(SITES):
                key, pub = create_site_keys(keys, f"site-{site}")
                flwr(env, ["supernode", "register", str(pub), "bench"], cwd=work, timeout=60)
                procs.start(
                    f"supernode-{site}",
                    [
                        "flower-supernode",
                        "--superlink",
                        f"127.0.0.1:{link}",
                        "--port",
                        str(node_ports[site]),
                        "--root-certificates",
                        str(keys / "ca.crt"),
                        "--auth-supernode-private-key",
                        str(key),
                        "--node-config",
                        f"data-dir='{work / 'data' / f'site-{site}'}' site-name='site-{site}' "
                        f"egress-log='{work / f'egress-{site}.jsonl'}' "
                        # a privacy=off benchmark of plain vs secure rounds: the sites allow both
                        + node_policy(
                            require_dp=False, require_secure_aggregation=False, min_secagg_sites=2
                        ),
                    ],
                )
            for secure in (False, True):
                before = {s: _egress_bytes(work, s) for s in range(SITES)}
                results[secure] = run(work, args.rounds, env, secure=secure)
                after = {s: _egress_bytes(work, s) for s in range(SITES)}
                results[secure]["bytes"] = {
                    s: (after[s] - before[s]) / args.rounds for s in range(SITES)
                }
        finally:
            procs.stop()

    print(
        f"\nSecure aggregation vs plain FedAvg: {SITES} sites, TLS + SuperNode auth on loopback, "
        f"3D U-Net with {params / 1e6:.1f}M parameters, {args.rounds} round(s) each"
    )
    for secure, label in ((False, "plain FedAvg"), (True, "SecAgg+")):
        r = results[secure]
        for row in r["rows"]:
            print(
                f"  {label:<13} round {row['round']}: wall {row['wall']:6.1f}s  training "
                f"{row['train']:5.1f}s  non-training {row['other']:6.1f}s"
            )
    other = {
        s: sum(x["other"] for x in results[s]["rows"]) / len(results[s]["rows"]) for s in results
    }
    sent = {s: sum(results[s]["bytes"].values()) / SITES for s in results}
    print(
        f"  bytes sent per site per round: plain {sent[False] / 1e6:.1f} MB, SecAgg+ "
        f"{sent[True] / 1e6:.1f} MB, ratio {sent[True] / sent[False]:.2f}x "
        "(target <= 2x; anchor 1.73x)"
    )
    print(
        f"  non-training round time: plain {other[False]:.1f}s, SecAgg+ {other[True]:.1f}s, "
        f"ratio {other[True] / other[False]:.2f}x (target <= 1.5x)"
    )
    return 0


def _egress_bytes(work: Path, site: int) -> int:
    path = work / f"egress-{site}.jsonl"
    if not path.is_file():
        return 0
    return sum(json.loads(line)["bytes"] for line in path.read_text().splitlines())


if __name__ == "__main__":
    sys.exit(main())
