"""The error catalogue: one named code per failure, grouped by component, with a help text each.

Shaped after Flower's ``flwr/common/exit/exit_code.py``: every error fedhealth raises on purpose
is a :class:`FedHealthError` subclass carrying its :class:`ErrorCode`; :data:`ERROR_HELP` says
what to do about each. The message of an error names what was wrong and where (site, round,
file, field); the CLI prints the message, the code and its help, never a traceback.

Code ranges, one per component:

==========  ==================================================================================
0xx         configuration (Hydra config, site.yaml, coordinator.yaml, run config)
1xx         site data (datalists, NIfTI files)
2xx         the coordinator's rounds (``serverapp/``): updates, deadlines, stopped runs
3xx         run storage (``runs/``): checkpoints
4xx         privacy (``privacy/``): ledger, budget
5xx         security (``security/``): certificates, secure aggregation
6xx         the site's long-running side (``supernode/``): patches of Flower internals
7xx         test harnesses (``testing/``): the compose topology
1001-1007   codes a site puts in an error *reply* (:data:`SITE_ERROR_CODES`); their public text
            is fixed, details stay in the site's log
==========  ==================================================================================
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ErrorCode(IntEnum):
    """Named error codes, grouped by component (see the module docstring)."""

    # configuration
    CONFIG_INVALID = 1
    # site data
    DATA_INVALID = 101
    PRIVACY_UNIT_MISSING = 102
    # the coordinator's rounds
    UPDATE_REJECTED = 201
    FEDERATION_FAILED = 202
    RUN_STOPPED = 203
    RUN_INCOMPLETE = 204
    SITE_NOT_ENROLLED = 205
    SITE_LEDGER_SHRANK = 206
    # run storage
    CHECKPOINT_INVALID = 301
    # privacy
    LEDGER_INVALID = 401
    BUDGET_EXHAUSTED = 402
    LEDGER_TRUNCATED = 403
    DP_REQUIRED = 404
    POLICY_REFUSED = 405
    # security
    CERTIFICATE_INVALID = 501
    SECAGG_FAILED = 502
    APP_NOT_APPROVED = 503
    ENROLMENT_INVALID = 510
    # the site's long-running side
    PATCH_MISMATCH = 601
    SITE_EVENT_INVALID = 602
    # test harnesses
    COMPOSE_FAILED = 701
    # site error replies (sent over the network)
    SITE_DATA = 1001
    SITE_TRAINING = 1002
    SITE_REFUSED_CONFIG = 1003
    SITE_REFUSED_BUDGET = 1004
    SITE_LEDGER = 1005
    SITE_APP_REFUSED = 1006
    SITE_REFUSED_POLICY = 1007


ERROR_HELP: dict[ErrorCode, str] = {
    ErrorCode.CONFIG_INVALID: "Fix the named key or value: in configs/ (Hydra overrides such as "
    "rounds=5), site.yaml or coordinator.yaml. Unknown keys and wrong types are refused.",
    ErrorCode.DATA_INVALID: "Fix the named datalist or image file at the site; `fedhealth site "
    "check` opens every file and names each one that fails.",
    ErrorCode.PRIVACY_UNIT_MISSING: "DP training needs a 'patient' id on every training entry "
    "of the site's dataset.json (all of a patient's scans count as one record). Add the ids, or "
    "declare `privacy_unit: scan` in site.yaml: each scan then counts as one record and the "
    "privacy report says 'per scan, not per patient'.",
    ErrorCode.UPDATE_REJECTED: "A site's reply failed validation and was left out of the round; "
    "the reason names the site and field. Check that site's log and version.",
    ErrorCode.FEDERATION_FAILED: "The coordinator or a Flower command did not answer as needed; "
    "check that the SuperLink runs, the address and the CA, then retry.",
    ErrorCode.RUN_STOPPED: "Too few sites took part (connected, replied in time, or had budget "
    "left). The global model is the last completed round's; see metrics.jsonl and the sites' "
    "logs.",
    ErrorCode.RUN_INCOMPLETE: "The run ended before its last round; the run directory's "
    "manifest.json and the log above say where. Rerun with the same run_name to resume.",
    ErrorCode.SITE_NOT_ENROLLED: "A reply came from a node whose key the operator has not "
    "enrolled under a site name (or has revoked); it was refused. Enrol the site with `fedhealth "
    "server enrol NAME --key auth.pub` on the coordinator host, or check `fedhealth server sites`.",
    ErrorCode.SITE_LEDGER_SHRANK: "A site reported a privacy ledger shorter than (or not "
    "extending) the one it reported earlier in this run: it was truncated or replaced, so its "
    "epsilon is under-counted. The coordinator takes no more updates from it in this run; the "
    "site's privacy officer must restore the ledger from a backup.",
    ErrorCode.CHECKPOINT_INVALID: "A checkpoint is missing or its bytes no longer match its "
    "recorded sha256: restore it from a backup or start a new run_name.",
    ErrorCode.LEDGER_INVALID: "The site's privacy ledger is unreadable or fails its hash chain: "
    "training stops until the privacy officer restores it. Never delete a ledger of real data.",
    ErrorCode.LEDGER_TRUNCATED: "The site's privacy ledger holds fewer entries than it once did "
    "(its high-water mark, the .mark file beside it), or other ones: entries were deleted or the "
    "file was replaced by an older copy, so its epsilon would be under-counted. Training stops "
    "until the privacy officer restores the ledger from a backup; never delete the mark to go on.",
    ErrorCode.BUDGET_EXHAUSTED: "Training this round would take the site past its (epsilon, "
    "delta) cap. The site refuses; a new budget is the privacy officer's decision.",
    ErrorCode.DP_REQUIRED: "The site's policy requires DP (site.yaml `require_dp`, default "
    "true) and the run asked to train without it (privacy.enabled=false): the site refused "
    "before training. Run with privacy.enabled=true; only the site can opt out "
    "(`require_dp: false`), and its report then says so.",
    ErrorCode.POLICY_REFUSED: "The run asks for more than the site's privacy policy allows "
    "(site.yaml `policy:`: secure aggregation required, sites per secure sum, epsilon or rounds "
    "per run, noise ceiling, bounds on clip norm, epochs, learning rate, model): the site "
    "refused before training and charged nothing. Change the run within the site's limits; "
    "only the site's privacy officer changes its policy.",
    ErrorCode.CERTIFICATE_INVALID: "Create or rotate keys with `fedhealth certs`; `fedhealth "
    "certs check` lists expired and expiring ones.",
    ErrorCode.SECAGG_FAILED: "Secure aggregation could not complete this round (fewer sites than "
    "the threshold, or a malformed protocol reply); the global model stays as it was.",
    ErrorCode.ENROLMENT_INVALID: "Enrol a site with its PUBLIC key only (auth.pub from `fedhealth "
    "certs site NAME`, an OpenSSH ECDSA key on a NIST curve); one name per key and one key per "
    "name: `fedhealth server revoke NAME` first to replace a site's key.",
    ErrorCode.APP_NOT_APPROVED: "The app bundle (FAB) is not approved here: add the sha256 that "
    "`fedhealth app build` prints to approved_apps (site.yaml or coordinator.yaml), or have a "
    "trusted publisher sign it (`fedhealth app sign`) and list their key in trusted_publishers.",
    ErrorCode.PATCH_MISMATCH: "The installed Flower differs from the release fedhealth's "
    "SuperNode patches were written for; the SuperNode runs stock (slower, same results).",
    ErrorCode.SITE_EVENT_INVALID: "A ClientApp printed a site event whose fields are missing or "
    "of the wrong type; the site daemon ignores it. Check that the daemon and the run's app are "
    "the same fedhealth version.",
    ErrorCode.COMPOSE_FAILED: "The compose file is invalid or one of its services failed; the "
    "message names the service and ends with its log.",
    ErrorCode.SITE_DATA: "site data invalid or unreadable (see the site's log)",
    ErrorCode.SITE_TRAINING: "site training failed (see the site's log)",
    ErrorCode.SITE_REFUSED_CONFIG: "site refused the instruction (bad configuration from the "
    "coordinator)",
    ErrorCode.SITE_REFUSED_BUDGET: "site refused: training this round would exceed its privacy "
    "budget",
    ErrorCode.SITE_LEDGER: "site privacy ledger unreadable or corrupt: site stopped training",
    ErrorCode.SITE_APP_REFUSED: "app not approved at the site: its code never ran there (the "
    "site approves FAB hashes or trusted publishers in site.yaml)",
    ErrorCode.SITE_REFUSED_POLICY: "site refused by its own privacy policy before training "
    "(DP required, secure aggregation required, a limit of its policy, or its datalist has no "
    "patient ids); nothing was trained or charged",
}


def component(code: ErrorCode) -> str:
    """Return the component a code belongs to, by its range.

    Parameters
    ----------
    code : ErrorCode
        A catalogued code.

    Returns
    -------
    str
        ``config``, ``data``, ``serverapp``, ``runs``, ``privacy``, ``security``,
        ``supernode``, ``testing`` or ``site-reply``.
    """
    if code >= 1000:
        return "site-reply"
    names = ("config", "data", "serverapp", "runs", "privacy", "security", "supernode", "testing")
    return names[int(code) // 100]


class FedHealthError(Exception):
    """Base class of every error the framework raises on purpose; ``code`` says which."""

    code: ClassVar[ErrorCode] = ErrorCode.CONFIG_INVALID

    @property
    def help(self) -> str:
        """Return the catalogue's help text for this error's code."""
        return ERROR_HELP[self.code]

    def describe(self) -> str:
        """Return ``E<code> <component>: <message>`` and the help text, as the CLI prints it."""
        return f"E{int(self.code):04d} {component(self.code)}: {self}\n  help: {self.help}"


class ConfigError(FedHealthError):
    """A configuration value is missing, has the wrong type or is out of range."""

    code = ErrorCode.CONFIG_INVALID


class DataError(FedHealthError):
    """A site's datalist or one of its image files is unreadable or inconsistent."""

    code = ErrorCode.DATA_INVALID


