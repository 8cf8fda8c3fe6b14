"""lightning_cskl: Center-Sensitive Kernel Optimization with Dynamic Channel Element Selection.

Public names: :class:`CenterKernelCallback` (Lightning), :class:`CenterKernelConfig` and
:class:`CenterKernelLearner` (the engine).
"""

from .core.config import CenterKernelConfig
from .core.learner import CenterKernelLearner
from .lightning.callback import CenterKernelCallback

__all__ = ["CenterKernelCallback", "CenterKernelConfig", "CenterKernelLearner"]
__version__ = "0.1.0"
