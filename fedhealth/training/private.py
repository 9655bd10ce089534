"""The site's secret randomness for DP-SGD and a Poisson loader that survives empty batches.

DP-SGD's guarantee (Abadi et al. 2016, https://arxiv.org/abs/1607.00133) holds only against
someone who cannot predict the Gaussian noise or which records a batch drew. Both therefore
come from :func:`site_generator`, seeded from the operating system's entropy at the site,
never from the run configuration's seed (which the coordinator chooses and knows), and the
seed is neither sent nor logged. The run's seed keeps driving model initialisation, data
augmentation and the choice among a patient's scans.

:func:`poisson_loader` rebuilds a training loader with Poisson sampling (each record joins
each batch independently with probability ``q``) drawn from that generator. Opacus 1.6's own
``DPDataLoader`` reads the sampling generator from the original loader (seeded from the run
seed) and fails to build the empty batch for dict samples such as MONAI's (opacus#743:
``zeros(): argument 'dtype' must be torch.dtype, not type``); the loader here builds empty
batches of the right keys, shapes and dtypes instead, so an empty batch is a normal DP step.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

Batch = dict[str, torch.Tensor]


def site_generator(noise_seed: int | None = None) -> torch.Generator:
    """Build the generator DP noise and Poisson sampling draw from.

    Parameters
    ----------
    noise_seed : int or None, default None
        None (the default, and the only value a deployed site should use): seed from the
        operating system's CSPRNG (:func:`secrets.randbits`, 63 bits), a value that is
        neither returned, stored, sent nor logged. An int: a fixed seed for deterministic DP
        training, which the site may set in its own configuration only (never from the run
        configuration); with it, anyone who knows the seed can reproduce the noise and the
        guarantee no longer holds against them.

    Returns
    -------
    torch.Generator
        A CPU generator. torch's generator is a Mersenne Twister (MT19937): its seed is
        secret but it is not itself a cryptographically secure generator, and the Gaussian
        noise is sampled in floating point without the mitigation of Opacus's ``secure_mode``
        (which needs the ``torchcsprng`` package, not available here) against floating-point
        attacks on the Gaussian mechanism (Mironov 2012, https://doi.org/10.1145/2382196.2382264).

    Raises
    ------
    ValueError
        If ``noise_seed`` is negative.
    """
    if noise_seed is not None and noise_seed < 0:
        raise ValueError(f"noise_seed must be >= 0, got {noise_seed}")
    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63) if noise_seed is None else noise_seed)
    return generator


class EmptySafeCollate:
    """Collate a list of samples; an empty list gives a batch of zero records.

    A non-empty list goes to the wrapped collate function unchanged. An empty list gives a
    dict with the template's keys, each a plain tensor of shape (0, *record shape) with the
    template's dtype (a non-tensor value, e.g. a list of names, gives an empty list).

    Parameters
    ----------
    collate : callable
        The original loader's collate function, list of samples -> Batch.
    template : Mapping of str to Any
        One collated batch (any number of records); only keys, shapes after the first
        dimension, and dtypes are read.
    """

    def __init__(self, collate: Callable[[list[Any]], Any], template: Mapping[str, Any]) -> None:
        self.collate = collate
        self.empty: dict[str, Any] = {
            key: (
                torch.empty((0, *value.shape[1:]), dtype=value.dtype)
                if isinstance(value, torch.Tensor)
                else []
            )
            for key, value in template.items()
        }

    def __call__(self, samples: list[Any]) -> Any:
        """Collate ``samples``; see the class docstring."""
        if samples:
            return self.collate(samples)
        return {k: v.clone() if isinstance(v, torch.Tensor) else [] for k, v in self.empty.items()}


def poisson_loader(loader: DataLoader[Batch], generator: torch.Generator) -> DataLoader[Batch]:
    """Rebuild ``loader`` with Poisson sampling drawn from ``generator``.

    As Opacus's ``DPDataLoader``: sample rate ``q = 1 / len(loader)`` (so the expected batch
    size stays ``len(dataset) / len(loader)``) and ``len(loader)`` batches per pass, each
    record joining each batch independently with probability ``q``. Reads one record
    (``dataset[0]``, through the run-seeded transforms) to learn the shapes of an empty
    batch.

    Parameters
    ----------
    loader : torch.utils.data.DataLoader of Batch
        A map-style loader over dict samples, without worker processes needed.
    generator : torch.Generator
        The site's secret generator (:func:`site_generator`).

    Returns
    -------
    torch.utils.data.DataLoader of Batch
        Same dataset and collate function, batches of 0 to ``len(dataset)`` records; an
        empty batch holds tensors of shape (0, ...) per key (:class:`EmptySafeCollate`).

    Raises
    ------
    ValueError
        If the dataset or the loader is empty.
    """
    dataset: Sequence[Any] = loader.dataset  # type: ignore[assignment]  # map-style
    steps = len(loader)
    if not len(dataset) or not steps:
        raise ValueError("Poisson sampling needs a non-empty dataset")
    template = loader.collate_fn([dataset[0]])
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=1 / steps, generator=generator, steps=steps
    )
    return DataLoader(
        loader.dataset,
        batch_sampler=sampler,
        collate_fn=EmptySafeCollate(loader.collate_fn, template),
        num_workers=0,
    )