class UpdateRejected(FedHealthError):
    """A model update from a site failed validation (shape, dtype, finiteness, counts)."""

    code = ErrorCode.UPDATE_REJECTED


class LedgerShrank(UpdateRejected):
    """A site's reported ledger is shorter than, or does not extend, what it reported before."""

    code = ErrorCode.SITE_LEDGER_SHRANK


class FederationError(FedHealthError):
    """A round or a Flower command cannot proceed: no answer, or too few sites, in time."""

    code = ErrorCode.FEDERATION_FAILED


class RunStopped(FedHealthError):
    """The coordinator stopped the run cleanly (for example: too few sites left)."""

    code = ErrorCode.RUN_STOPPED


class RunIncomplete(FedHealthError):
    """A run ended before its last round without being stopped cleanly."""

    code = ErrorCode.RUN_INCOMPLETE


class CheckpointError(FedHealthError):
    """A checkpoint is missing, or its bytes do not match its recorded sha256."""

    code = ErrorCode.CHECKPOINT_INVALID


class LedgerError(FedHealthError):
    """The privacy ledger is unreadable, corrupt or inconsistent: training must stop."""

    code = ErrorCode.LEDGER_INVALID


class LedgerTruncated(LedgerError):
    """The site's ledger is shorter than its own high-water mark: truncated or replaced."""

    code = ErrorCode.LEDGER_TRUNCATED


