"""Local training and evaluation at a site (MONAI losses and metrics)."""

from fedhealth.training.inference import infer
from fedhealth.training.loop import (
    DPSettings,
    EvalResult,
    TrainResult,
    evaluate,
    seed_everything,
    train,
)

__all__ = [
    "DPSettings",
    "EvalResult",
    "TrainResult",
    "evaluate",
    "infer",
    "seed_everything",
    "train",
]
