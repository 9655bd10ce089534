"""Baselines for the claim that federation helps, evaluated on the same per-site test sets.

* centralized: every site's training data pooled in one place (the upper bound federation aims
  for, and exactly what hospitals cannot do);
* local: each site trains alone on its own data (what a hospital gets without joining).

Both train for ``rounds * local_epochs`` epochs, the number of passes a federated site makes.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fedhealth.config import Config
from fedhealth.data.loading import SiteData, make_loader, read_datalist
from fedhealth.data.synth import site_dir
from fedhealth.models import build_model
from fedhealth.training.loop import EvalResult, evaluate, seed_everything, train


def load_sites(cfg: Config) -> dict[str, SiteData]:
    root = Path(cfg.data.root)
    return {
        f"site-{s}": read_datalist(site_dir(root, s) / "dataset.json") for s in range(cfg.sites)
    }


def evaluate_on_sites(
    model: nn.Module, sites: dict[str, SiteData], cfg: Config
) -> dict[str, EvalResult]:
    return {
        name: evaluate(
            model,
            make_loader(
                data.test,
                cfg.data.roi,
                cfg.data.target_spacing,
                cfg.train.batch_size,
                False,
                cfg.seed,
                cfg.data.cache,
            ),
        )
        for name, data in sites.items()
    }


def pooled_dice(results: dict[str, EvalResult]) -> float:
    """Dice over the union of the test sets (per-volume mean, so example-weighted over sites)."""
    total = sum(r.num_examples for r in results.values())
    return sum(r.dice * r.num_examples for r in results.values()) / max(total, 1)


def _fit(items: list[dict[str, str]], cfg: Config, seed: int) -> nn.Module:
    seed_everything(seed, cfg.train.num_threads)
    model = build_model(cfg.model)
    loader = make_loader(
        items,
        cfg.data.roi,
        cfg.data.target_spacing,
        cfg.train.batch_size,
        True,
        seed,
        cfg.data.cache,
    )
    train(model, loader, cfg.rounds * cfg.train.local_epochs, cfg.train.lr, cfg.train.weight_decay)
    return model


def centralized(cfg: Config, sites: dict[str, SiteData] | None = None) -> dict[str, EvalResult]:
    """Train on all sites' training data pooled; evaluate on each site's test set."""
    sites = sites or load_sites(cfg)
    pooled = [item for data in sites.values() for item in data.train]
    return evaluate_on_sites(_fit(pooled, cfg, cfg.seed), sites, cfg)


def local(
    cfg: Config, sites: dict[str, SiteData] | None = None
) -> dict[str, dict[str, EvalResult]]:
    """For each site: train on its data alone, evaluate on every site's test set."""
    sites = sites or load_sites(cfg)
    return {
        name: evaluate_on_sites(_fit(data.train, cfg, cfg.seed + i + 1), sites, cfg)
        for i, (name, data) in enumerate(sites.items())
    }
