"""lightning_cskl: Center-Sensitive Kernel Optimization with Dynamic Channel Element Selection.

Public names: :class:`CenterKernelCallback` (Lightning), :class:`CSKLStrategy` and :class:`CSKLPlugin`
(Avalanche), :class:`CenterKernelConfig` and :class:`CenterKernelLearner` (the engine).
"""

from typing import Any

from .core.config import CenterKernelConfig
from .core.learner import CenterKernelLearner
from .lightning.callback import CenterKernelCallback

__all__ = ["CSKLPlugin", "CSKLStrategy", "CenterKernelCallback", "CenterKernelConfig", "CenterKernelLearner"]
__version__ = "0.1.0"

_AVALANCHE_NAMES = ("CSKLPlugin", "CSKLStrategy")


def __getattr__(name: str) -> Any:
    # Avalanche is imported on first use only: Lightning users do not pay for its import
    if name in _AVALANCHE_NAMES:
        from . import avalanche

        return getattr(avalanche, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
