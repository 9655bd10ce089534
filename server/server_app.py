"""Coordinator ServerApp, started by the SuperLink for each ``flwr run``.

The run's resolved configuration arrives as run config ``fedhealth-config`` (JSON of plain values,
written by :func:`fedhealth.serverapp.runconfig.write_run_config`); the strategy, rounds,
checkpoints and run directory all come from :mod:`fedhealth.serverapp.app`.
"""

from fedhealth.serverapp.app import make_server_app

app = make_server_app()
