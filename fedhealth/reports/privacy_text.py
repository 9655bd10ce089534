"""The privacy report's words: the plain-language paragraph for a privacy officer, and the check.

Used by :mod:`fedhealth.reports.privacy_render`; importable from :mod:`fedhealth.reports.privacy`.
"""

from __future__ import annotations

from fedhealth.reports.privacy_data import PrivacyReport


def explanation(report: PrivacyReport) -> str:
    """Explain in plain words what the report's epsilon and delta mean for patients.

    Parameters
    ----------
    report : PrivacyReport
        The report; its smallest (epsilon cap, delta) pair is the one quoted.

    Returns
    -------
    str
        One paragraph, quoting ``exp(epsilon)`` as the bound on how much more or less likely
        any outcome is with or without one patient's scans; then :func:`unit_sentences`.

    Raises
    ------
    IndexError
        If the report has no site.
    """
    trained = [s for s in report.sites if any(r.status == "trained" for r in s.rows)]
    if not trained:
        spent = sorted(
            {s.site for s in report.sites for r in s.rows if r.reason.startswith("budget")}
        )
        return (
            "What these numbers mean for patients. No hospital trained the shared model with "
            "differential privacy in this report: every site refused (see the reasons) or "
            "trained without it. There is no epsilon to quote for this run, and nothing here is "
            "a privacy guarantee."
            + (
                f" Refused for a spent budget: {', '.join(spent)}. Such a site's ledger already "
                "holds earlier runs' epsilon up to its cap, which only the site's own ledger "
                "report shows (fedhealth report privacy <its ledger.sqlite>)."
                if spent
                else ""
            )
            + unit_sentences(report)
        )
    eps, delta = sorted({(s.epsilon_cap, s.delta) for s in trained})[0]
    return (
        "What these numbers mean for patients. Each hospital trained the shared model with "
        "differential privacy, counting each patient as one record (all of a patient's scans "
        "together) unless said below. Epsilon measures the most that any one patient's presence "
        "in the training data can change what the shared model reveals: the smaller, the "
        "stronger the protection. "
        f"With a cap of epsilon = {eps:g} and delta = {delta:g}, anything an outsider could learn "
        "from the model is at most about "
        f"{_factor(eps)} times more (or less) likely whether or not a given patient's scans were "
        f"used, except with a probability of at most {delta:g}. This holds over everything the "
        "hospital has trained so far, in all runs recorded here, whatever the outsider knows. "
        "It holds against everyone who sees what a hospital sends: the coordinator, the other "
        "hospitals and whoever later gets the model, because each hospital adds its noise "
        "itself, from randomness no one else knows, and charges every update it releases; it "
        "does not cover the evaluation scores computed on a hospital's test patients, a patient "
        "treated at several hospitals (each hospital's budget counts on its own), or a "
        "hospital that trained without DP. "
        "Epsilon only grows: every training round spends a little more, and a hospital refuses "
        "to train once the next round would take it past its cap. 'Rounds left' is how many more "
        "rounds like the last one fit under the cap. The images themselves never leave the "
        "hospital; only its model update (masked inside the secure sum), the epsilon it spent "
        "and its ledger's standing do, unless its own policy releases more."
        + unit_sentences(report)
    )


def unit_sentences(report: PrivacyReport) -> str:
    """Say which sites protect less than "each patient as one record", and why.

    Parameters
    ----------
    report : PrivacyReport
        The report.

    Returns
    -------
    str
        ``""`` when every site's privacy unit is the patient; otherwise one sentence per case,
        each starting with a space: sites whose unit is the scan ("per scan, not per
        patient"), sites that trained without DP by their own choice, sites whose reply did
        not state their unit.
    """
    trained = [s for s in report.sites if any(r.status == "trained" for r in s.rows)]
    by_unit = {  # a site that never trained here stated nothing, and needs no unit
        unit: [s.site for s in trained if s.privacy_unit == unit and not s.dp_off]
        for unit in ("scan", "unstated")
    }
    out = ""
    if by_unit["scan"]:
        out += (
            f" At {', '.join(by_unit['scan'])}, each scan counted as one record (the site "
            "declared privacy_unit: scan): the guarantee there is per scan, not per patient, "
            "and a patient's k scans together are covered only at up to about k times that epsilon."
        )
    if off := [s.site for s in report.sites if s.dp_off]:
        out += (
            f" {', '.join(off)} trained at least one round without differential privacy: DP "
            "off by the site's own choice (site.yaml policy.require_dp: false); nothing in this "
            "report "
            "protects the patients of those rounds."
        )
    if seeded := [s.site for s in report.sites if s.noise_seeded]:
        out += (
            f" {', '.join(seeded)} drew its DP noise from a fixed seed of its own "
            "(site.yaml dp_noise_seed, a testing setting): whoever knows that seed can "
            "reproduce the noise, so the guarantee holds only against those who do not."
        )
    if report.withheld:
        out += (
            f" {', '.join(report.withheld)} kept its DP history at the site (its policy "
            "releases only the epsilon spent): the epsilon shown is as the site reported it, "
            "and the site's own ledger report (fedhealth privacy report <ledger>) recomputes it "
            "with Google's dp-accounting."
        )
    if by_unit["unstated"] and report.kind == "run":
        out += (
            f" {', '.join(by_unit['unstated'])} did not state its privacy unit; assume it "
            "counted each scan as one record unless its site.yaml says otherwise."
        )
    return out


def check_sentence(report: PrivacyReport) -> str:
    """Say what the independent accountant confirmed.

    Parameters
    ----------
    report : PrivacyReport
        The report.

    Returns
    -------
    str
        Every recomputed epsilon agrees within 1% (naming the sites that kept their history),
        or a warning.
    """
    if not any(r.status == "trained" for s in report.sites for r in s.rows):
        return "nothing to recompute: no site trained with DP."
    if not report.all_agree:
        return "WARNING: at least one epsilon could not be confirmed by the independent accountant."
    out = (
        "Every epsilon recomputed here agrees within 1% with Google's dp-accounting, an "
        "accountant independent of the one used in training."
    )
    if report.withheld:
        out += f" Not recomputed here (history kept at the site): {', '.join(report.withheld)}."
    above = [
        (s.site, r.independent_epsilon, s.epsilon_cap)
        for s in report.sites
        for r in s.rows
        if r.independent_epsilon is not None and r.independent_epsilon > s.epsilon_cap
    ]
    if above:
        site, eps, cap = max(above, key=lambda a: a[1] / a[2])
        out += (
            f" dp-accounting's figure is above the cap at {len({a[0] for a in above})} site(s) "
            f"(at most {eps:.3f} against {site}'s cap {cap:g}, +{100 * (eps / cap - 1):.2f}%): "
            "the two libraries evaluate the Renyi DP curve at different orders and convert it "
            "to (epsilon, delta) with their own bounds, within the 1% above; each site enforces "
            "its cap with its own accountant (Opacus), whose figure is at or below it."
        )
    return out


def _factor(eps: float) -> str:
    import math

    value = math.exp(eps)
    return f"{value:,.0f}" if value >= 10 else f"{value:.2f}"
