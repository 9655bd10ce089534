"""Local training and evaluation at a site (MONAI losses and metrics)."""

from fedhealth.training.loop import EvalResult, TrainResult, evaluate, seed_everything, train

__all__ = ["EvalResult", "TrainResult", "evaluate", "seed_everything", "train"]
