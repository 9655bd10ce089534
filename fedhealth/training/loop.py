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
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD for one local training phase (Abadi et al. 2016, https://arxiv.org/abs/1607.00133),
    run by Opacus: per-sample clipping to ``max_grad_norm``, Gaussian noise of
    ``noise_multiplier * max_grad_norm``, Poisson sampling of records.

    Parameters
    ----------
    noise_multiplier : float
    max_grad_norm : float
    accountant : str, default "rdp" ("prv" also)
    secure_rng : bool, default False: cryptographically secure noise (Opacus ``secure_mode``)
    grad_sample_mode : str, default "hooks": see :data:`fedhealth.models.DP_READY`
    """

    noise_multiplier: float
    max_grad_norm: float
    accountant: str = "rdp"
    secure_rng: bool = False
    grad_sample_mode: str = "hooks"


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    steps: int
    history: tuple[tuple[float, float, int], ...] = ()


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
    return sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))  # type: ignore[return-value]


def train(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    dp: DPSettings | None = None,
) -> TrainResult:
    """Train ``model`` in place with Adam (DP-Adam through Opacus when ``dp`` is given).

    Returns the mean loss over the last epoch and, with DP, the accountant's history. The
    FedProx gradient ``mu * (w - w_global)`` depends on no record, so under DP it is added
    after clipping and noise (post-processing), not through the per-sample gradients.
    """
    criterion = loss_fn()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    params = list(model.parameters())
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    engine = None
    if dp is not None:
        from opacus import PrivacyEngine

        try:
            engine = PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_rng)
        except ImportError as exc:  # Opacus's secure mode needs the torchcsprng package
            from fedhealth.errors import ConfigError

            raise ConfigError(
                "privacy.secure_rng=true needs Opacus's secure mode and the torchcsprng package, "
                f"which is not installed ({exc}); no noise was drawn and nothing was trained"
            ) from exc
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=dp.grad_sample_mode,
        )
    model.train()
    steps, seen, last_epoch_loss = 0, 0, 0.0
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            n = batch["image"].shape[0]
            if n:
                loss = criterion(model(batch["image"]), batch["label"])
                loss.backward()
                total, count = total + loss.item() * n, count + n
            elif engine is not None:  # Poisson sampling drew no record: a noise-only step
                for p in params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
            _step(optimizer, params, anchor, proximal_mu, private=engine is not None)
            steps += 1
        seen, last_epoch_loss = count, total / max(count, 1)
    history: tuple[tuple[float, float, int], ...] = ()
    if engine is not None:
        history = tuple(engine.accountant.history)
        model._close()  # type: ignore[operator]  # removes Opacus's hooks and grad_sample
    return TrainResult(loss=last_epoch_loss, num_examples=seen, steps=steps, history=history)


def _step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    anchor: list[torch.Tensor],
    mu: float,
    private: bool,
) -> None:
    if private:  # DPOptimizer: pre_step clips, noises and averages into p.grad
        if not optimizer.pre_step():  # type: ignore[attr-defined]
            return
        inner = optimizer.original_optimizer  # type: ignore[attr-defined]
    else:
        inner = optimizer
    if anchor:
        with torch.no_grad():
            for p, a in zip(params, anchor, strict=True):
                prox = mu * (p - a)
                p.grad = prox if p.grad is None else p.grad + prox
    inner.step()


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
