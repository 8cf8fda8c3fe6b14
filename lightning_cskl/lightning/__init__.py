"""The Lightning front door."""

from .callback import CenterKernelCallback, default_batch_input

__all__ = ["CenterKernelCallback", "default_batch_input"]