class BudgetExhausted(FedHealthError):
    """Training this round would take the site past its (epsilon, delta) cap."""

    code = ErrorCode.BUDGET_EXHAUSTED


class PrivacyUnitMissing(FedHealthError):
    """DP training was asked for, but the site's training list names no patient for a scan."""

    code = ErrorCode.PRIVACY_UNIT_MISSING


class DPRequired(FedHealthError):
    """The site's policy requires DP and the instruction asked to train without it."""

    code = ErrorCode.DP_REQUIRED


class PolicyRefused(FedHealthError):
    """The instruction asks for more than the site's privacy policy allows.

    Parameters
    ----------
    message : str
        What was asked and the site's limit (stays in the site's log).
    field : str
        The policy field refused (:class:`fedhealth.privacy.policy.SitePolicy`); the only
        detail an error reply carries to the coordinator.
    """

    code = ErrorCode.POLICY_REFUSED

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class CertError(FedHealthError):
    """A key or certificate is missing, expired, or would be silently overwritten."""

    code = ErrorCode.CERTIFICATE_INVALID


class SecAggError(FedHealthError):
    """Secure aggregation cannot complete (too few sites left, a bad share or mask)."""

    code = ErrorCode.SECAGG_FAILED


class SiteNotEnrolled(FedHealthError):
    """A reply came from a node the coordinator has no enrolled site name for."""

    code = ErrorCode.SITE_NOT_ENROLLED


