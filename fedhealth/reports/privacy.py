"""Privacy budget report for a hospital's privacy officer: HTML (plots embedded), JSON, Markdown.

Input is either a run directory (its ``privacy.jsonl``, as reported up by the sites) or a site's
privacy ledger (``ledger.sqlite``, a directory holding one, or a root of ``site-*/`` ledgers).
Every epsilon is recomputed from the recorded parameters by Google's dp-accounting, and the
report shows both figures side by side.

The data and its loading live in :mod:`fedhealth.reports.privacy_data`, the rendering in
:mod:`fedhealth.reports.privacy_render`, its words in :mod:`fedhealth.reports.privacy_text`;
every public name is importable from here.

Examples
--------
>>> from fedhealth.reports import privacy
>>> paths = privacy.write(privacy.load("runs/my-run"), "runs/my-run")  # doctest: +SKIP
"""

from __future__ import annotations

from fedhealth.privacy.accounting import MAX_ROUNDS_LEFT, rounds_left
from fedhealth.reports.privacy_data import (
    PrivacyReport,
    Row,
    SiteSummary,
    from_ledgers,
    from_run_dir,
    load,
)
from fedhealth.reports.privacy_render import (
    ROW_HEAD,
    SUM_HEAD,
    plot_png,
    to_html,
    to_json,
    to_markdown,
    write,
)
from fedhealth.reports.privacy_text import check_sentence, explanation

__all__ = [
    "MAX_ROUNDS_LEFT",
    "ROW_HEAD",
    "SUM_HEAD",
    "PrivacyReport",
    "Row",
    "SiteSummary",
    "check_sentence",
    "explanation",
    "from_ledgers",
    "from_run_dir",
    "load",
    "plot_png",
    "rounds_left",
    "to_html",
    "to_json",
    "to_markdown",
    "write",
]
