"""Run the topology of ``docker/docker-compose.yml`` as local processes on loopback.

No Docker engine is needed: the compose file itself is the source of truth. The harness is in
five parts, all reachable from here (``from fedhealth.testing import compose``):

* :mod:`~fedhealth.testing.compose_config` reads the document through ``docker-compose
  config`` (which validates it) or with PyYAML and the same ``${VAR:-default}`` interpolation;
  ports are whatever the compose variables say, so the caller sets them to free ports
  (:func:`port_variables`, :func:`free_ports`);
* :mod:`~fedhealth.testing.compose_file` turns it into :class:`Project`, :class:`Service` and
  :class:`Mount` (:func:`load`);
* :mod:`~fedhealth.testing.compose_isolation` checks the rule the file promises
  (:func:`isolation_problems`, :func:`assert_isolated`): a hospital's volumes are mounted by that
  hospital and by the one-shot provisioning services only;
* :mod:`~fedhealth.testing.compose_view` maps each service's container paths, hostnames,
  command and environment onto this machine (volumes as directories under the work directory);
* :mod:`~fedhealth.testing.compose_local` runs the services in dependency order with deadlines
  (:class:`LocalTopology`, :func:`run`), each in its own process group, SIGTERM then SIGKILL at
  the end.
"""

from __future__ import annotations

from fedhealth.errors import ComposeError
from fedhealth.testing.compose_config import (
    compose_command,
    config_output,
    duration_seconds,
    interpolate,
    port_variables,
    read_document,
)
from fedhealth.testing.compose_file import (
    COORDINATOR,
    HOSPITAL,
    LAUNCHER,
    PROVISION,
    ROLE_LABEL,
    Mount,
    Project,
    Service,
    image_entrypoint,
    load,
)
from fedhealth.testing.compose_isolation import assert_isolated, isolation_problems
from fedhealth.testing.compose_local import LocalTopology, Running, TopologyRun, run
from fedhealth.testing.compose_view import LocalView, Prepared, Rewriter
from fedhealth.testing.loopback import free_ports

__all__ = [
    "COORDINATOR",
    "HOSPITAL",
    "LAUNCHER",
    "PROVISION",
    "ROLE_LABEL",
    "ComposeError",
    "LocalTopology",
    "LocalView",
    "Mount",
    "Prepared",
    "Project",
    "Rewriter",
    "Running",
    "Service",
    "TopologyRun",
    "assert_isolated",
    "compose_command",
    "config_output",
    "duration_seconds",
    "free_ports",
    "image_entrypoint",
    "interpolate",
    "isolation_problems",
    "load",
    "port_variables",
    "read_document",
    "run",
]
