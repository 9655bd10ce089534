"""Live progress of a run on the terminal, and the libraries' chatter into the run's log file.

The coordinator logs one record per completed round on ``fedhealth.coordinator`` with the
round's figures attached (``extra={"fedhealth_round": {...}}``); :class:`RoundProgress`, a
logging handler, turns those records into a `rich <https://rich.readthedocs.io>`_ progress bar:
rounds done, elapsed time, and the last round's weighted and per-site Dice, labelled.
:func:`quiet_console` sends every other log line (Flower's, Ray's, MLflow's, fedhealth's own)
and Python warnings to a log file in the run directory instead of the terminal.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["ROUND_FIELD", "RoundProgress", "quiet_console", "round_summary"]

ROUND_FIELD = "fedhealth_round"
"""The log record attribute carrying a completed round's figures."""


def round_summary(figures: dict[str, Any]) -> str:
    """Render a round's figures as one labelled line.

    Parameters
    ----------
    figures : dict
        ``round``, ``rounds``, ``dice`` (weighted, or None), ``sites`` (site -> Dice) and
        ``rejected`` / ``refused`` / ``failed`` (site names), as the coordinator attaches them.

    Returns
    -------
    str
        E.g. ``"round 3/10: Dice 0.4312 (site-0 0.51, site-1 0.38)"``.
    """
    dice = figures.get("dice")
    text = f"round {figures['round']}/{figures['rounds']}: "
    text += "no evaluation" if dice is None else f"Dice {dice:.4f}"
    sites = figures.get("sites") or {}
    if sites:
        text += " (" + ", ".join(f"{s} {d:.2f}" for s, d in sorted(sites.items())) + ")"
    for key in ("rejected", "refused", "failed"):
        if figures.get(key):
            text += f"; {key}: {', '.join(sorted(figures[key]))}"
    return text


class RoundProgress(logging.Handler):
    """A logging handler that draws the run's rounds as a rich progress bar.

    Parameters
    ----------
    rounds : int
        Rounds planned.
    console : rich.console.Console or None, default None
        Where to draw (default: stderr). Not a terminal (a pipe, a log file): no bar, only the
        labelled line of each round.
    """

    def __init__(self, rounds: int, console: Console | None = None) -> None:
        super().__init__(level=logging.INFO)
        console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[last]}"),
            console=console,
            transient=False,
            disable=not console.is_terminal,  # a log file or pipe gets the round lines only
        )
        self.task = self.progress.add_task("rounds", total=rounds, last="round 1 running")
        self.lines: list[str] = []
        self._level = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        """Advance the bar on a round record; ignore every other record."""
        figures = getattr(record, ROUND_FIELD, None)
        if not isinstance(figures, dict):
            return
        line = round_summary(figures)
        self.lines.append(line)
        self.progress.update(self.task, completed=int(figures["round"]), last=line)
        self.progress.console.print(line)

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        coordinator = logging.getLogger("fedhealth.coordinator")
        # the round records are INFO: the bar must not depend on how the root logger is set
        self._level = coordinator.level
        if coordinator.getEffectiveLevel() > logging.INFO:
            coordinator.setLevel(logging.INFO)
        coordinator.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        coordinator = logging.getLogger("fedhealth.coordinator")
        coordinator.removeHandler(self)
        coordinator.setLevel(self._level)
        self.progress.stop()


@contextlib.contextmanager
def quiet_console(log_file: Path) -> Iterator[Path]:
    """Send every log record and warning to ``log_file`` instead of the terminal.

    The terminal handlers of the root logger and of every logger that prints on its own
    (Flower's ``flwr``, fedhealth's site log) are set aside for the duration and one file
    handler takes their records (at INFO and above; DEBUG stays off); Python warnings are
    captured into the log.

    Parameters
    ----------
    log_file : Path
        The log file (appended to; its folder is created).

    Yields
    ------
    Path
        ``log_file``.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    names = {"", "flwr", "fedhealth"} | {
        name  # loggers that print on their own (Flower's, the site log in this process)
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and not lg.propagate and lg.handlers
    }
    loggers = [logging.getLogger(name or None) for name in sorted(names)]
    kept = {lg.name: [h for h in lg.handlers if _is_terminal(h)] for lg in loggers}
    propagate = {lg.name: lg.propagate for lg in loggers}
    for lg in loggers:
        for h in kept[lg.name]:
            lg.removeHandler(h)
        lg.addHandler(handler)
        if lg is not logging.root:  # its records reach the file here, not again through root
            lg.propagate = False
    logging.captureWarnings(True)
    try:
        yield log_file
    finally:
        logging.captureWarnings(False)
        for lg in loggers:
            lg.removeHandler(handler)
            lg.propagate = propagate[lg.name]
            for h in kept[lg.name]:
                lg.addHandler(h)
        handler.close()


def _is_terminal(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )
