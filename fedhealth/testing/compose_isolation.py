"""Check the rule the compose file promises: no hospital can read another hospital's volumes.

A hospital's volumes are mounted by that hospital and by the one-shot provisioning services
only; every hospital keeps its data and its key on volumes of its own; no two hospitals share a
network.
"""

from __future__ import annotations

from fedhealth.errors import ComposeError
from fedhealth.testing.compose_file import HOSPITAL, PROVISION, Project, Service


def isolation_problems(project: Project) -> list[str]:
    """List what breaks "no hospital can read another's volume".

    Parameters
    ----------
    project : Project
        The parsed compose file.

    Returns
    -------
    list of str
        One sentence per problem, naming the services and volume or network; empty when the
        file keeps the hospitals apart.
    """
    problems: list[str] = []
    hospitals = project.by_role(HOSPITAL)
    if not hospitals:
        return ["no service is labelled as a hospital"]
    users: dict[str, set[str]] = {}
    for svc in project.services.values():
        for m in svc.mounts:
            users.setdefault(m.source, set()).add(svc.name)
    for h in hospitals:
        for m in h.mounts:
            others = {
                u
                for u in users[m.source]
                if u != h.name
                and not (project.services[u].role == PROVISION and project.services[u].one_shot)
            }
            if others:
                problems.append(
                    f"{h.name}'s volume {m.source} ({m.target}) is also mounted by "
                    f"{', '.join(sorted(others))}"
                )
        if h.networks:
            for other in hospitals:
                shared = set(h.networks) & set(other.networks)
                if other.name > h.name and shared:
                    problems.append(f"{h.name} and {other.name} share network(s) {sorted(shared)}")
        targets = {m.target for m in h.mounts}
        for needed in ("data_dir", "auth_key"):
            path = _setting(h, needed)
            if path is None or not any(path == t or path.startswith(t + "/") for t in targets):
                problems.append(f"{h.name}: {needed} ({path}) is not on a volume of its own")
    return problems


def assert_isolated(project: Project) -> None:
    """Refuse a compose file that breaks hospital isolation.

    Parameters
    ----------
    project : Project
        The parsed compose file.

    Raises
    ------
    ComposeError
        Listing every :func:`isolation_problems` entry.
    """
    problems = isolation_problems(project)
    if problems:
        raise ComposeError("compose file breaks hospital isolation: " + "; ".join(problems))


def _setting(svc: Service, key: str) -> str | None:
    for arg in svc.command:
        if arg.startswith(f"{key}="):
            return arg.split("=", 1)[1]
    return None
