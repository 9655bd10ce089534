"""The coordinator's ServerApp: rounds of the guarded strategy, checkpoints, the run directory.

``server/server_app.py`` exposes :func:`make_server_app` to ``flwr run``; ``fedhealth simulate``
binds a config and run directory directly (Flower's simulation API passes no run config).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.app.typing import MetricRecordValues
from flwr.serverapp import Grid, ServerApp

from fedhealth.errors import RunStopped
from fedhealth.protocol import keys as K
from fedhealth.protocol.npy import array_view
from fedhealth.protocol.packing import layout, pack, unpack
from fedhealth.reports.progress import ROUND_FIELD

if TYPE_CHECKING:  # torch, MONAI and Opacus load only where a handler needs them, so the light
    # secure-aggregation stages start fast in a fresh ClientApp process.
    from fedhealth.config import Config
    from fedhealth.runs.rundir import RunDir
    from fedhealth.runs.tracking import Tracker

log = logging.getLogger("fedhealth.coordinator")


def run_federation(grid: Grid, cfg: Config, run_dir: RunDir, *, enrolled: bool = False) -> None:
    """Run the configured strategy's rounds; checkpoints and metrics go to ``run_dir``.

    A run directory left by a killed coordinator is resumed: the global model and the
    strategy's state come from the last completed round's checkpoints (sha256-verified) and the
    remaining rounds keep their round numbers, seeds and learning rates.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid; wrapped in :class:`~fedhealth.serverapp.polling.PolledGrid` and,
        with secure aggregation, :class:`~fedhealth.serverapp.secure_grid.SecureGrid`.
    cfg : Config
        The resolved run config.
    run_dir : RunDir
        The run directory (new or resumed).
    enrolled : bool, default False
        Keyword-only. Deployment: file every reply under its node's enrolled site name
        (:class:`~fedhealth.serverapp.enrolled.EnrolledGrid`); False (simulation): under the
        name each site reports.

    Raises
    ------
    CheckpointError
        A resumed run's checkpoint does not match its recorded sha256.
    """
    from fedhealth.config import site_settings
    from fedhealth.models import build_model
    from fedhealth.protocol.transport import round_deadline
    from fedhealth.serverapp.strategies import build_strategy
    from fedhealth.training import seed_everything

    if run_dir.finished:
        log.info("run %s already finished; nothing to do", run_dir.path.name)
        return
    seed_everything(cfg.seed)
    fed = cfg.federation
    model_state = build_model(cfg.model).state_dict()
    shapes = layout(model_state) if fed.pack_arrays else None
    initial = pack(model_state) if fed.pack_arrays else ArrayRecord(model_state)
    done = run_dir.resumed_from or 0
    deadline = round_deadline(cfg, sum(int(v.numel()) for v in model_state.values()))
    strategy = build_strategy(cfg, run_dir, deadline)
    if run_dir.resumed_from is not None:
        arrays = run_dir.checkpoints.load(done)  # refuses a file whose sha256 does not match
        tensors = {k: np.ascontiguousarray(arrays[k]) for k in model_state}
        initial = (
            pack(tensors)
            if fed.pack_arrays
            else ArrayRecord({k: Array(v) for k, v in tensors.items()})
        )
        if done in run_dir.checkpoints.rounds("strategy"):
            strategy.load_state_dict(run_dir.checkpoints.load(done, "strategy"))
        strategy.round_offset = done
        log.warning("run %s: resuming after round %d of %d", run_dir.path.name, done, cfg.rounds)
    from fedhealth.serverapp.polling import PolledGrid

    if enrolled:
        from fedhealth.serverapp.enrolled import EnrolledGrid

        grid = EnrolledGrid(grid)
    grid = PolledGrid(grid, interval=fed.reply_poll_interval)
    secure = None
    if fed.secure_aggregation:
        from fedhealth.serverapp.secure_grid import SecureGrid

        grid = secure = SecureGrid(
            grid,
            threshold_fraction=fed.secagg_threshold,
            degree=fed.secagg_degree,
            clipping_range=fed.secagg_clipping_range,
            max_examples=fed.secagg_max_examples,
            ledgers=run_dir.ledgers,
            last_round=cfg.rounds if fed.secagg_key_ahead else None,
        )
    instruction = ConfigRecord({**site_settings(cfg), K.RUN_KEY: run_dir.key})
    tracker = _tracker(run_dir, cfg)

    def end_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += done
        if server_round == done and run_dir.resumed_from is not None:
            return None  # the resumed round's checkpoint and line are already written
        state = strategy.state_dict()
        if state:
            run_dir.checkpoints.save(server_round, state, "strategy")
        tensors = (
            unpack(arrays, shapes, f"round {server_round} global model")
            if shapes
            else {k: array_view(v) for k, v in arrays.items()}
        )
        lines = run_dir.end_round(
            server_round, tensors, defer_evaluate=strategy.folds(server_round)
        )
        if tracker is not None:
            tracker.log_lines(lines)
        weighted: dict[str, MetricRecordValues] = {}
        for line in lines:
            if not line["round"]:
                continue
            evaluated: dict[str, Any] = dict(line.get("evaluate") or {})
            weighted = dict(evaluated.get("weighted", {})) or weighted
            sites = {n: m["dice"] for n, m in evaluated.get("sites", {}).items() if "dice" in m}
            figures = {
                "round": line["round"],
                "rounds": cfg.rounds,
                "dice": evaluated.get("weighted", {}).get("dice"),
                "sites": sites,
                "rejected": sorted(line.get("train", {}).get("rejected", {})),
            }
            log.info(
                "round %d/%d: weighted dice %.4f | %s",
                line["round"],
                cfg.rounds,
                figures["dice"] if figures["dice"] is not None else float("nan"),
                ", ".join(f"{n} {d:.3f}" for n, d in sorted(sites.items())),
                extra={ROUND_FIELD: figures},
            )
        return MetricRecord(weighted) if weighted else None

    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.rounds - done,
            timeout=deadline,
            train_config=instruction,
            evaluate_config=instruction,
            evaluate_fn=end_round,
        )
    except RunStopped as stop:
        if secure is not None:
            secure.finish()  # keys set up ahead for a round that will not come
        log.warning("run stopped cleanly: %s", stop)
        if tracker is not None:
            tracker.log_lines(run_dir.flush_pending())
        run_dir.stop(run_dir.manifest["rounds_completed"] + 1, str(stop))
    else:
        if tracker is not None:
            tracker.log_lines(run_dir.flush_pending())
        run_dir.finish()
    from fedhealth.reports.model_card import write_model_card

    card = write_model_card(run_dir.path)
    log.info("model card: %s", card)
    if tracker is not None:
        done_round = run_dir.manifest["rounds_completed"]
        tracker.log_artifacts([run_dir.path / n for n in ("config.yaml", "manifest.json")])
        tracker.log_artifacts(
            [card, run_dir.path / "metrics.jsonl", run_dir.path / "privacy.jsonl"]
        )
        tracker.log_artifacts([run_dir.checkpoints.path(done_round)], "model")
        tracker.end("KILLED" if "stopped" in run_dir.manifest else "FINISHED")
        log.info("MLflow run %s: %s", tracker.run_id, tracker.ui_hint())


def _tracker(run_dir: RunDir, cfg: Config) -> Tracker | None:
    """Open the run's MLflow run; tracking that fails is logged and never stops the run."""
    if not cfg.tracking.enabled:
        return None
    from fedhealth.runs.tracking import Tracker

    try:
        return Tracker(run_dir, cfg)
    except Exception as exc:  # noqa: BLE001 - a tracking server down must not stop training
        log.error("MLflow tracking off for run %s: %s", run_dir.path.name, exc)
        return None


def make_server_app(cfg: Config | None = None, run_dir: RunDir | None = None) -> ServerApp:
    """Return the coordinator's Flower ``ServerApp``.

    Parameters
    ----------
    cfg : Config or None, default None
        The run config; None (deployment) reads it from the run config ``flwr run`` passes
        (:func:`~fedhealth.serverapp.runconfig.config_from_run_config`) and files every reply
        under its node's enrolled site name.
    run_dir : RunDir or None, default None
        The run directory; None opens ``<run_root>/<run_name>`` of the config.

    Returns
    -------
    ServerApp
        Its ``main`` runs :func:`run_federation`.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedhealth.runs.rundir import RunDir
        from fedhealth.serverapp.runconfig import config_from_run_config

        config = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
        run_federation(grid, config, run_dir or RunDir.create(config), enrolled=cfg is None)

    return app
