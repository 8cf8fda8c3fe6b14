"""lightning_cskl: Center-Sensitive Kernel Optimization with Dynamic Channel Element Selection.

Public names: :class:`CenterKernelCallback` (Lightning), :class:`CSKLStrategy` and :class:`CSKLPlugin`
(Avalanche), :class:`CenterKernelConfig` and :class:`CenterKernelLearner` (the engine). The front doors are
imported on first use, so ``import lightning_cskl.core`` pulls in neither Lightning nor Avalanche.
"""

from typing import Any

from .core.config import CenterKernelConfig
from .core.learner import CenterKernelLearner

__all__ = ["CSKLPlugin", "CSKLStrategy", "CenterKernelCallback", "CenterKernelConfig", "CenterKernelLearner"]
__version__ = "0.1.0"

_LAZY = {"CSKLPlugin": "avalanche", "CSKLStrategy": "avalanche", "CenterKernelCallback": "lightning"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
