"""The run's sites: a hospital's own folders (``data.site_dirs``) or the synthetic cohort.

A hospital's folders are only read. The synthetic cohort is written only into a folder
fedhealth created for it (:func:`fedhealth.data.synth.write_cohort`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedhealth.config import Config
from fedhealth.data.datalist import SiteData
from fedhealth.data.synth import site_dir, write_cohort
from fedhealth.errors import DataError

__all__ = ["check_declared", "resolve_site_dirs", "synthesize"]

log = logging.getLogger("fedhealth.data")


def resolve_site_dirs(cfg: Config) -> list[Path]:
    """Return the run's site folders, writing the synthetic cohort's missing sites if needed.

    Without ``data.site_dirs``, sites ``<data.root>/site-<i>`` that all hold a
    ``dataset.json`` are only read; if any is missing, :func:`~fedhealth.data.synth.write_cohort`
    writes it, and only into a folder fedhealth created with the same cohort parameters.

    Parameters
    ----------
    cfg : Config
        The run config: ``data.site_dirs``, or ``data.root``, ``sites``, ``seed`` and the
        synthetic cohort's sizes.

    Returns
    -------
    list of Path
        Absolute folders, each holding a ``dataset.json``, in site order; a site is named
        after its folder.

    Raises
    ------
    DataError
        A folder of ``data.site_dirs`` is missing or holds no ``dataset.json``, two share a
        name, or :func:`~fedhealth.data.synth.write_cohort` refuses ``data.root``.
    """
    if cfg.data.site_dirs:
        dirs = [Path(d).expanduser().resolve() for d in cfg.data.site_dirs]
        for d in dirs:
            if not (d / "dataset.json").is_file():
                raise DataError(f"{d}: no dataset.json there (data.site_dirs)")
        names = [d.name for d in dirs]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise DataError(
                f"data.site_dirs: sites are named after their folders, and {clash} name two "
                "of them; rename a folder"
            )
        return dirs
    root = Path(cfg.data.root).expanduser().resolve()
    dirs = [site_dir(root, s) for s in range(cfg.sites)]
    missing = [d for d in dirs if not (d / "dataset.json").is_file()]
    if not missing:  # only read: whoever wrote them
        return dirs
    log.info("writing synthetic cohort: %d site(s) under %s", len(missing), root)
    synthesize(cfg)
    return dirs


def synthesize(cfg: Config) -> list[Path]:
    """Write the synthetic cohort's missing sites under ``data.root`` with the run's parameters.

    Parameters
    ----------
    cfg : Config
        ``data.root``, ``sites``, ``seed``, ``data.train_per_site``, ``data.test_per_site``,
        ``data.fov``, ``data.heterogeneity``.

    Returns
    -------
    list of Path
        Every site's ``dataset.json``, in site order.

    Raises
    ------
    DataError
        As :func:`~fedhealth.data.synth.write_cohort` (``data.root`` is not fedhealth's).
    """
    return write_cohort(
        Path(cfg.data.root).expanduser().resolve(),
        cfg.sites,
        cfg.seed,
        cfg.data.train_per_site,
        cfg.data.test_per_site,
        fov=cfg.data.fov,
        heterogeneity=cfg.data.heterogeneity,
    )


def check_declared(data: SiteData, cfg: Config, site: str) -> None:
    """Check that a site declares the sequences and classes the run's model expects.

    Parameters
    ----------
    data : SiteData
        The site's datalist.
    cfg : Config
        The run config: ``model.in_channels`` and ``model.out_channels``.
    site : str
        The site's name, for the message.

    Raises
    ------
    DataError
        Naming the site, its ``dataset.json``, what it declares and the model field.
    """
    for key, declared, field, want in (
        ("modality", data.modality, "model.in_channels", cfg.model.in_channels),
        ("labels", data.labels, "model.out_channels", cfg.model.out_channels),
    ):
        if len(declared) != want:
            raise DataError(
                f"site {site}: {data.dataset_json} declares {len(declared)} '{key}' "
                f"({', '.join(declared.values())}) but the run has {field}={want}"
            )
