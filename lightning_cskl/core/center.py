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

from typing import Optional, Union

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


_POOL_FN = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _patch_sum(x: Tensor, patch: int) -> Tensor:
    """Sum over non-overlapping ``patch``-sized cells of the spatial dims (edge cells may be partial)."""
    ndim = x.dim() - 2
    pad: list[int] = []
    for n in reversed(x.shape[2:]):
        pad += [0, (-n) % patch]
    return _POOL_FN[ndim](F.pad(x, pad), patch, patch) * patch**ndim


def _patch_mean(x: Tensor, patch: int) -> Tensor:
    """Mean over the same cells as :func:`_patch_sum`, counting only the elements inside the input."""
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    return _patch_sum(x, patch) / _patch_sum(ones, patch)


def _patch_expand(x: Tensor, patch: int, size: tuple[int, ...]) -> Tensor:
    """Repeat each cell value over its patch and crop to ``size`` (inverse layout of :func:`_patch_mean`)."""
    for dim in range(2, x.dim()):
        x = x.repeat_interleave(patch, dim=dim)
    return x[(..., *[slice(0, n) for n in size])]


class _FilteredPointwise(torch.autograd.Function):
    """A 1×1 convolution whose backward uses gradient filtering (Yang et al., CVPR 2023).

    The forward is exact. In the backward the output gradient is replaced by its mean over each
    ``patch``-sized cell, so the weight gradient needs only the per-cell SUM of the input: that sum is all
    that is saved (``1/patch^d`` of the input), and the input gradient costs ``1/patch^d`` of the usual one.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, groups: int, patch: int) -> Tensor:
        ndim = x.dim() - 2
        out = _CONV_FN[ndim](x, weight.reshape(*weight.shape, *([1] * ndim)), None, 1, 0, 1, groups)
        ctx.groups, ctx.patch, ctx.size = groups, patch, tuple(x.shape[2:])
        ctx.save_for_backward(_patch_sum(x.detach(), patch), weight)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x_sum, weight = ctx.saved_tensors
        groups, patch = ctx.groups, ctx.patch
        # under autocast the saved input, the output gradient and the (fp32) weight differ in dtype, and the
        # backward runs outside autocast: compute in the widest of them (autograd casts each gradient back)
        dtype = torch.promote_types(torch.promote_types(grad_out.dtype, x_sum.dtype), weight.dtype)
        x_sum, weight = x_sum.to(dtype), weight.to(dtype)
        g = _patch_mean(grad_out.to(dtype), patch)
        n, d = g.shape[:2]
        c = x_sum.shape[1]
        g = g.reshape(n, groups, d // groups, -1)
        w = weight.reshape(groups, d // groups, c // groups)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.einsum("ngdl,ngcl->gdc", g, x_sum.reshape(n, groups, c // groups, -1)).reshape(weight.shape)
        if ctx.needs_input_grad[0]:
            cells = torch.einsum("gdc,ngdl->ngcl", w, g).reshape(n, c, *x_sum.shape[2:])
            grad_x = _patch_expand(cells, patch, ctx.size)
        return grad_x, grad_w, None, None


class CenterDecoupledConv(nn.Module):
    """A convolution whose kernel center is held in a separate trainable 1×1 branch.

    Attributes:
        conv: the original convolution, with its center taps zeroed and all parameters frozen.
        center: the center taps, shape ``(out_channels, in_channels // groups)``, the only trainable tensor.

        gradient_filter: ``None`` (exact backward) or a patch size ``r`` ≥ 2: the branch's backward uses
            gradient filtering, saving only the ``r``-cell sums of its input (about ``r^d``× less memory).

    Build it with :func:`decouple_center`, undo it with :func:`fold_center`.
    """

    def __init__(self, conv: _ConvNd, gradient_filter: Optional[int] = None) -> None:
        super().__init__()
        self.conv = conv
        self.gradient_filter = gradient_filter
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
        if self.gradient_filter and torch.is_grad_enabled() and self.center.requires_grad:
            batched = x_center if x_center.dim() == ndim + 2 else x_center.unsqueeze(0)
            branch = _FilteredPointwise.apply(batched, self.center, self.conv.groups, self.gradient_filter)
            return out + branch.reshape(out.shape)
        weight = self.center.reshape(*self.center.shape, *([1] * ndim))
        return out + _CONV_FN[ndim](x_center, weight, None, 1, 0, 1, self.conv.groups)

    def extra_repr(self) -> str:
        text = f"center={tuple(self.center.shape)}"
        return text + (f", gradient_filter={self.gradient_filter}" if self.gradient_filter else "")


def is_center_decoupled(module: nn.Module) -> bool:
    """True if ``module`` is a :class:`CenterDecoupledConv`."""
    return isinstance(module, CenterDecoupledConv)


def decouple_center(conv: nn.Module, gradient_filter: Optional[int] = None) -> CenterDecoupledConv:
    """Move the center taps of ``conv`` into a trainable 1×1 branch; the function is unchanged.

    Idempotent: an already decoupled module is returned as is (its ``gradient_filter`` is updated).

    Raises:
        TypeError: if ``conv`` is not a Conv1d/Conv2d/Conv3d.
        ValueError: if its kernel has an even dimension, or ``gradient_filter`` is not None or an int ≥ 2.
    """
    if gradient_filter is not None and (isinstance(gradient_filter, bool) or not isinstance(gradient_filter, int)
                                        or gradient_filter < 2):
        raise ValueError(f"gradient_filter={gradient_filter!r} is not allowed: use None or a patch size >= 2")
    if isinstance(conv, CenterDecoupledConv):
        conv.gradient_filter = gradient_filter
        return conv
    if not isinstance(conv, _CONV_TYPES) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
        raise TypeError(f"decouple_center needs an nn.Conv1d/Conv2d/Conv3d, got {type(conv).__name__}")
    center_index(conv.kernel_size)  # validates odd kernel
    return CenterDecoupledConv(conv, gradient_filter)


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
