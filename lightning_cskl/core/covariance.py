"""Uncentered covariance of the inputs that each trained layer's center taps read.

For a layer with ``groups`` groups the covariance is block diagonal, so it is kept per group as a tensor of
shape ``(groups, C/groups, C/groups)``. Each task contributes its covariance normalised by its own number of
samples (one sample per image and output position), so the state has a constant size in the number of tasks.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .center import center_input

__all__ = ["CovarianceCollector", "NonFiniteInputError", "center_covariance", "all_reduce_max_", "all_reduce_sum_"]


def center_covariance(x_center: Tensor, groups: int) -> tuple[Tensor, int]:
    """Sum of outer products of center-input vectors, per group.

    Args:
        x_center: ``(N, C, *spatial)`` center inputs (see :func:`~lightning_cskl.core.center.center_input`).
        groups: the convolution's groups.

    Returns:
        ``(sum, count)``: ``sum`` of shape ``(groups, C/groups, C/groups)`` in float64 and the number of
        vectors summed.
    """
    n, c = x_center.shape[:2]
    vectors = x_center.detach().to(torch.float64).reshape(n, groups, c // groups, -1)
    vectors = vectors.permute(1, 2, 0, 3).reshape(groups, c // groups, -1)
    return vectors @ vectors.transpose(1, 2), vectors.shape[-1]


def all_reduce_max_(tensor: Tensor) -> Tensor:
    """Maximum of ``tensor`` in place across processes when torch.distributed runs with more than one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` in place across processes when torch.distributed is running with more than one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class NonFiniteInputError(RuntimeError):
    """Every input a layer saw while its covariance was collected was NaN or infinite."""


class CovarianceCollector:
    """Accumulate per-layer center-input covariances with forward hooks.

    Example:
        >>> conv = nn.Conv2d(3, 4, 3, padding=1)
        >>> collector = CovarianceCollector({"conv": conv})
        >>> with collector.hooked():
        ...     _ = conv(torch.randn(2, 3, 5, 5))
        >>> collector.covariances()["conv"].shape
        torch.Size([1, 3, 3])
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {name: 0 for name in layers}
        self.skipped: dict[str, int] = {}  # samples left out because their input was not finite
        self.paused = False  # forward calls made while True are not collected

    def statistic(self, name: str, module: nn.Module, x: Tensor, output: Tensor) -> tuple[Tensor, int]:
        """``(sum of outer products, number of vectors)`` of one forward call; subclasses change what is summed."""
        conv = getattr(module, "conv", module)
        ndim = len(conv.kernel_size)
        return center_covariance(center_input(conv, x, tuple(output.shape[-ndim:])), conv.groups)

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self.paused:
                return
            x = inputs[0]
            if x.dim() == len(getattr(module, "conv", module).kernel_size) + 1:  # unbatched input
                x, output = x.unsqueeze(0), output.unsqueeze(0)
            if not bool(torch.isfinite(x).all()):
                # a NaN or infinite input must never reach the stored state: leave those samples out
                keep = torch.isfinite(x.flatten(1)).all(1)
                self.skipped[name] = self.skipped.get(name, 0) + int((~keep).sum())
                if not bool(keep.any()):
                    return
                x, output = x[keep], output[keep]
            total, count = self.statistic(name, module, x, output)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
            self.counts[name] = self.counts.get(name, 0) + count

        return hook

    @contextmanager
    def hooked(self) -> Iterator["CovarianceCollector"]:
        """Collect while inside the context; the hooks are removed on exit, also on error."""
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def covariances(self) -> dict[str, Tensor]:
        """Per-layer covariance normalised by the number of vectors seen (summed over processes)."""
        result = {}
        for name, module in self.layers.items():
            conv = getattr(module, "conv", module)
            groups, cg = conv.groups, conv.in_channels // conv.groups
            device = conv.weight.device
            total = self.sums.get(name, torch.zeros(groups, cg, cg, dtype=torch.float64, device=device))
            count = torch.tensor([float(self.counts[name])], dtype=torch.float64, device=total.device)
            all_reduce_sum_(total)
            all_reduce_sum_(count)
            if count.item() == 0:
                skipped = self.skipped.get(name, 0)
                if skipped:
                    raise NonFiniteInputError(
                        f"layer {name!r} saw only non-finite inputs ({skipped} samples) while its covariance was "
                        "collected: the model computes NaN or infinity there (training diverged, or the data holds "
                        "NaN or infinite values)"
                    )
                raise RuntimeError(
                    f"layer {name!r} saw no input while its covariance was collected: the dataloader was empty "
                    "or the layer is not used in the model's forward"
                )
            result[name] = (total / count).to(torch.float32)
        return result


def collect_covariances(layers: dict[str, nn.Module], forward: Iterable[None]) -> dict[str, Tensor]:
    """Run ``forward`` (an iterable whose iteration runs the model over data) under collection hooks."""
    collector = CovarianceCollector(layers)
    with collector.hooked(), torch.no_grad():
        for _ in forward:
            pass
    return collector.covariances()
