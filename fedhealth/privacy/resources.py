"""The site's compute limits: no instruction may exhaust a hospital's memory or CPUs.

A coordinator sends the whole training and evaluation config; the fields that size the work
(the model, the patch and sliding window, the resampling grid, batches, threads) are bounded by
the site's :class:`~fedhealth.privacy.policy.SitePolicy` and checked before the site reads its
data or allocates the model.
"""

from __future__ import annotations

import os

import torch

from fedhealth.config import Config
from fedhealth.models.factory import build_model, num_parameters
from fedhealth.privacy.policy import SitePolicy, refuse

__all__ = ["check_resources"]


def check_resources(policy: SitePolicy, site: str, cfg: Config) -> None:
    """Refuse an instruction whose compute or memory exceeds what the site allows.

    Called for training and evaluation instructions alike, before the site reads its data
    or builds the model: a coordinator cannot exhaust a hospital's memory, disk or CPUs
    with a huge model, patch, batch or resampling grid.

    Parameters
    ----------
    policy : SitePolicy
        The site's policy (its ``max_*`` and ``min_target_spacing`` limits).
    site : str
        The site's name, for the message.
    cfg : Config
        The run config the instruction carries (``model.*``, ``data.patch_size``,
        ``data.target_spacing``, ``data.sw_batch_size``, ``train.batch_size``,
        ``train.num_threads``).

    Raises
    ------
    PolicyRefused
        A limit is broken; the message names the run config field and the site's limit.
    ConfigError
        The model config cannot be built (from :func:`fedhealth.models.factory.build_model`).
    """
    threads = policy.max_num_threads or os.cpu_count() or 1
    bounds = [
        ("max_patch_size", cfg.data.patch_size > policy.max_patch_size,
         f"data.patch_size={cfg.data.patch_size}; this site allows {policy.max_patch_size}"),
        ("min_target_spacing", cfg.data.target_spacing < policy.min_target_spacing,
         f"data.target_spacing={cfg.data.target_spacing:g} mm is finer than this site's "
         f"{policy.min_target_spacing:g} mm"),
        ("max_batch_size", cfg.train.batch_size > policy.max_batch_size,
         f"train.batch_size={cfg.train.batch_size}; this site allows {policy.max_batch_size}"),
        ("max_sw_batch_size", cfg.data.sw_batch_size > policy.max_sw_batch_size,
         f"data.sw_batch_size={cfg.data.sw_batch_size}; this site allows "
         f"{policy.max_sw_batch_size}"),
        ("max_num_threads", cfg.train.num_threads > threads,
         f"train.num_threads={cfg.train.num_threads}; this site allows {threads}"),
    ]  # fmt: skip
    for name, broken, message in bounds:
        if broken:
            refuse(site, name, message)
    with torch.device("meta"):  # counts the parameters without allocating them
        parameters = num_parameters(build_model(cfg.model))
    if parameters > policy.max_model_parameters:
        refuse(
            site,
            "max_model_parameters",
            f"model.* builds {parameters:,} parameters; this site allows "
            f"{policy.max_model_parameters:,}",
        )
