"""The Avalanche front door: :class:`CSKLStrategy` (a SupervisedTemplate plus :class:`CSKLPlugin`), networks
with Avalanche's dynamic heads, a working W&B logger, and :func:`run_continual` (a whole run with
checkpoint/resume and the accuracy matrix)."""

from .models import ClassIncrementalNet, TaskIncrementalNet
from ..core.prototypes import PrototypeMemory
from .run import (
    CheckpointError, ContinualResult, NoDataError, accuracy_summary, load_checkpoint, run_continual, save_checkpoint,
    train_base,
)
from .strategy import CSKLPlugin, CSKLStrategy, EmptyExperienceError, find_head
from .wandb_logger import WandbLogger

__all__ = [
    "CSKLPlugin",
    "CheckpointError",
    "CSKLStrategy",
    "ClassIncrementalNet",
    "ContinualResult",
    "EmptyExperienceError",
    "NoDataError",
    "PrototypeMemory",
    "TaskIncrementalNet",
    "WandbLogger",
    "accuracy_summary",
    "find_head",
    "load_checkpoint",
    "run_continual",
    "train_base",
    "save_checkpoint",
]
