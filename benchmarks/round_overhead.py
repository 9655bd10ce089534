"""Measure what a federated round costs besides training.

Stock Flower SuperNodes vs SuperNodes with the warm executor (:mod:`fedhealth.supernode.warm`),
side by side in one run: a real SuperLink with TLS and SuperNode auth, four enrolled SuperNodes
on loopback, ``flwr run``, same app and config (tiny U-Net, a few patients per site, privacy
off).

    python benchmarks/round_overhead.py [--rounds 5] [--secagg]

(a) stock: ``flower-supernode`` (default isolation: a fresh ``flwr-clientapp`` process per
    message, SuperExec polling every 1 s);
(b) ours:  ``flower-supernode --isolation process`` + ``python -m fedhealth.supernode.warm``
    (children forked from a pre-warmed template, polling every 0.1 s), and the ServerApp pulling
    replies every 0.1 s (:class:`fedhealth.serverapp.polling.PolledGrid`; stock: every 3 s);
    evaluation folded into the next round's train message (``federation.fold_evaluate``,
    the default): one message phase per round, the last round adds its evaluate phase;
    the SuperNode polls every 0.5 s (:mod:`fedhealth.supernode.paced`; Flower: 3 s after
    an empty pull; right after a message 0.1 s, doubling) and its own state for a reply every
    0.05 s (Flower: 0.5 s), each ClientApp pulls its message with a 0.05 s backoff (Flower:
    1 s, 2 s);
    the model travels as one packed float32 array (:mod:`fedhealth.protocol.packing`);
(c) ours-flower-polls: (b) with Flower's own SuperNode and pull backoff, to show what (b)'s
    polling saves;
(d) ours-per-tensor: (b) with the model sent as one array per tensor (Flower's one HTTPS
    request per array) instead of one packed vector (``federation.pack_arrays``);
(e) ours-unfolded: (b) with an evaluate phase in every round, to show what folding saves;
(f) ours-sqlite: (b) with the SuperLink's state in an SQLite file and its message objects in
    memory, as ``fedhealth server run`` runs it (:mod:`fedhealth.superlink.link`);
    ours-sqlite-objects: the objects in that file too (Flower's own ``--database`` behaviour);
(g) ours-fp16: (b) with the model and updates in float16 on the wire;
(h) ours-glibc-malloc: (b) with glibc's default allocator settings, as stock runs (ours: the
    thresholds of :data:`fedhealth.service.process.MALLOC_SETTINGS`, no page zeroing for
    model-sized buffers);
--secagg adds stock and ours with secure aggregation (four train stages per round, plus an
evaluate phase in stock), and ours-secagg-serial: ours-secagg with every stage inside its round
(``federation.secagg_key_ahead=false``; ours sets up the next round's keys while it aggregates).

Prints the ClientApp start latency (task acquired -> handler's imports done), then per round the
wall time (``elapsed_s`` in metrics.jsonl), the slowest site's ``train-seconds`` and the rest,
then ours/stock and the targets (ours <= 5 s and <= 1/4 of stock), then where ours' time goes,
from the warm executor's task log.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec

from fedhealth.config import Config, compose
from fedhealth.data.synth import write_cohort
from fedhealth.errors import FederationError, RunIncomplete
from fedhealth.security.certs import create_ca, create_server_cert, create_site_keys
from fedhealth.service.process import MALLOC_SETTINGS
from fedhealth.supernode.warm import WarmExecutor
from fedhealth.testing.loopback import (
    BIN,
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
POLL = 0.1
PULL_INTERVAL = 0.5  # the site daemon's default pull_interval
TARGET_S, TARGET_RATIO = 5.0, 0.25
MODEL_NAMES = {"tiny": "tiny U-Net", "large": "30.0M-parameter 3D U-Net (120 MB in float32)"}
# Model sizes: the default tiny U-Net, and a real-size 3D U-Net (30.0M parameters, 120 MB in
# float32), the size of brain-tumour models in use (nnU-Net, SegResNet, SwinUNETR: 5-60M).
MODELS = {
    "tiny": (),
    "large": (
        "model.channels=[40,80,160,320,640]",
        "model.strides=[2,2,2,2]",
        "model.num_res_units=2",
        "train.batch_size=1",
    ),
}
# What a ClientApp process imports before its handler can work: Flower's runtime, the app (what
# clients/client_app.py imports; that thin entry itself comes from the run's FAB, not from an
# installed package), and the site code (torch, MONAI, Opacus).
HANDLER_IMPORTS = (
    "flwr.supernode.cli.flwr_clientapp",
    "fedhealth.clientapp.app",
    "fedhealth.clientapp.egress",
    "fedhealth.clientapp.handlers",
)
LAUNCHED = re.compile(r"^(\S+ \S+) INFO fedhealth\.warm: task (\d+) run \d+: launched")
EXITED = re.compile(r"^(\S+ \S+) \w+ fedhealth\.warm: task (\d+): pid \d+ exited")
EVENT = re.compile(r"^(\S+ \S+) \w+ fedhealth\.site: .*\[fedhealth-event\] (\{.*\})$")


@dataclass(frozen=True)
class Run:
    """One deployment measured: which SuperNodes, which message phases, which overrides.

    Parameters
    ----------
    name : str
        The run's name (its run directory and row label).
    mode : str
        ``"stock"`` (Flower's own SuperNode) or ``"ours"`` (warm executor, paced polling).
    phase_names : tuple of str
        The message phases of one round.
    secure : bool, optional
        Secure aggregation on (default False).
    overrides : tuple of str, optional
        Hydra overrides of the run config (default none).
    baseline : str, optional
        The run this one is compared with (default ``"stock"``).
    folded : bool, optional
        The last round has one more phase, its evaluate (default False).
    paced : bool, optional
        Ours only: SuperNode pull interval ``PULL_INTERVAL`` and ClientApp pull backoff 0.05 s
        (default True; False: Flower's own polling).
    database : str, optional
        ``""`` (default): the SuperLink keeps everything in memory (Flower's default).
        ``"memory"``: its state in an SQLite file and message objects in memory, as the
        coordinator service runs it (:mod:`fedhealth.superlink.link`). ``"database"``: message
        objects (every model chunk) in that file too, Flower 1.39's own behaviour with
        ``--database`` (``coordinator.yaml`` ``object_store: database``).
    malloc : bool, optional
        Ours only: the processes run with :data:`~fedhealth.service.process.MALLOC_SETTINGS`, as
        :func:`~fedhealth.service.process.flower_env` sets them (default True; False and stock:
        glibc's defaults).
    """

    name: str
    mode: str  # "stock" or "ours"
    phase_names: tuple[str, ...]  # message phases per round
    secure: bool = False
    overrides: tuple[str, ...] = ()
    baseline: str = "stock"
    folded: bool = False  # the last round has one more phase (its evaluate)
    paced: bool = True  # ours: SuperNode pull interval PULL_INTERVAL, child pull backoff 0.05 s
    database: str = ""  # "memory": state in SQLite, objects in memory; "database": both SQLite
    malloc: bool = True  # ours: MALLOC_SETTINGS in the processes' environment (stock: never)


PLAIN = ("train", "evaluate")
SECAGG = ("secagg_advertise", "secagg_share", "secagg_mask", "secagg_unmask", "evaluate")
# Flower's own send_and_receive pulls replies every 3 s; stock evaluates in its own phase.
STOCK = (
    "federation.reply_poll_interval=3.0",
    "federation.fold_evaluate=false",
    "federation.pack_arrays=false",
)
UNFOLDED = ("federation.fold_evaluate=false",)
RUNS = (
    Run("stock", "stock", PLAIN, overrides=STOCK),
    # warm executor + fast reply polling, evaluate still in its own phase
    Run("ours-unfolded", "ours", PLAIN, overrides=UNFOLDED),
    # ours with Flower's own polling: the SuperNode sleeping 3 s after an empty pull and
    # 0.5 s between reply checks, the ClientApp's message pull backing off 1 s, 2 s, ...
    Run("ours-flower-polls", "ours", ("train",), folded=True, paced=False),
    # ours with the model sent as one array per tensor (one gRPC call each)
    Run(
        "ours-per-tensor",
        "ours",
        ("train",),
        overrides=("federation.pack_arrays=false",),
        folded=True,
    ),
    # ours as configured by default: evaluation folded into the next train message, one
    # phase per round (the last round adds its evaluate phase)
    Run("ours", "ours", ("train",), folded=True),
    # ours with glibc's allocator defaults: every model-sized buffer mapped and zeroed anew
    Run("ours-glibc-malloc", "ours", ("train",), folded=True, malloc=False),
    # ours with the SuperLink's state in SQLite and message objects in memory, as the
    # coordinator service runs it; then with the objects in SQLite too (Flower's own choice)
    Run("ours-sqlite", "ours", ("train",), folded=True, database="memory"),
    Run("ours-sqlite-objects", "ours", ("train",), folded=True, database="database"),
    # ours with the model and the updates on the wire in float16: half the bytes
    Run(
        "ours-fp16",
        "ours",
        ("train",),
        overrides=("federation.transport_dtype=float16",),
        folded=True,
    ),
)
SECAGG_RUNS = (
    Run("stock-secagg", "stock", SECAGG, True, overrides=STOCK),
    Run("ours-secagg", "ours", SECAGG[:-1], True, baseline="stock-secagg", folded=True),
    # ours-secagg with all four stages inside each round (no keys set up ahead)
    Run(
        "ours-secagg-serial",
        "ours",
        SECAGG[:-1],
        True,
        overrides=("federation.secagg_key_ahead=false",),
        baseline="stock-secagg",
        folded=True,
    ),
)


def _probe(out: Path, spec: ExecutionSpec) -> None:
    """Warm child: the handler's imports, then the time they were done."""
    for module in HANDLER_IMPORTS:
        importlib.import_module(module)
    out.with_suffix(f".{spec.task_id}").write_text(repr(time.time()))


def launch_latency(work: Path, concurrent: int, repeats: int = 2) -> dict[str, float]:
    """Time a ClientApp start: 'task acquired' to 'handler ready', in seconds.

    The slowest of ``concurrent`` launches, median over ``repeats``: a fresh interpreter (stock)
    vs a fork of the warm template.
    """
    stock, warm = [], []
    for _ in range(repeats):
        t0 = time.time()
        code = (
            f"import importlib, time; [importlib.import_module(m) for m in {HANDLER_IMPORTS}]; "
            "print(repr(time.time()))"
        )
        procs = [
            subprocess.Popen(
                [str(BIN / "python"), "-c", code], cwd=PROJECT, text=True, stdout=subprocess.PIPE
            )
            for _ in range(concurrent)
        ]
        stock.append(max(float(p.communicate()[0]) for p in procs) - t0)
    executor = WarmExecutor(target=functools.partial(_probe, work / "probe"))
    executor.warm_up()
    for r in range(repeats):
        t0 = time.time()
        ids = [1 + r * concurrent + i for i in range(concurrent)]
        for task_id in ids:
            executor.launch(
                ExecutionSpec(
                    task_type=TaskType.CLIENT_APP,
                    runtime_api_address="127.0.0.1:1",
                    token="probe",
                    insecure=True,
                    root_certificates_path=None,
                    runtime_dependency_install=False,
                    parent_pid=os.getpid(),
                    suppress_output=False,
                    task_id=task_id,
                )
            )
        while executor.children:
            executor.reconcile()
            time.sleep(0.02)
        warm.append(max(float((work / f"probe.{i}").read_text()) for i in ids) - t0)
    executor.close()
    return {"stock": statistics.median(stock), "ours": statistics.median(warm)}


def deploy_and_run(
    work: Path,
    run: Run,
    rounds: int,
    keys: Path,
    env: dict[str, str],
    model: tuple[str, ...] = (),
) -> dict:
    """Deploy a fresh SuperLink and SITES SuperNodes in ``run.mode``, run once; per-round rows."""
    name, mode = run.name, run.mode
    logs = work / name
    logs.mkdir()
    if mode == "stock" or not run.malloc:
        env = {k: v for k, v in env.items() if k not in MALLOC_SETTINGS}
    procs = Procs(logs, env)
    link, control, *ports = free_ports(SITES + 2)
    try:
        database = logs / "superlink.db" if run.database else None
        start_tls_superlink(
            procs, keys, link, work / "flwr-home", "bench", control, database, run.database
        )
        for site in range(SITES):
            flwr(
                env,
                [
                    "supernode",
                    "register",
                    str(keys / "sites" / f"site-{site}" / "auth.pub"),
                    "bench",
                ],
                cwd=work,
                timeout=60,
            )
            paced = mode == "ours" and run.paced
            launcher = (
                [
                    "python",
                    "-m",
                    "fedhealth.supernode.paced",
                    "--pull-interval",
                    str(PULL_INTERVAL),
                    "--",
                ]
                if paced
                else ["flower-supernode"]
            )
            node = procs.start(
                f"supernode-{site}",
                [
                    *launcher,
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--port",
                    str(ports[site]),
                    "--root-certificates",
                    str(keys / "ca.crt"),
                    "--auth-supernode-private-key",
                    str(keys / "sites" / f"site-{site}" / "auth.key"),
                    *(["--isolation", "process"] if mode == "ours" else []),
                    "--node-config",
                    f"data-dir='{work / 'data' / f'site-{site}'}' site-name='site-{site}' "
                    # a privacy=off baseline of plain rounds: the sites opt out of DP and SecAgg
                    + node_policy(
                        require_dp=False,
                        require_secure_aggregation=False,
                        min_secagg_sites=2,
                        # train-seconds: what round_costs splits the round by
                        release=["train-seconds", "evaluation"],
                    ),
                ],
            )
            if mode == "ours":
                procs.start(
                    f"warm-{site}",
                    [
                        "python",
                        "-m",
                        "fedhealth.supernode.warm",
                        "--appio-api-address",
                        f"127.0.0.1:{ports[site]}",
                        "--parent-pid",
                        str(node.pid),
                        "--poll-interval",
                        str(POLL),
                        *([] if paced else ["--flower-pull-backoff"]),
                    ],
                )
        ready = ["SuperNode ID"] + (["template process ready"] if mode == "ours" else [])
        _wait_for_logs(procs, logs, ready, timeout=300)
        cfg = compose(
            [
                f"sites={SITES}",
                f"rounds={rounds}",
                "train.local_epochs=1",
                "privacy=off",
                f"federation.secure_aggregation={str(run.secure).lower()}",
                f"strategy.min_sites={SITES}",
                "federation.round_timeout=600",
                f"run_root={work / 'runs'}",
                f"run_name={name}",
                *model,
                *run.overrides,
            ]
        )
        try:
            run_to_completion(env, PROJECT, "bench", cfg, work)
        except (FederationError, RunIncomplete) as exc:
            raise type(exc)(f"{exc}\n{procs.logs()}") from exc
    finally:
        procs.stop()
    rows = round_costs(work / "runs" / name)
    phases = [*run.phase_names * rounds, *(["evaluate"] if run.folded else [])]
    result = {
        "name": name,
        "rows": rows,
        "phases": phases,
        "tasks": [_task_log(logs / f"warm-{s}.log") for s in range(SITES)]
        if mode == "ours"
        else None,
        "bytes": _wire_bytes(cfg, run.secure),
    }
    if mode == "ours" and not run.secure:
        result["spans"] = spans(result, work / "runs" / name)
    return result


def _wire_bytes(cfg: Config, secure: bool) -> tuple[int, int]:
    """(down, up) bytes per site per round of a run, from its model and transport dtype."""
    from fedhealth.protocol.transport import model_values, wire_bytes

    return wire_bytes(model_values(cfg.model), cfg.federation.transport_dtype, secure=secure)


def _wait_for_logs(procs: Procs, logs: Path, needles: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        texts = [
            p.read_text(errors="replace")
            for p in sorted(logs.glob("*.log"))
            if not p.name.startswith("superlink")
        ]
        if all(sum(needle in t for t in texts) >= SITES for needle in needles):
            return
        time.sleep(0.5)
    raise TimeoutError(f"not all of {needles} within {timeout}s:\n{procs.logs()}")


def _task_log(path: Path) -> list[dict]:
    """One site's tasks in order: acquired/exited wall times (s) and the site's events in it.

    ``events`` maps ``started:<phase>``, ``trained`` and ``evaluated`` to when the site logged
    them (:mod:`fedhealth.clientapp.events`).
    """

    def stamp(text: str) -> float:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()

    tasks: dict[str, dict] = {}
    current: dict | None = None
    for line in path.read_text(errors="replace").splitlines():
        if m := LAUNCHED.match(line):
            current = tasks[m[2]] = {"start": stamp(m[1]), "events": {}}
        elif (m := EXITED.match(line)) and m[2] in tasks:
            tasks[m[2]]["end"] = stamp(m[1])
            current = None
        elif current is not None and (m := EVENT.match(line)):
            event = json.loads(m[2])
            kind = event["event"].rsplit(".", 1)[-1]
            name = f"started:{event.get('phase')}" if kind == "started" else kind
            current["events"][name] = stamp(m[1])
    return [t for t in tasks.values() if "end" in t]


SPANS = (
    ("pull", "message to the site: SuperNode -> ClientApp, FAB, imports"),
    ("model in+out", "data, global model in, update packed and checked"),
    ("evaluate", "the previous round's model on the test cases (folded)"),
    ("push", "the reply: ClientApp -> SuperNode"),
    ("relay", "SuperNode -> SuperLink -> ServerApp and back, minus its steps below"),
    ("aggregate", "coordinator: validate and aggregate the replies"),
    ("checkpoint", "coordinator: write the global model"),
)


def spans(result: dict, run_dir: Path) -> dict[str, float]:
    """Where a round's non-training time goes: mean seconds per train phase, by span.

    Site spans are the slowest site's, from the warm executors' task logs and the sites'
    events; ``relay`` is the gap from the last site's exit to the next round's first
    pickup, minus the coordinator's own ``aggregate`` and ``checkpoint`` seconds
    (``coordinator_s`` in ``metrics.jsonl``).
    """
    from fedhealth.runs.rundir import read_metrics

    lines = {line["round"]: line for line in read_metrics(run_dir)}
    sites = result["tasks"]
    rows: dict[str, list[float]] = {name: [] for name, _ in SPANS}
    count = min(len(t) for t in sites)
    for k in range(count):
        line = lines.get(k + 1, {})
        if "train" not in line or k + 1 >= count:
            continue
        train = {name: m.get("train-seconds", 0.0) for name, m in line["train"]["sites"].items()}
        per_site = []
        for site, tasks in enumerate(sites):
            task, ev = tasks[k], tasks[k]["events"]
            if "started:train" not in ev or "trained" not in ev:
                continue
            last = max(ev.get("evaluated", 0.0), ev["trained"])
            per_site.append(
                {
                    "pull": ev["started:train"] - task["start"],
                    "model in+out": ev["trained"]
                    - ev["started:train"]
                    - train.get(f"site-{site}", 0.0),
                    "evaluate": ev.get("evaluated", 0.0) - ev.get("started:evaluate", 0.0),
                    "push": task["end"] - last,
                }
            )
        if not per_site:
            continue
        for name in ("pull", "model in+out", "evaluate", "push"):
            rows[name].append(max(p[name] for p in per_site))
        coordinator = line.get("coordinator_s", {})
        gap = min(t[k + 1]["start"] for t in sites) - max(t[k]["end"] for t in sites)
        rows["aggregate"].append(coordinator.get("aggregate", 0.0))
        rows["checkpoint"].append(coordinator.get("checkpoint", 0.0))
        rows["relay"].append(gap - rows["aggregate"][-1] - rows["checkpoint"][-1])
    return {name: statistics.mean(v) for name, v in rows.items() if v}


def breakdown(result: dict) -> list[str]:
    """Break each message phase down, from the warm executors' task logs.

    Per phase: how far apart the sites picked the message up (mostly the SuperNode's 3 s sleep
    after an empty pull), how long the ClientApp task ran (fork to exit: Runtime API transfers,
    FAB install, the handler's compute), and the idle time from the last site's exit to the next
    phase's first pickup (the SuperNode's 0.5 s reply poll and upload, the ServerApp grid's 3 s
    reply poll, aggregation, the next pull sleep).
    """
    sites, phases = result["tasks"], result["phases"]
    names = list(dict.fromkeys(phases))
    count = min(len(t) for t in sites)
    rows: dict[str, list[tuple[float, float, float | None]]] = {n: [] for n in names}
    for k in range(min(count, len(phases))):
        starts = [s[k]["start"] for s in sites]
        ends = [s[k]["end"] for s in sites]
        idle = min(s[k + 1]["start"] for s in sites) - max(ends) if k + 1 < count else None
        rows[phases[k]].append(
            (
                max(starts) - min(starts),
                statistics.mean(e - b for b, e in zip(starts, ends, strict=True)),
                idle,
            )
        )
    out = [
        f"  {result['name']}: {len(phases)} message phases in all; mean per phase, s:",
        f"    {'phase':<18}{'pickup spread':>14}{'task':>8}{'idle after':>12}",
    ]
    for name, values in rows.items():
        idle = [v[2] for v in values if v[2] is not None]
        out.append(
            f"    {name:<18}{statistics.mean(v[0] for v in values):>14.2f}"
            f"{statistics.mean(v[1] for v in values):>8.2f}"
            f"{statistics.mean(idle) if idle else float('nan'):>12.2f}"
        )
    if gaps := between_rounds(result):
        out.append(
            f"    between rounds (last unmask task's exit -> first pickup of the next mask "
            f"stage): {' '.join(f'{g:.2f}' for g in gaps)} s"
        )
    return out


def between_rounds(result: dict) -> list[float]:
    """Seconds from a secure round's last unmask task exit to the next mask stage's first pickup.

    The stretch keying ahead (``federation.secagg_key_ahead``) overlaps with the coordinator's
    aggregation and checkpoint; empty for a run without secure aggregation.
    """
    sites, phases = result["tasks"], result["phases"]
    count = min(len(t) for t in sites)
    gaps = []
    for k, name in enumerate(phases[:count]):
        nxt = k + 3  # unmask, then the next round's advertise, share, mask
        if name == "secagg_unmask" and nxt < count and phases[nxt] == "secagg_mask":
            gaps.append(min(s[nxt]["start"] for s in sites) - max(s[k]["end"] for s in sites))
    return gaps


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--secagg",
        action="store_true",
        help="also run both modes with secure aggregation (5 phases per round)",
    )
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="tiny",
        help="tiny U-Net, or a real-size 30M-parameter 3D U-Net",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated run names to measure (default: all)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep logs and run directories here (default: a temporary directory)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedhealth-round-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=args.workdir is None)
        write_cohort(work / "data", SITES, seed=0, n_train=4, n_test=2, fov=32)
        keys = work / "certs"
        create_server_cert(create_ca(keys), keys, ["127.0.0.1"])
        for site in range(SITES):
            create_site_keys(keys, f"site-{site}")
        env = flower_env(work / "flwr-home")
        (work / "flwr-home").mkdir()
        latency = {n: launch_latency(work, n) for n in (1, SITES)}
        runs = [*RUNS, *(SECAGG_RUNS if args.secagg else ())]
        if args.only:
            runs = [r for r in runs if r.name in args.only.split(",")]
        results = [
            deploy_and_run(work, run, args.rounds, keys, env, MODELS[args.model]) for run in runs
        ]

    print(
        f"\nRound overhead: {SITES} sites, TLS + SuperNode auth on loopback, {args.rounds} "
        f"rounds, {MODEL_NAMES[args.model]}, 4 train / 2 test patients per site, privacy off"
    )
    print("ClientApp start, task acquired -> handler's imports done (slowest of N at once):")
    for n, row in latency.items():
        print(f"  N={n}: stock {row['stock']:5.2f} s   ours {row['ours']:5.2f} s")
    print(f"  {'run':<21}{'round':>6}{'wall s':>9}{'train s':>9}{'other s':>9}")
    for result in results:
        for row in result["rows"]:
            print(
                f"  {result['name']:<21}{row['round']:>6}{row['wall']:>9.2f}{row['train']:>9.2f}"
                f"{row['other']:>9.2f}"
            )
    other = {r["name"]: statistics.mean(x["other"] for x in r["rows"]) for r in results}
    print("non-training time per round (mean over rounds):")
    for run in runs:
        if run.mode == "ours" and run.baseline not in other:
            print(f"  {run.name:<20} {other[run.name]:6.2f} s ({run.baseline} not run)")
        elif run.mode == "ours":
            stock, ours = other[run.baseline], other[run.name]
            ratio = ours / stock
            print(
                f"  {run.name:<20} {ours:6.2f} s vs {run.baseline} {stock:6.2f} s: ratio "
                f"{ratio:.2f}; <= {TARGET_S:g} s: {'yes' if ours <= TARGET_S else 'NO'}; "
                f"<= {TARGET_RATIO:g} x stock: {'yes' if ratio <= TARGET_RATIO else 'NO'}"
            )
    print("bytes per site per round (the arrays' payload, both ways), and what a hospital link")
    print("adds to a round (down + up, at full link speed):")
    print(f"  {'run':<21}{'down MB':>9}{'up MB':>9}{'100 Mb/s':>10}{'1 Gb/s':>9}")
    for result in results:
        down, up = result["bytes"]
        print(
            f"  {result['name']:<21}{down / 1e6:>9.1f}{up / 1e6:>9.1f}"
            f"{8 * (down + up) / 100e6:>9.1f}s{8 * (down + up) / 1e9:>8.1f}s"
        )
    for name in ("ours-secagg", "ours-secagg-serial"):
        if {"ours", name} <= set(other):
            plain, secure = other["ours"], other[name]
            print(
                f"secure aggregation with our stack ({name}): {secure:.2f} s vs {plain:.2f} s "
                f"non-training per round: {secure / plain:.2f}x (target <= 1.5x: "
                f"{'yes' if secure / plain <= 1.5 else 'NO'})"
            )
    print("where ours' time goes:")
    for result in results:
        if result["tasks"]:
            print("\n".join(breakdown(result)))
    timed = [r for r in results if r.get("spans")]
    if timed:
        print("a train phase's non-training time by span (mean s per round; slowest site):")
        width = {r["name"]: max(16, len(r["name"]) + 2) for r in timed}
        print(f"  {'span':<14}" + "".join(f"{n:>{w}}" for n, w in width.items()) + "   what")
        for name, what in SPANS:
            print(
                f"  {name:<14}"
                + "".join(
                    f"{r['spans'].get(name, float('nan')):>{width[r['name']]}.2f}" for r in timed
                )
                + f"   {what}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
