"""The method in plain PyTorch: no Lightning, no Avalanche."""

from .center import CenterDecoupledConv, center_index, center_input, decouple_center, fold_center, is_center_decoupled
from .config import CenterKernelConfig
from .covariance import CovarianceCollector, center_covariance
from .learner import CenterKernelLearner, NoEligibleLayerError, resolve_layers
from .projection import free_basis, layer_projector, project_update
from .prototypes import PrototypeMemory
from .selection import channel_scores, select_channels

__all__ = [
    "CenterDecoupledConv",
    "CenterKernelConfig",
    "CenterKernelLearner",
    "CovarianceCollector",
    "NoEligibleLayerError",
    "PrototypeMemory",
    "center_covariance",
    "center_index",
    "center_input",
    "channel_scores",
    "decouple_center",
    "fold_center",
    "free_basis",
    "is_center_decoupled",
    "layer_projector",
    "project_update",
    "resolve_layers",
    "select_channels",
]
