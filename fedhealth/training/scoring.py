"""A run's data settings applied: training patches and whole-volume scores for a set of cases."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.utils.data import DataLoader

from fedhealth.config import Config
from fedhealth.data.loading import DatalistItem, make_loader
from fedhealth.training.device import resolve_device
from fedhealth.training.loop import Batch, EvalResult, evaluate

__all__ = ["evaluate_items", "train_loader"]


def train_loader(items: Sequence[DatalistItem], cfg: Config, seed: int) -> DataLoader[Batch]:
    """Build the training loader of ``items`` with the run's data settings.

    Parameters
    ----------
    items : sequence of DatalistItem
        Labelled training cases.
    cfg : Config
        The run config: ``data.patch_size``, ``data.target_spacing``, ``data.cache``,
        ``train.batch_size``.
    seed : int
        Seeds the patches, flips and the order.

    Returns
    -------
    torch.utils.data.DataLoader
        As :func:`fedhealth.data.loading.make_loader` with ``train=True``: one patch per
        patient per draw.
    """
    return make_loader(
        items,
        cfg.data.patch_size,
        cfg.data.target_spacing,
        cfg.train.batch_size,
        train=True,
        seed=seed,
        cache=cfg.data.cache,
    )


def evaluate_items(
    model: nn.Module, items: Sequence[DatalistItem], cfg: Config, seed: int, device: str = "auto"
) -> EvalResult:
    """Score ``model`` on whole volumes by sliding-window inference, with the run's settings.

    Parameters
    ----------
    model : torch.nn.Module
        The network.
    items : sequence of DatalistItem
        Labelled cases; none gives an :class:`EvalResult` with ``num_examples == 0``.
    cfg : Config
        The run config: ``data.patch_size`` (the window), ``data.sw_batch_size``,
        ``data.sw_overlap``, ``data.target_spacing``, ``data.cache``.
    seed : int
        Passed to the loader (evaluation draws nothing at random).
    device : str, default "auto"
        Where the model runs (:func:`fedhealth.training.device.resolve_device`).

    Returns
    -------
    EvalResult
        Loss, mean and per-class Dice over the volumes, and their number.
    """
    if not items:
        return EvalResult(loss=0.0, dice=0.0, num_examples=0)
    loader = make_loader(
        items,
        cfg.data.patch_size,
        cfg.data.target_spacing,
        1,
        train=False,
        seed=seed,
        cache=cfg.data.cache,
    )
    return evaluate(
        model,
        loader,
        cfg.data.patch_size,
        sw_batch_size=cfg.data.sw_batch_size,
        overlap=cfg.data.sw_overlap,
        device=resolve_device(device),
    )
