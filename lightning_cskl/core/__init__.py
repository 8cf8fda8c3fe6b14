"""The method in plain PyTorch: no Lightning, no Avalanche."""

from .center import CenterBranch, attached_branch, center_index, center_input
from .config import CenterKernelConfig, HeadConfig
from .covariance import CovarianceCollector, center_covariance
from .layers import NoEligibleLayerError, resolve_layers, resolve_train_also
from .learner import CenterKernelLearner
from .projection import free_basis, layer_projector, project_update
from .prototypes import PrototypeMemory
from .selection import channel_scores, select_channels

__all__ = [
    "CenterBranch",
    "CenterKernelConfig",
    "CenterKernelLearner",
    "HeadConfig",
    "CovarianceCollector",
    "NoEligibleLayerError",
    "PrototypeMemory",
    "center_covariance",
    "center_index",
    "center_input",
    "channel_scores",
    "attached_branch",
    "free_basis",
    "layer_projector",
    "project_update",
    "resolve_layers",
    "resolve_train_also",
    "select_channels",
]
