"""The method in plain PyTorch: no Lightning, no Avalanche."""

from .center import CenterBranch, attached_branch, center_index, center_input
from .config import CenterKernelConfig
from .covariance import CovarianceCollector, center_covariance
from .learner import CenterKernelLearner, NoEligibleLayerError, resolve_layers
from .projection import free_basis, layer_projector, project_update
from .prototypes import PrototypeMemory
from .selection import channel_scores, select_channels

__all__ = [
    "CenterBranch",
    "CenterKernelConfig",
    "CenterKernelLearner",
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
    "select_channels",
]
