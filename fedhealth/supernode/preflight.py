"""``fedhealth site check``: the site's preflight, each item passing or naming what is wrong."""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fedhealth.supernode.settings import SiteSettings


@dataclass(frozen=True)
class CheckItem:
    """One preflight check's outcome.

    Parameters
    ----------
    name : str
        What was checked: ``data``, ``ca``, ``auth_key``, ``keys``, ``ledger``, ``policy``,
        ``apps`` or ``coordinator``.
    ok : bool
        Whether it passed.
    detail : str
        What was found, or what is wrong (naming the file, key or address).
    """

    name: str
    ok: bool
    detail: str


def check(s: SiteSettings, timeout: float = 10.0) -> list[CheckItem]:
    """Run the preflight: data, keys, ledger, privacy policy, approved apps, coordinator.

    Nothing is written into the site's data directory; the ledger is opened and verified
    (hash chain, recomputed epsilon) but not changed.

    Parameters
    ----------
    s : SiteSettings
        The site's settings.
    timeout : float, optional
        Seconds to wait for the coordinator's TCP connection and TLS handshake (default 10.0).

    Returns
    -------
    list of CheckItem
        One item per check, in the order above; each passes or says what is wrong.
    """
    return [
        _check_data(s),
        *_check_keys(s),
        _check_ledger(s),
        _check_policy(s),
        _check_apps(s),
        _check_coordinator(s, timeout),
    ]


def _check_apps(s: SiteSettings) -> CheckItem:
    from fedhealth.errors import FedHealthError
    from fedhealth.supernode.daemon import check_app_gate

    try:
        policy = check_app_gate(s)
    except FedHealthError as exc:
        return CheckItem("apps", False, f"the site daemon will not start: {exc}")
    if policy.empty:
        return CheckItem(
            "apps",
            False,
            "no approved_apps and no trusted_publishers in site.yaml: the site refuses EVERY "
            "app; add the sha256 that `fedhealth app build` prints, or a trusted publisher",
        )
    return CheckItem("apps", True, f"{policy.describe()}; decisions recorded in {s.apps_log}")


def _check_policy(s: SiteSettings) -> CheckItem:
    """Say what the site's policy lets a run ask, for the privacy officer who signs it off."""
    p = s.policy
    limits = [
        "DP required" if p.require_dp else "WARNING: DP not required (require_dp: false)",
        (
            f"secure aggregation required, at least {p.min_secagg_sites} sites per sum"
            if p.require_secure_aggregation
            else "WARNING: plain (unmasked) updates allowed (require_secure_aggregation: false)"
        ),
        f"epsilon per run {p.max_epsilon_per_run:g}" if p.max_epsilon_per_run else "",
        f"at most {p.max_rounds_per_run} rounds per run" if p.max_rounds_per_run else "",
        f"noise multiplier at most {p.max_noise_multiplier:g}",
        f"clip norm in [{p.min_max_grad_norm:g}, {p.max_max_grad_norm:g}]",
        f"at most {p.max_local_epochs} local epochs, lr in [{p.min_lr:g}, {p.max_lr:g}]",
        f"models {p.models}" if p.models else "any model",
        f"at most {p.max_model_parameters:,} parameters, patch {p.max_patch_size}, grid >= "
        f"{p.min_target_spacing:g} mm, batch {p.max_batch_size}, {p.max_sw_batch_size} windows",
        f"releases also {p.release}" if p.release else "releases only the minimum",
        ""
        if p.releases("evaluation")
        else "evaluation withheld (no 'evaluation' in release): this site refuses evaluate "
        "instructions and the consortium gets no Dice from it",
    ]
    return CheckItem("policy", True, "; ".join(item for item in limits if item))


def _check_data(s: SiteSettings) -> CheckItem:
    from fedhealth.data.loading import read_datalist, require_patient_ids
    from fedhealth.errors import DataError, PrivacyUnitMissing

    path = Path(s.data_dir) / "dataset.json"
    try:
        data = read_datalist(path)  # every image/label pair opened and checked
        require_patient_ids(data, s.privacy_unit, s.name)
    except (DataError, PrivacyUnitMissing) as exc:
        return CheckItem("data", False, str(exc))
    patients = {i["patient"] for i in data.train}
    unit = "patients" if s.privacy_unit == "patient" else "records (privacy unit: scan)"
    detail = (
        f"{path}: {len(data.train)} training scans of {len(patients)} {unit}, "
        f"{len(data.test)} labelled test scans, {len(data.unlabelled)} image-only; "
        f"{len(data.modality)} channel(s) ({', '.join(data.modality.values())}), "
        f"{len(data.labels)} classes ({', '.join(data.labels.values())}); every file readable "
        "and consistent with what the datalist declares"
    )
    if not data.test:
        detail += "; no labelled test case: the site reports no Dice"
    if data.shared:
        detail += (
            f"; WARNING: {len(data.shared)} patient(s) in both the training and the test "
            f"list: {', '.join(data.shared)} (their test scores are not on unseen patients)"
        )
    return CheckItem("data", True, detail)