class EnrolmentError(FedHealthError):
    """A site key cannot be enrolled or revoked: not a public key, or bound elsewhere."""

    code = ErrorCode.ENROLMENT_INVALID


class AppRefused(FedHealthError):
    """An app bundle is not approved (hash not listed, signature missing or invalid)."""

    code = ErrorCode.APP_NOT_APPROVED


class PatchMismatch(FedHealthError):
    """The installed Flower's SuperNode internals are not those a patch was written for."""

    code = ErrorCode.PATCH_MISMATCH


class EventError(FedHealthError):
    """A line carries a known site event whose fields are missing or of the wrong type."""

    code = ErrorCode.SITE_EVENT_INVALID


class ComposeError(FedHealthError):
    """The compose file is invalid, or a service failed while running it locally."""

    code = ErrorCode.COMPOSE_FAILED


# Codes a site puts in an error reply. The reason sent with them is the fixed public text
# below: details (file names, stack traces) stay in the site's own log.
SITE_ERROR_CODES: dict[int, str] = {
    int(code): ERROR_HELP[code]
    for code in (
        ErrorCode.SITE_DATA,
        ErrorCode.SITE_TRAINING,
        ErrorCode.SITE_REFUSED_CONFIG,
        ErrorCode.SITE_REFUSED_BUDGET,
        ErrorCode.SITE_LEDGER,
        ErrorCode.SITE_APP_REFUSED,
        ErrorCode.SITE_REFUSED_POLICY,
    )
}
BUDGET_REFUSAL = int(ErrorCode.SITE_REFUSED_BUDGET)


def site_error_code(exc: BaseException) -> int:
    """Return the error-reply code a site sends for ``exc``.

    Parameters
    ----------
    exc : BaseException
        What the site's handler raised.

    Returns
    -------
    int
        A key of :data:`SITE_ERROR_CODES`: budget refusal, policy refusal, ledger, data, bad
        instruction, or (anything else) training failed.
    """
    if isinstance(exc, BudgetExhausted):
        return int(ErrorCode.SITE_REFUSED_BUDGET)
    if isinstance(exc, DPRequired | PrivacyUnitMissing | PolicyRefused):
        return int(ErrorCode.SITE_REFUSED_POLICY)
    if isinstance(exc, LedgerError):
        return int(ErrorCode.SITE_LEDGER)
    if isinstance(exc, DataError):
        return int(ErrorCode.SITE_DATA)
    if isinstance(exc, ConfigError):
        return int(ErrorCode.SITE_REFUSED_CONFIG)
    return int(ErrorCode.SITE_TRAINING)
