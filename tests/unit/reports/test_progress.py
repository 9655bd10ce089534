"""Live progress: round records drive the bar; every library's lines go to the run's log file."""

from __future__ import annotations

import io
import logging
import warnings

from rich.console import Console

from fedhealth.reports.progress import ROUND_FIELD, RoundProgress, quiet_console, round_summary

FIGURES = {"round": 2, "rounds": 5, "dice": 0.43125, "sites": {"b": 0.5, "a": 0.25}}


def test_a_round_line_is_labelled_with_its_round_and_each_site():
    assert round_summary(FIGURES) == "round 2/5: Dice 0.4313 (a 0.25, b 0.50)"
    assert round_summary({"round": 1, "rounds": 5, "dice": None, "refused": ["c"]}) == (
        "round 1/5: no evaluation; refused: c"
    )


def test_round_records_advance_the_bar_and_other_records_do_not():
    out = io.StringIO()
    coordinator = logging.getLogger("fedhealth.coordinator")
    coordinator.setLevel(logging.NOTSET)  # as in a process whose root logger is at WARNING
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)
    with RoundProgress(5, Console(file=out, force_terminal=False, width=120)) as progress:
        coordinator.info("a line without figures")
        coordinator.info("round 2/5", extra={ROUND_FIELD: FIGURES})
        assert progress.progress.tasks[0].completed == 2
    assert progress.lines == ["round 2/5: Dice 0.4313 (a 0.25, b 0.50)"]
    assert "round 2/5: Dice 0.4313" in out.getvalue()
    assert "a line without figures" not in out.getvalue()
    assert "rounds" not in out.getvalue()  # not a terminal: the round lines, no bar
    assert progress not in coordinator.handlers, "the handler leaves with the bar"
    assert coordinator.level == logging.NOTSET  # and the logger's level is restored
    logging.getLogger().setLevel(root_level)


def test_library_lines_and_warnings_go_to_the_log_file_not_the_terminal(tmp_path, capsys):
    terminal = io.StringIO()
    flwr = logging.getLogger("flwr")
    printing = logging.StreamHandler(terminal)
    flwr.addHandler(printing)
    flwr.setLevel(logging.INFO)
    ours = logging.getLogger("fedhealth")
    level, before = ours.level, (ours.propagate, list(ours.handlers))
    ours.setLevel(logging.INFO)  # as the CLI sets it
    try:
        with quiet_console(tmp_path / "run" / "simulate.log") as log_file:
            flwr.info("Flower chatter")
            logging.getLogger("ray").warning("Ray chatter")
            logging.getLogger("fedhealth.coordinator").info("our own line")
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
        flwr.info("after the run")
    finally:
        flwr.removeHandler(printing)
        ours.setLevel(level)
    text = log_file.read_text()
    assert "Flower chatter" in text and "Ray chatter" in text and "a library's warning" in text
    assert "after the run" not in text
    assert text.count("our own line") == 1, "a propagating logger's line is written once"
    assert (ours.propagate, ours.handlers) == before, "the fedhealth logger is as it was"
    assert terminal.getvalue() == "after the run\n", "the terminal handler is back afterwards"
    assert "chatter" not in capsys.readouterr().err
