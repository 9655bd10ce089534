"""Baselines for the claim that federation helps, evaluated on the same per-site test sets.

* centralized: every site's training data pooled in one place (the upper bound federation aims
  for, and exactly what hospitals cannot do);
* local: each site trains alone on its own data (what a hospital gets without joining).

Both train for ``rounds * local_epochs`` epochs, the number of passes a federated site makes.
"""

from __future__ import annotations

from torch import nn

from fedhealth.config import Config
from fedhealth.data.loading import DatalistItem, SiteData, read_datalist
from fedhealth.data.sites import check_declared, resolve_site_dirs
from fedhealth.models import build_model
from fedhealth.training.device import resolve_device
from fedhealth.training.loop import EvalResult, seed_everything, train
from fedhealth.training.scoring import evaluate_items, train_loader


def load_sites(cfg: Config) -> dict[str, SiteData]:
    """Read every site of the run (:func:`~fedhealth.data.sites.resolve_site_dirs`), files checked.

    Parameters
    ----------
    cfg : Config
        The run configuration: ``data.site_dirs``, or the synthetic cohort's settings.

    Returns
    -------
    dict of str to SiteData
        Site name (its folder's) -> its datalists, in site order.

    Raises
    ------
    DataError
        If a site is missing, its datalist or one of its files fails :func:`read_datalist`,
        or it declares other sequences or classes than ``cfg.model`` expects.
    """
    sites = {d.name: read_datalist(d / "dataset.json") for d in resolve_site_dirs(cfg)}
    for name, data in sites.items():
        check_declared(data, cfg, name)
    return sites


def evaluate_on_sites(
    model: nn.Module, sites: dict[str, SiteData], cfg: Config
) -> dict[str, EvalResult]:
    """Evaluate ``model`` on each site's test set.

    Parameters
    ----------
    model : torch.nn.Module
        The network to evaluate.
    sites : dict of str to SiteData
        Site name -> its datalists.
    cfg : Config
        The run configuration (its ``data`` settings and ``seed``).

    Returns
    -------
    dict of str to EvalResult
        Site name -> whole-volume Dice and loss on its labelled test cases (``num_examples``
        0 for a site without any).
    """
    return {
        name: evaluate_items(model, data.test, cfg, cfg.seed, cfg.train.device)
        for name, data in sites.items()
    }


def pooled_dice(results: dict[str, EvalResult]) -> float:
    """Compute Dice over the union of the test sets (per-volume mean, example-weighted).

    Parameters
    ----------
    results : dict of str to EvalResult
        Per-site results, e.g. from :func:`evaluate_on_sites`.

    Returns
    -------
    float
        ``sum(dice * num_examples) / sum(num_examples)``; 0.0 with no example.
    """
    total = sum(r.num_examples for r in results.values())
    return sum(r.dice * r.num_examples for r in results.values()) / max(total, 1)


def _fit(items: list[DatalistItem], cfg: Config, seed: int) -> nn.Module:
    seed_everything(seed, cfg.train.num_threads)
    model = build_model(cfg.model)
    loader = train_loader(items, cfg, seed)
    epochs = cfg.rounds * cfg.train.local_epochs
    device = resolve_device(cfg.train.device)
    train(model, loader, epochs, cfg.train.lr, cfg.train.weight_decay, device=device)
    return model


def centralized(cfg: Config, sites: dict[str, SiteData] | None = None) -> dict[str, EvalResult]:
    """Train on all sites' training data pooled; evaluate on each site's test set.

    Trains one model without DP for ``cfg.rounds * cfg.train.local_epochs`` epochs, seeded
    with ``cfg.seed``.

    Parameters
    ----------
    cfg : Config
        The run configuration.
    sites : dict of str to SiteData or None, default None
        The sites; None (or empty) reads them with :func:`load_sites`.

    Returns
    -------
    dict of str to EvalResult
        Site name -> the pooled model's result on that site's test set.

    Raises
    ------
    DataError
        If the sites are read here and one fails to load.
    ConfigError
        If ``cfg.model`` cannot be built.
    """
    sites = sites or load_sites(cfg)
    pooled = [item for data in sites.values() for item in data.train]
    return evaluate_on_sites(_fit(pooled, cfg, cfg.seed), sites, cfg)


def local(
    cfg: Config, sites: dict[str, SiteData] | None = None
) -> dict[str, dict[str, EvalResult]]:
    """For each site: train on its data alone, evaluate on every site's test set.

    Site number ``i`` (in ``sites`` order) trains without DP for
    ``cfg.rounds * cfg.train.local_epochs`` epochs, seeded with ``cfg.seed + i + 1``.

    Parameters
    ----------
    cfg : Config
        The run configuration.
    sites : dict of str to SiteData or None, default None
        The sites; None (or empty) reads them with :func:`load_sites`.

    Returns
    -------
    dict of str to dict of str to EvalResult
        Training site -> (test site -> result of the training site's model).

    Raises
    ------
    DataError
        If the sites are read here and one fails to load.
    ConfigError
        If ``cfg.model`` cannot be built.
    """
    sites = sites or load_sites(cfg)
    return {
        name: evaluate_on_sites(_fit(data.train, cfg, cfg.seed + i + 1), sites, cfg)
        for i, (name, data) in enumerate(sites.items())
    }
