"""Training multi-task recommenders: fit/evaluate loop, masked per-task losses, loss weighting
(fixed, uncertainty, GradNorm), weight averaging (EMA), early stopping, seeds, atomic resumable
checkpoints."""

from .checkpoint import build_model, load_checkpoint, save_checkpoint
from .loop import FitResult, TrainConfig, fit, seed_everything, shared_parameters, validation_monitor
from .losses import masked_task_losses
from .weighting import FixedWeighting, GradNorm, UncertaintyWeighting, make_weighting

__all__ = [
    "TrainConfig",
    "FitResult",
    "fit",
    "seed_everything",
    "shared_parameters",
    "validation_monitor",
    "masked_task_losses",
    "FixedWeighting",
    "UncertaintyWeighting",
    "GradNorm",
    "make_weighting",
    "save_checkpoint",
    "load_checkpoint",
    "build_model",
]
