"""The local train and evaluate loops: MONAI Dice+CE loss, MONAI Dice metric.

The loss is Dice (Milletari et al. 2016, V-Net, https://arxiv.org/abs/1606.04797) plus
cross-entropy. ``train`` optionally runs DP-SGD (Abadi et al. 2016,
https://arxiv.org/abs/1607.00133) through Opacus, and optionally adds FedProx's proximal term
(Li et al. 2020, https://arxiv.org/abs/1812.06127), ``mu / 2 * ||w - w_global||^2``, when the
strategy sends ``proximal-mu``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import cast

import torch
from monai.losses.dice import DiceCELoss
from monai.metrics.meandice import DiceMetric
from monai.networks.utils import one_hot
from monai.utils.misc import set_determinism
from torch import nn
from torch.utils.data import DataLoader

from fedhealth.training.inference import infer

Batch = dict[str, torch.Tensor]
"""A batch: ``"image"`` of shape (B, C, D, H, W) and ``"label"`` of shape (B, 1, D, H, W)."""


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD for one local training phase, run by Opacus.

    DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133): each record's gradient is
    clipped to ``max_grad_norm``, Gaussian noise of standard deviation
    ``noise_multiplier * max_grad_norm`` is added to their sum, and records are drawn by
    Poisson sampling. The optimizer stepping on the noisy gradient is Adam.

    The noise and the sampling are the site's secret: see ``noise_seed``. There is no
    "secure RNG" switch: Opacus's ``secure_mode`` needs the ``torchcsprng`` package, which has
    no build here. The generator is torch's Mersenne Twister seeded from the OS CSPRNG: its
    seed is unpredictable, but the generator itself is not a CSPRNG.

    Parameters
    ----------
    noise_multiplier : float
        Noise standard deviation relative to ``max_grad_norm``.
    max_grad_norm : float
        Per-record L2 clipping bound.
    accountant : str, default "rdp"
        Keyword-only. Opacus accountant: ``"rdp"`` (Rényi DP, Mironov 2017,
        https://arxiv.org/abs/1702.07476) or ``"prv"`` (privacy random variables, Gopi et al.
        2021, https://arxiv.org/abs/2106.02848).
    noise_seed : int or None, default None
        Keyword-only. None: the noise and the Poisson sampling draw from a generator seeded
        from the site's operating-system entropy
        (:func:`~fedhealth.training.private.site_generator`), independent of the run's seed,
        never sent nor logged. An int makes DP training deterministic (tests, debugging):
        only site-local code may set it, from the site's own settings (site.yaml), never from
        the run configuration or the instruction; whoever knows it can reproduce the noise,
        so the site's report must flag it.
    grad_sample_mode : str, default "hooks"
        Keyword-only. Opacus's per-sample gradient mode; see
        :data:`fedhealth.models.DP_READY`.
    """

    noise_multiplier: float
    max_grad_norm: float
    _: KW_ONLY
    accountant: str = "rdp"
    noise_seed: int | None = None
    grad_sample_mode: str = "hooks"


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train` did.

    Parameters
    ----------
    loss : float
        Mean Dice+CE loss per record over the last epoch (0.0 if it saw no record).
    num_examples : int
        Records seen in the last epoch.
    steps : int
        Optimizer steps over all epochs, noise-only steps on empty Poisson batches included.
    history : tuple of (float, float, int), default ()
        With DP, the Opacus accountant's history: (noise multiplier, sample rate, steps) per
        phase; empty without DP.
    """

    loss: float
    num_examples: int
    steps: int
    history: tuple[tuple[float, float, int], ...] = ()


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured.

    Parameters
    ----------
    loss : float
        Mean Dice+CE loss per volume (0.0 with no volume).
    dice : float
        Dice per volume and foreground class, averaged over both, in [0, 1] (0.0 with no
        volume).
    num_examples : int
        Volumes evaluated.
    dice_per_class : tuple of float, default ()
        Mean Dice per volume of each foreground class (class 1 first), in [0, 1].
    """

    loss: float
    dice: float
    num_examples: int
    dice_per_class: tuple[float, ...] = ()


def seed_everything(seed: int, num_threads: int | None = None) -> None:
    """Seed torch, numpy and random (MONAI's ``set_determinism``); optionally pin CPU threads.

    Parameters
    ----------
    seed : int
        The seed.
    num_threads : int or None, default None
        If given and non-zero, the number of torch CPU threads.
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    set_determinism(seed=seed)


def loss_fn() -> nn.Module:
    """Build the training loss: MONAI ``DiceCELoss``, Dice plus cross-entropy, equally weighted.

    Returns
    -------
    torch.nn.Module
        Called as ``loss(logits, label)`` with logits of shape (B, K, D, H, W) (softmax is
        applied inside) and class-index labels of shape (B, 1, D, H, W) (one-hot encoded
        inside); returns a scalar tensor, the mean over the batch.
    """
    return DiceCELoss(to_onehot_y=True, softmax=True)


def proximal_term(model: nn.Module, anchor: Sequence[torch.Tensor]) -> torch.Tensor:
    """Compute FedProx's ``sum ||w - w_anchor||^2`` over a network's parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The network being trained.
    anchor : sequence of torch.Tensor
        One tensor per parameter of ``model``, in ``model.parameters()`` order.

    Returns
    -------
    torch.Tensor
        A scalar tensor.

    Raises
    ------
    ValueError
        If ``anchor`` and the parameters differ in number.
    """
    return sum(  # type: ignore[return-value]  # a tensor for any non-empty model
        ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
    )


def train(
    model: nn.Module,
    loader: DataLoader[Batch],
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    dp: DPSettings | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """Train ``model`` in place with Adam (DP-Adam through Opacus when ``dp`` is given).

    The FedProx gradient ``mu * (w - w_global)`` (Li et al. 2020,
    https://arxiv.org/abs/1812.06127) depends on no record, so under DP it is added after
    clipping and noise (post-processing), not through the per-sample gradients. With DP,
    ``loader`` is replaced by a Poisson-sampling one
    (:func:`~fedhealth.training.private.poisson_loader`) and the noise and the sampling draw
    from the site's secret generator, not from the run's seed; a batch that draws no record
    still takes a noise-only step, counted by the accountant.

    Parameters
    ----------
    model : torch.nn.Module
        The network; its weights at the call are the FedProx anchor ``w_global``.
    loader : torch.utils.data.DataLoader of Batch
        Training batches, e.g. from :func:`fedhealth.data.loading.make_loader`.
    epochs : int
        Passes over ``loader``.
    lr : float
        Adam learning rate.
    weight_decay : float, default 0.0
        Adam's L2 weight decay.
    proximal_mu : float, default 0.0
        FedProx's ``mu``; 0 disables the proximal term.
    dp : DPSettings or None, default None
        DP-SGD settings; None trains without DP.
    device : torch.device or None, default None
        Where to train (:func:`fedhealth.training.device.resolve_device`); None: where the
        model is. The model is moved there; batches are copied there per step; the DP noise
        is drawn there from a generator seeded by the site's secret one.

    Returns
    -------
    TrainResult
        The mean loss and record count of the last epoch, the step count and, with DP, the
        accountant's history.

    """
    device = device or _device_of(model, torch.device("cpu"))
    model.to(device)
    criterion = loss_fn()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    params = list(model.parameters())
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    engine = None
    model.train()  # Opacus validates the mode; a model just evaluated is in eval mode
    if dp is not None:
        from opacus import PrivacyEngine

        from fedhealth.training import grad_samplers  # noqa: F401  (registers 3D conv samplers)
        from fedhealth.training.device import device_generator
        from fedhealth.training.private import poisson_loader, site_generator

        secret = site_generator(dp.noise_seed)  # never sent, never logged
        with warnings.catch_warnings():
            # Opacus warns that its secure_mode (torchcsprng, no build) is off: the noise and
            # the sampling below draw from the site's own generator instead, seeded from its OS
            # entropy (fedhealth.training.private), which is what that warning is about
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
            engine = PrivacyEngine(accountant=dp.accountant)
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=poisson_loader(loader, secret),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=False,  # already Poisson, from the site's generator
            noise_generator=device_generator(secret, device),
            grad_sample_mode=dp.grad_sample_mode,
        )
        model.forbid_grad_accumulation()  # type: ignore[operator]  # as poisson_sampling=True
    model.train()
    steps, seen, last_epoch_loss = 0, 0, 0.0
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            n = batch["image"].shape[0]
            if n:
                image = batch["image"].to(device, non_blocking=True)
                label = batch["label"].to(device, non_blocking=True)
                loss = criterion(model(image), label)
                with warnings.catch_warnings():
                    # Opacus's per-sample hooks are full backward hooks and images need no
                    # gradient: torch notes that the first layer's hook sees only its output,
                    # which is all Opacus reads
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                total, count = total + loss.item() * n, count + n
            elif engine is not None:  # Poisson sampling drew no record: a noise-only step
                for p in params:
                    # Opacus reads the per-sample gradients from this attribute
                    p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
            _step(optimizer, params, anchor, proximal_mu, private=engine is not None)
            steps += 1
        seen, last_epoch_loss = count, total / max(count, 1)
    history: tuple[tuple[float, float, int], ...] = ()
    if engine is not None:
        history = tuple(engine.accountant.history)
        model._close()  # type: ignore[operator]  # removes Opacus's hooks and grad_sample
    return TrainResult(loss=last_epoch_loss, num_examples=seen, steps=steps, history=history)


def _device_of(model: nn.Module, default: torch.device) -> torch.device:
    """Where ``model``'s parameters are; ``default`` for a model without any."""
    first = next(model.parameters(), None)
    return default if first is None else first.device


def _step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    anchor: Sequence[torch.Tensor],
    mu: float,
    *,
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
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    patch_size: int,
    *,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    device: torch.device | None = None,
) -> EvalResult:
    """Measure Dice per class on whole volumes, and Dice+CE loss, by sliding-window inference.

    The prediction is the argmax class of :func:`infer`'s logits; Dice follows MONAI's
    ``DiceMetric`` per volume and foreground class (background excluded), a class absent from
    both the label and the prediction counting as 1. Runs without gradients, the model in eval
    mode.

    Parameters
    ----------
    model : torch.nn.Module
        The network, logits of shape (B, K, p, p, p) for windows of shape (B, C, p, p, p).
    loader : iterable of Batch
        Whole-volume batches, e.g. ``make_loader(..., train=False, ...)``.
    patch_size : int
        Sliding-window edge, in voxels.
    sw_batch_size : int, default 4
        Keyword-only. Windows per forward pass.
    overlap : float, default 0.25
        Keyword-only. Overlap of neighbouring windows.
    device : torch.device or None, default None
        Keyword-only. Where the model runs (it is moved there); None: where it is. Volumes,
        logits and the metric stay in host memory.

    Returns
    -------
    EvalResult
        Mean loss per volume, Dice (mean and per class) and the number of volumes.
    """
    if device is not None:
        model.to(device)
    model.eval()
    criterion = loss_fn()
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    total, count = 0.0, 0
    for batch in loader:
        logits = infer(
            model, batch["image"], patch_size, sw_batch_size=sw_batch_size, overlap=overlap
        )
        n = batch["image"].shape[0]
        total, count = total + criterion(logits, batch["label"]).item() * n, count + n
        classes = logits.shape[1]
        pred = one_hot(logits.argmax(dim=1, keepdim=True), num_classes=classes)
        metric(y_pred=pred, y=one_hot(batch["label"].long(), num_classes=classes))
    if not count:
        return EvalResult(loss=0.0, dice=0.0, num_examples=0)
    # with reduction="mean_batch" MONAI's aggregate returns one tensor, one entry per class
    per_class = tuple(float(d) for d in cast(torch.Tensor, metric.aggregate()).tolist())
    return EvalResult(
        loss=total / count,
        dice=sum(per_class) / len(per_class),
        num_examples=count,
        dice_per_class=per_class,
    )
