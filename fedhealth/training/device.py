"""Where a site trains: its own choice of CPU or GPU, never the coordinator's.

``train.device`` (simulation, baselines, ``predict``) or a site's ``site.yaml`` ``device`` (the
deployed daemon, passed to its ClientApps as node config) picks it: ``auto`` (CUDA when PyTorch
sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. The run config a coordinator sends
carries no device: a site's hardware is the site's.

DP-SGD runs in float32 on every device: Opacus computes per-sample gradients in the parameters'
dtype, and its clipping and noise calibration assume them exact; mixed precision
(``torch.autocast``) is used for no training step. Whole-volume inference runs its windows on the
device and keeps the volume and the blended output in host memory (MONAI's ``sw_device`` /
``device``).
"""

from __future__ import annotations

import torch

from fedhealth.errors import ConfigError

__all__ = ["DEVICE_CHOICES", "device_generator", "resolve_device"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
"""What ``train.device`` and site.yaml ``device`` accept."""


def resolve_device(spec: str, where: str = "train.device") -> torch.device:
    """Turn a device setting into a :class:`torch.device` this machine has.

    Parameters
    ----------
    spec : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    where : str, default "train.device"
        The setting's name, for the error.

    Returns
    -------
    torch.device
        ``auto``: ``cuda`` (the current CUDA device) when :func:`torch.cuda.is_available`,
        else ``cpu``.

    Raises
    ------
    ConfigError
        ``spec`` is none of :data:`DEVICE_CHOICES`, or asks for CUDA (or a GPU index) this
        machine does not have; the message says how many GPUs PyTorch sees.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{where}={spec!r}: expected one of {DEVICE_CHOICES}") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"{where}={spec!r}: expected one of {DEVICE_CHOICES}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (device.index is not None and device.index >= count):
        raise ConfigError(
            f"{where}={spec!r}: PyTorch sees {count} CUDA device(s) on this machine "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use "
            "auto or cpu"
        )
    return device


def device_generator(secret: torch.Generator, device: torch.device) -> torch.Generator:
    """Return a generator on ``device`` seeded from the site's secret CPU generator.

    PyTorch draws Gaussian noise for a CUDA tensor only from a CUDA generator; the seed is one
    63-bit draw from ``secret`` (itself seeded from the site's OS entropy), so the noise stays
    unknown to anyone but the site.

    Parameters
    ----------
    secret : torch.Generator
        The site's secret generator (:func:`fedhealth.training.private.site_generator`).
    device : torch.device
        Where the model's parameters are.

    Returns
    -------
    torch.Generator
        ``secret`` itself on the CPU; otherwise a new generator on ``device``.
    """
    if device.type == "cpu":
        return secret
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=secret).item())
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
