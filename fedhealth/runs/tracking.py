"""Experiment tracking in MLflow: every run's config, per-round metrics and artifacts.

Offline by default: an SQLite tracking store ``<run_root>/mlflow.db`` with artifacts under
``<run_root>/mlartifacts`` (``mlflow ui --backend-store-uri sqlite:///<run_root>/mlflow.db``
opens it); ``tracking.uri`` names a consortium's MLflow server instead. One MLflow run per run
directory: its id is kept in ``manifest.json`` (``mlflow.run_id``), so a resumed run keeps
logging into the same MLflow run.

What is logged is what the coordinator already holds, never anything about a single patient:
the resolved config as params; per round (the round is MLflow's ``step``) the example-weighted
Dice and loss, each site's Dice (mean and per class) and loss on its own test set, each site's
epsilon spent; at the end the reports, the model card and the final global model as artifacts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhealth.config import Config, flatten
from fedhealth.runs.records import MetricsLine

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from fedhealth.runs.rundir import RunDir

__all__ = ["Tracker", "attach", "metrics_of_line", "store_uri", "ui_hint"]

log = logging.getLogger("fedhealth.tracking")


# MLflow's own SQLite store query uses SQLAlchemy's deprecated ``noload`` strategy: a notice
# for MLflow's developers, not for a run's user (mlflow/store/tracking); every MlflowClient here.
warnings.filterwarnings("ignore", message=".*``noload`` loader strategy is deprecated")


def store_uri(cfg: Config) -> tuple[str, str | None]:
    """Return the tracking URI and, for the offline store, its artifact location.

    Parameters
    ----------
    cfg : Config
        ``tracking.uri`` and ``run_root``.

    Returns
    -------
    tuple of (str, str or None)
        ``tracking.uri`` and None when set; else ``sqlite:///<run_root>/mlflow.db`` and
        ``<run_root>/mlartifacts`` (absolute).
    """
    if cfg.tracking.uri:
        return cfg.tracking.uri, None
    root = Path(cfg.run_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def metrics_of_line(line: Mapping[str, Any]) -> dict[str, float]:
    """Select the MLflow metrics of one ``metrics.jsonl`` line.

    Parameters
    ----------
    line : mapping
        One round's line (:class:`~fedhealth.runs.records.MetricsLine`).

    Returns
    -------
    dict of str to float
        ``dice`` and ``loss`` (example-weighted evaluation), ``train_loss`` (weighted),
        ``dice/<site>``, ``dice-<k>/<site>``, ``loss/<site>``, ``epsilon/<site>``; only numbers
        present in the line.
    """
    out: dict[str, float] = {}
    evaluation = line.get("evaluate") or {}
    for key in ("dice", "loss"):
        value = (evaluation.get("weighted") or {}).get(key)
        if isinstance(value, int | float):
            out[key] = float(value)
    train_loss = ((line.get("train") or {}).get("weighted") or {}).get("loss")
    if isinstance(train_loss, int | float):
        out["train_loss"] = float(train_loss)
    for site, values in (evaluation.get("sites") or {}).items():
        for key, value in values.items():
            if (key.startswith("dice") or key == "loss") and isinstance(value, int | float):
                out[f"{key}/{site}"] = float(value)
    for site, values in ((line.get("train") or {}).get("sites") or {}).items():
        epsilon = values.get("epsilon")
        if isinstance(epsilon, int | float):
            out[f"epsilon/{site}"] = float(epsilon)
    return out


class Tracker:
    """One run directory's MLflow run: created at the run's start, resumed with it.

    Parameters
    ----------
    run_dir : RunDir
        The run directory; its manifest gets (or holds) ``mlflow``: run id, experiment,
        tracking URI.
    cfg : Config
        The run config: ``tracking.uri``, ``tracking.experiment``; logged as params.

    Raises
    ------
    mlflow.exceptions.MlflowException
        The tracking store cannot be opened (e.g. a server that does not answer).
    """

    def __init__(self, run_dir: RunDir, cfg: Config) -> None:
        for chatter in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(chatter).setLevel(logging.WARNING)  # "creating tables", per store
        from mlflow.tracking import MlflowClient

        self.uri, artifacts = store_uri(cfg)
        self.client: MlflowClient = MlflowClient(tracking_uri=self.uri)
        known = run_dir.manifest.get("mlflow")
        if isinstance(known, dict) and known.get("tracking_uri") == self.uri:
            self.run_id = str(known["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(cfg.tracking.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(cfg.tracking.experiment, artifacts)
        )
        run = self.client.create_run(
            experiment_id,
            run_name=run_dir.path.name,
            tags={
                "fedhealth.run_dir": str(run_dir.path.resolve()),
                "fedhealth.run_key": run_dir.key,
            },
        )
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(cfg).items())]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        run_dir.manifest["mlflow"] = {
            "run_id": self.run_id,
            "experiment": cfg.tracking.experiment,
            "tracking_uri": self.uri,
        }
        run_dir.save_manifest()

    def log_lines(self, lines: Iterable[MetricsLine]) -> None:
        """Log each round's line as metrics at step ``round`` (:func:`metrics_of_line`).

        Parameters
        ----------
        lines : iterable of MetricsLine
            Lines as :meth:`~fedhealth.runs.rundir.RunDir.end_round` returns them.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, value, now, int(line["round"]))
            for line in lines
            for key, value in metrics_of_line(line).items()
        ]
        with self._guard("metrics"):
            for start in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        """Copy files that exist into the run's artifacts.

        Parameters
        ----------
        paths : iterable of Path
            Files (missing ones are skipped).
        artifact_path : str or None, default None
            Folder inside the run's artifacts.
        """
        with self._guard("artifacts"):
            for path in paths:
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the MLflow run ended.

        Parameters
        ----------
        status : str, default "FINISHED"
            MLflow's run status: ``"FINISHED"``, ``"KILLED"`` (stopped) or ``"FAILED"``.
        """
        with self._guard("end"):
            self.client.set_terminated(self.run_id, status=status)

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Log a tracking failure (a store that went away) instead of stopping the run."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types; training goes on
            log.error("MLflow run %s: could not log %s: %s", self.run_id, what, exc)

    def ui_hint(self) -> str:
        """Return the command that opens this store's MLflow UI (or the server's address)."""
        return ui_hint(self.uri, self.run_id)


def ui_hint(uri: str, run_id: str) -> str:
    """Return how to look at an MLflow run: ``mlflow ui ...`` for a local store, else its URI.

    Parameters
    ----------
    uri : str
        The tracking URI.
    run_id : str
        The MLflow run.

    Returns
    -------
    str
        A command line or an address, naming the run.
    """
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        return f"mlflow ui --backend-store-uri {uri}  (run {run_id})"
    return f"{uri} (run {run_id})"


def attach(
    run_path: Path | str, files: Iterable[Path], artifact_path: str = "reports"
) -> str | None:
    """Add files (e.g. reports written after the run) to a run directory's MLflow run.

    Parameters
    ----------
    run_path : Path or str
        The run directory; its ``manifest.json`` names the MLflow run (``mlflow``).
    files : iterable of Path
        Files to copy into the run's artifacts (missing ones are skipped).
    artifact_path : str, default "reports"
        Folder inside the run's artifacts.

    Returns
    -------
    str or None
        :func:`ui_hint` for the run, or None when the run was not tracked or logging failed
        (logged).
    """
    manifest_path = Path(run_path) / "manifest.json"
    info = json.loads(manifest_path.read_text()).get("mlflow") if manifest_path.is_file() else None
    if not isinstance(info, dict):
        return None
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=info["tracking_uri"])
        for path in files:
            if path.is_file():
                client.log_artifact(info["run_id"], str(path), artifact_path)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; the reports are on disk
        log.error("MLflow run %s: could not attach %s: %s", info.get("run_id"), artifact_path, exc)
        return None
    return ui_hint(str(info["tracking_uri"]), str(info["run_id"]))