def _check_keys(s: SiteSettings) -> list[CheckItem]:
    if s.insecure:
        return [CheckItem("keys", False, "insecure mode: no TLS root, no authentication key")]
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedhealth.security.certs import WARN_DAYS

    items: list[CheckItem] = []
    try:
        cert = x509.load_pem_x509_certificate(Path(s.ca).read_bytes())
        left = (cert.not_valid_after_utc - datetime.now(UTC)).days
        ok = left >= WARN_DAYS
        items.append(
            CheckItem(
                "ca",
                ok,
                f"{s.ca}: {cert.subject.rfc4514_string()}, "
                + (f"valid until {cert.not_valid_after_utc:%Y-%m-%d}" if left >= 0 else "EXPIRED")
                + ("" if ok else f" (under {WARN_DAYS} days left)"),
            )
        )
    except (OSError, ValueError) as exc:
        items.append(CheckItem("ca", False, f"{s.ca}: not a readable PEM certificate ({exc})"))
    key_path = Path(s.auth_key)
    try:
        key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
        mode = key_path.stat().st_mode & 0o777
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            items.append(CheckItem("auth_key", False, f"{key_path}: not an ECDSA key"))
        elif mode & 0o077:
            items.append(
                CheckItem(
                    "auth_key",
                    False,
                    f"{key_path}: mode {mode:o}, readable by others; chmod 600 it",
                )
            )
        else:
            items.append(
                CheckItem("auth_key", True, f"{key_path}: ECDSA {key.curve.name}, mode {mode:o}")
            )
    except (OSError, ValueError) as exc:
        items.append(
            CheckItem("auth_key", False, f"{key_path}: not a readable OpenSSH private key ({exc})")
        )
    return items


def _check_ledger(s: SiteSettings) -> CheckItem:
    from fedhealth.errors import LedgerError
    from fedhealth.privacy.ledger import PrivacyLedger

    path = s.ledger_path
    if not path.exists():
        existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
        writable = os.access(existing, os.W_OK)
        return CheckItem(
            "ledger",
            writable,
            f"{path}: new ledger, created on first training"
            + ("" if writable else f"; but {existing} is not writable, so it cannot be created"),
        )
    try:
        with PrivacyLedger(path, s.name) as ledger:
            entries = ledger.verify()
    except LedgerError as exc:
        return CheckItem("ledger", False, str(exc))
    spent = entries[-1].epsilon_after if entries else 0.0
    ok = spent < s.epsilon_cap
    return CheckItem(
        "ledger",
        ok,
        f"{path}: {len(entries)} entries, hash chain intact, epsilon "
        f"{spent:.3f} of {s.epsilon_cap:g} spent" + ("" if ok else " (budget exhausted)"),
    )


def _check_coordinator(s: SiteSettings, timeout: float) -> CheckItem:
    from fedhealth.security.tlsprobe import probe

    host, port = s.coordinator.rsplit(":", 1)
    host = host.strip("[]")
    try:
        if s.insecure:
            socket.create_connection((host, int(port)), timeout=timeout).close()
            return CheckItem("coordinator", True, f"{s.coordinator}: TCP reachable (plaintext)")
        seen = probe(host, int(port), s.ca, timeout)
    except ssl.SSLError as exc:
        return CheckItem("coordinator", False, f"{s.coordinator}: TLS failed ({exc.reason or exc})")
    except OSError as exc:
        return CheckItem("coordinator", False, f"{s.coordinator}: not reachable ({exc})")
    if seen.ok:
        return CheckItem("coordinator", True, f"{s.coordinator}: reachable, {seen.message}")
    return CheckItem("coordinator", False, f"{s.coordinator}: TLS failed: {seen.message}")
