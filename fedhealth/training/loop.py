"""The local train and evaluate loops: MONAI Dice+CE loss, MONAI Dice metric.

``train`` optionally adds FedProx's proximal term (Li et al. 2020, https://arxiv.org/abs/1812.06127),
``mu / 2 * ||w - w_global||^2``, when the strategy sends ``proximal-mu``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.utils import set_determinism
from torch import nn


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvalResult:
    loss: float
    dice: float
    num_examples: int


def seed_everything(seed: int, num_threads: int | None = None) -> None:
    """Seed torch, numpy and random (MONAI's ``set_determinism``); optionally pin CPU threads."""
    if num_threads:
        torch.set_num_threads(num_threads)
    set_determinism(seed=seed)


def loss_fn() -> nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True)


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """``sum ||w - w_anchor||^2`` over trainable parameters."""
    return sum(
        ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
    )  # type: ignore[return-value]


def train(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place with Adam; returns the mean loss over the last epoch."""
    model.train()
    criterion = loss_fn()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    steps, seen, last_epoch_loss = 0, 0, 0.0
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(batch["image"]), batch["label"])
            if anchor:
                loss = loss + 0.5 * proximal_mu * proximal_term(model, anchor)
            loss.backward()
            optimizer.step()
            n = batch["image"].shape[0]
            total, count, steps = total + loss.item() * n, count + n, steps + 1
        seen, last_epoch_loss = count, total / max(count, 1)
    return TrainResult(loss=last_epoch_loss, num_examples=seen, steps=steps)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict[str, torch.Tensor]]) -> EvalResult:
    """Mean Dice (lesion class, per volume) and Dice+CE loss over ``loader``."""
    model.eval()
    criterion = loss_fn()
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    total, count = 0.0, 0
    for batch in loader:
        logits = model(batch["image"])
        n = batch["image"].shape[0]
        total, count = total + criterion(logits, batch["label"]).item() * n, count + n
        classes = logits.shape[1]
        pred = one_hot(logits.argmax(dim=1, keepdim=True), num_classes=classes)
        metric(y_pred=pred, y=one_hot(batch["label"].long(), num_classes=classes))
    dice = float(metric.aggregate().item()) if count else 0.0
    return EvalResult(loss=total / max(count, 1), dice=dice, num_examples=count)
