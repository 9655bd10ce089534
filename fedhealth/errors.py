"""Error catalogue: every error names what was wrong and where (site, round, file, field)."""

from __future__ import annotations


class FedHealthError(Exception):
    """Base class of every error the framework raises on purpose."""


class ConfigError(FedHealthError):
    """A configuration value is missing, has the wrong type or is out of range."""


class DataError(FedHealthError):
    """A site's datalist or one of its image files is unreadable or inconsistent."""


class UpdateRejected(FedHealthError):
    """A model update from a site failed validation (shape, dtype, finiteness, counts)."""


class CheckpointError(FedHealthError):
    """A checkpoint is missing, or its bytes do not match its recorded sha256."""


# Codes a site puts in an error reply. The reason sent with them is the fixed public text
# below: details (file names, stack traces) stay in the site's own log.
SITE_ERROR_CODES: dict[int, str] = {
    1001: "site data invalid or unreadable (see the site's log)",
    1002: "site training failed (see the site's log)",
    1003: "site refused the instruction (bad configuration from the coordinator)",
    1004: "site refused: training this round would exceed its privacy budget",
    1005: "site privacy ledger unreadable or corrupt: site stopped training",
}
BUDGET_REFUSAL = 1004


def site_error_code(exc: BaseException) -> int:
    if isinstance(exc, BudgetExhausted):
        return 1004
    if isinstance(exc, LedgerError):
        return 1005
    if isinstance(exc, DataError):
        return 1001
    if isinstance(exc, ConfigError):
        return 1003
    return 1002


class FederationError(FedHealthError):
    """A round cannot proceed: too few sites connected or replied before the deadline."""


class LedgerError(FedHealthError):
    """The privacy ledger is unreadable, corrupt or inconsistent: training must stop."""


class BudgetExhausted(FedHealthError):
    """Training this round would take the site past its (epsilon, delta) cap."""


class RunStopped(FedHealthError):
    """The coordinator stopped the run cleanly (for example: too few sites left)."""
