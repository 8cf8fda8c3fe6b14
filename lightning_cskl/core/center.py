"""Decouple the center element of a convolution kernel into a trainable 1×1 branch, and fold it back.

The decoupled module computes ``conv_kxk(x; W with center zeroed) + conv_1x1(x'; W_c)`` where ``x'`` holds
exactly the input pixels that the kernel's center tap reads. Only ``W_c`` needs a weight gradient, which
is what makes training cheap; folding adds ``W_c`` back into the kernel center and returns the original
module, so the deployed network keeps its architecture and inference cost.

Example:
    >>> import torch
    >>> conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    >>> x = torch.randn(2, 4, 6, 6)
    >>> before = conv(x)
    >>> dec = decouple_center(conv)
    >>> torch.allclose(dec(x), before, atol=1e-5)
    True
    >>> folded = fold_center(dec)
    >>> folded is conv and torch.allclose(folded(x), before, atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CenterDecoupledConv",
    "center_index",
    "center_input",
    "center_slice",
    "decouple_center",
    "fold_center",
    "is_center_decoupled",
    "is_eligible_conv",
    "set_submodule",
]

_ConvNd = Union[nn.Conv1d, nn.Conv2d, nn.Conv3d]
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def center_index(kernel_size: tuple[int, ...] | int) -> tuple[int, ...]:
    """Index of the center tap of a kernel, per spatial dimension.

    Args:
        kernel_size: the kernel size, one int per spatial dimension (or one int for all).

    Returns:
        ``k // 2`` for each dimension.

    Raises:
        ValueError: if any kernel dimension is even (an even kernel has no center element).

    Example:
        >>> center_index((3, 5))
        (1, 2)
    """
    sizes = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    if any(k % 2 == 0 or k < 1 for k in sizes):
        raise ValueError(f"kernel_size={sizes} has no center element: every kernel dimension must be odd (1, 3, 5, ...)")
    return tuple(k // 2 for k in sizes)


def center_slice(kernel_size: tuple[int, ...]) -> tuple[slice | int, ...]:
    """Index into a weight of shape ``(D, C/g, *kernel_size)`` that selects the center taps ``(D, C/g)``."""
    return (slice(None), slice(None), *center_index(kernel_size))


def is_eligible_conv(module: nn.Module) -> bool:
    """True for a Conv1d/2d/3d (not transposed) whose kernel is odd in every dimension."""
    if not isinstance(module, _CONV_TYPES) or isinstance(module, nn.modules.conv._ConvTransposeNd):
        return False
    return all(k % 2 == 1 for k in module.kernel_size)


def _explicit_padding(conv: _ConvNd) -> tuple[int, ...]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0,) * len(conv.kernel_size)
        # 'same' with an odd kernel pads symmetrically by dilation * (k // 2)
        return tuple(d * (k // 2) for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def center_input(conv: _ConvNd, x: Tensor, out_size: tuple[int, ...]) -> Tensor:
    """The input pixels that the center tap of ``conv`` reads, aligned with the output grid.

    Args:
        conv: the (plain or wrapped) convolution whose geometry is used.
        x: the convolution's input, ``(N, C, *spatial)`` or unbatched ``(C, *spatial)``.
        out_size: the spatial size of the convolution's output.

    Returns:
        A tensor of shape ``(N, C, *out_size)`` (a view of ``x`` where padding allows) such that a 1×1
        convolution with stride 1 over it equals the center tap's contribution to the output.
    """
    ndim = len(conv.kernel_size)
    padding = _explicit_padding(conv)
    offsets = [d * c - p for d, c, p in zip(conv.dilation, center_index(conv.kernel_size), padding)]
    spatial = x.shape[-ndim:]
    needs_pad = any(o < 0 or o + (n - 1) * s + 1 > size
                    for o, n, s, size in zip(offsets, out_size, conv.stride, spatial))
    if needs_pad:
        # read from the padded input exactly as the convolution does (any padding_mode)
        pad = []
        for p in reversed(padding):
            pad += [p, p]
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
        offsets = [o + p for o, p in zip(offsets, padding)]
    index = [slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offsets, out_size, conv.stride)]
    return x[(..., *index)]


class CenterDecoupledConv(nn.Module):
    """A convolution whose kernel center is held in a separate trainable 1×1 branch.

    Attributes:
        conv: the original convolution, with its center taps zeroed and all parameters frozen.
        center: the center taps, shape ``(out_channels, in_channels // groups)``, the only trainable tensor.

    Build it with :func:`decouple_center`, undo it with :func:`fold_center`.
    """

    def __init__(self, conv: _ConvNd) -> None:
        super().__init__()
        self.conv = conv
        index = center_slice(conv.kernel_size)
        with torch.no_grad():
            self.center = nn.Parameter(conv.weight[index].detach().clone())
            conv.weight[index] = 0
        conv.weight.requires_grad_(False)
        if conv.bias is not None:
            conv.bias.requires_grad_(False)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.conv.kernel_size

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        ndim = len(self.conv.kernel_size)
        x_center = center_input(self.conv, x, tuple(out.shape[-ndim:]))
        weight = self.center.reshape(*self.center.shape, *([1] * ndim))
        return out + _CONV_FN[ndim](x_center, weight, None, 1, 0, 1, self.conv.groups)

    def extra_repr(self) -> str:
        return f"center={tuple(self.center.shape)}"


def is_center_decoupled(module: nn.Module) -> bool:
    """True if ``module`` is a :class:`CenterDecoupledConv`."""
    return isinstance(module, CenterDecoupledConv)


def decouple_center(conv: nn.Module) -> CenterDecoupledConv:
    """Move the center taps of ``conv`` into a trainable 1×1 branch; the function is unchanged.

    Idempotent: an already decoupled module is returned as is.

    Raises:
        TypeError: if ``conv`` is not a Conv1d/Conv2d/Conv3d.
        ValueError: if its kernel has an even dimension.
    """
    if isinstance(conv, CenterDecoupledConv):
        return conv
    if not isinstance(conv, _CONV_TYPES) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
        raise TypeError(f"decouple_center needs an nn.Conv1d/Conv2d/Conv3d, got {type(conv).__name__}")
    center_index(conv.kernel_size)  # validates odd kernel
    return CenterDecoupledConv(conv)


def fold_center(module: nn.Module) -> nn.Module:
    """Merge the learned center back into the kernel and return the original convolution.

    The weight stays frozen as it was during decoupling (``requires_grad`` is restored by the caller that
    froze it). Idempotent: a module that is not decoupled is returned unchanged.
    """
    if not isinstance(module, CenterDecoupledConv):
        return module
    conv = module.conv
    with torch.no_grad():
        conv.weight[center_slice(conv.kernel_size)] += module.center.detach().to(conv.weight.dtype)
    return conv


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` (``""`` is not allowed: the root cannot be replaced)."""
    if not name:
        raise ValueError("the model itself cannot be replaced; pass a model that contains the convolution")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
