"""Train the center taps of a convolution beside it, and fold them back, without touching the model's structure.

While a task trains, a :class:`CenterBranch` holds the center taps of one convolution's selected input channels as
its own parameter and zeroes those taps in the kernel; a forward hook adds ``conv_1x1(x'; W_c)`` to the
convolution's output, where ``x'`` holds exactly the input pixels the kernel's center reads, so the function is
unchanged. The module keeps its type, its parameters and their names, and its ``state_dict`` keys: the branch is
a plain attribute of the convolution, and its state-dict hooks write the centers into the emitted ``weight`` (and
take them from a loaded one), so a checkpoint written mid-task loads into the plain architecture. Only ``W_c``
needs a weight gradient: its size, its optimizer state and its weight-gradient FLOPs scale with the number of
selected channels, and when the convolution's input needs no gradient only those channels of the input are
saved for backward. :meth:`CenterBranch.fold` writes the centers back and removes every hook.

Example:
    >>> import torch
    >>> conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    >>> x = torch.randn(2, 4, 6, 6)
    >>> before = conv(x)
    >>> branch = CenterBranch(conv, channels=torch.tensor([0, 2]))
    >>> tuple(branch.param.shape), type(conv).__name__, sorted(conv.state_dict())
    ((8, 2), 'Conv2d', ['bias', 'weight'])
    >>> torch.allclose(conv(x), before, atol=1e-5) and torch.equal(conv.state_dict()["weight"][:, :, 1, 1][:, 0], branch.param[:, 0])
    True
    >>> _ = branch.fold(); torch.allclose(conv(x), before, atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CenterBranch", "ELEMENTS", "attached_branch", "center_index", "center_input", "center_slice", "is_eligible_conv",
           "validate_elements", "validate_gradient_filter"]

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


class _SelectedPointwise(torch.autograd.Function):
    """A 1×1 convolution over some input channels, whose backward saves only what it needs.

    ``channels`` (or None: all) are the input channels read, and ``groups`` the groups of the 1×1 convolution over
    them. ``rows`` (a depthwise convolution's selected channels) are the output channels the result fills; the
    others are zero. When the input needs no gradient, only the read channels are saved (``k/C`` of the input);
    when it does, the input itself is saved, which costs nothing more because the convolution beside the branch
    keeps it for its own input gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, channels: Optional[Tensor], groups: int, rows: Optional[Tensor],
                out_channels: int) -> Tensor:
        ndim = x.dim() - 2
        selected = x if channels is None else x.index_select(1, channels)
        out = _CONV_FN[ndim](selected, weight.reshape(*weight.shape, *([1] * ndim)), None, 1, 0, 1, groups)
        if rows is not None:
            out = out.new_zeros((out.shape[0], out_channels, *out.shape[2:])).index_copy_(1, rows, out)
        ctx.groups, ctx.channels, ctx.rows, ctx.in_channels = groups, channels, rows, x.shape[1]
        ctx.keeps_input = channels is not None and ctx.needs_input_grad[0]
        ctx.save_for_backward(x if ctx.keeps_input else selected, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved, weight = ctx.saved_tensors
        channels, groups = ctx.channels, ctx.groups
        selected = saved.index_select(1, channels) if ctx.keeps_input else saved
        if ctx.rows is not None:
            grad_out = grad_out.index_select(1, ctx.rows)
        # under autocast the saved input, the output gradient and the (fp32) weight may differ in dtype: compute in
        # the widest (autograd casts each gradient back to its input's dtype)
        dtype = torch.promote_types(torch.promote_types(grad_out.dtype, selected.dtype), weight.dtype)
        n, d = grad_out.shape[:2]
        k = selected.shape[1]
        g = grad_out.to(dtype).reshape(n, groups, d // groups, -1)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.einsum("ngdl,ngcl->gdc", g, selected.to(dtype).reshape(n, groups, k // groups, -1))
            grad_w = grad_w.reshape(weight.shape)
        if ctx.needs_input_grad[0]:
            w = weight.to(dtype).reshape(groups, d // groups, k // groups)
            cells = torch.einsum("gdc,ngdl->ngcl", w, g).reshape(n, k, *grad_out.shape[2:])
            if channels is None:
                grad_x = cells
            else:
                grad_x = cells.new_zeros((n, ctx.in_channels, *grad_out.shape[2:])).index_copy_(1, channels, cells)
        return grad_x, grad_w, None, None, None, None


_ATTRIBUTE = "_center_branch"


def validate_gradient_filter(value: Optional[int]) -> Optional[int]:
    """Return ``value`` if it is None or a patch size (int >= 2), else raise a ValueError quoting it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ValueError(f"gradient_filter={value!r} is not allowed: use None or a patch size >= 2")
    return value


#: which elements of a kernel train: the center tap (CsKO) or the whole kernel of the selected input channels
ELEMENTS = ("center", "kernel")


def validate_elements(value: str) -> str:
    """Return ``value`` if it is one of :data:`ELEMENTS`, else raise a ValueError naming them."""
    if value not in ELEMENTS:
        raise ValueError(f"elements={value!r} is not allowed: use 'center' (CsKO: the center tap of each kernel) or "
                         "'kernel' (the whole k×k kernel of the selected input channels)")
    return value


def attached_branch(conv: nn.Module) -> Optional["CenterBranch"]:
    """The :class:`CenterBranch` attached to ``conv``, or None."""
    return conv.__dict__.get(_ATTRIBUTE)


def _forward_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Optional[Tensor]:
    branch = attached_branch(module)
    if branch is None:
        return None
    return output + branch.contribution(args[0] if args else kwargs["input"], output)


def _state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # the emitted weight is a copy with the centers written in (also under keep_vars=True: the Parameter itself
    # holds zeros at those taps while a branch is attached)
    branch = attached_branch(module)
    key = prefix + "weight"
    if branch is not None and key in state_dict:
        weight = state_dict[key].detach().clone()
        branch._taps(weight).write(branch.param.detach())
        state_dict[key] = weight


def _load_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    branch = attached_branch(module)
    key = prefix + "weight"
    if branch is None or key not in state_dict or tuple(state_dict[key].shape) != tuple(module.weight.shape):
        return
    weight = state_dict[key].detach().clone()
    taps = branch._taps(weight)
    with torch.no_grad():
        branch.param.copy_(taps.read())  # copy_ converts device and dtype
    taps.zero()
    state_dict[key] = weight


class CenterBranch:
    """The center taps of one convolution, trained beside it while a task runs.

    Args:
        conv: an ``nn.Conv1d/2d/3d`` with an odd kernel (see :func:`is_eligible_conv`); its parameters are frozen
            by the caller, not here.
        channels: sorted indices of the input channels whose centers train (a convolution with ``groups == 1``,
            or a depthwise one, whose ``groups`` equal its input channels), or None for every channel.
        gradient_filter: None (exact backward) or a patch size ``r`` ≥ 2: the branch's backward uses gradient
            filtering and saves only the ``r``-cell sums of its input (about ``r^d``× less memory).
        elements: ``"center"`` (CsKO): the branch holds the center taps and adds a 1×1 convolution;
            ``"kernel"``: it holds the whole k×k kernels of the selected input channels and adds their convolution
            (same stride, padding and dilation); the rest of the kernel stays frozen either way.

    Attributes:
        param: the trained centers: ``(out_channels, len(channels))`` (``groups == 1``), ``(len(channels) ·
            out_channels / groups, 1)`` (depthwise), or the whole center ``(out_channels, in_channels // groups)``;
            with ``elements="kernel"`` the same shapes followed by the kernel size.

    Raises:
        TypeError: ``conv`` is not a Conv1d/2d/3d.
        ValueError: its kernel has an even dimension, a branch is already attached, ``channels`` is given for a
            grouped convolution or is not a set of its input channels, or ``gradient_filter`` is invalid.
    """

    def __init__(self, conv: nn.Module, channels: Optional[Tensor] = None, gradient_filter: Optional[int] = None,
                 elements: str = "center") -> None:
        if not isinstance(conv, _CONV_TYPES) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
            raise TypeError(f"a center branch needs an nn.Conv1d/Conv2d/Conv3d, got {type(conv).__name__}")
        center_index(conv.kernel_size)  # validates an odd kernel
        validate_gradient_filter(gradient_filter)
        validate_elements(elements)
        if elements == "kernel" and gradient_filter is not None:
            raise ValueError(f"gradient_filter={gradient_filter!r} is not allowed with elements='kernel': gradient "
                             "filtering is defined for the 1×1 center branch only; use gradient_filter=None")
        if attached_branch(conv) is not None:
            raise ValueError(f"{type(conv).__name__} already has a center branch: fold it first")
        if channels is not None:
            channels = torch.as_tensor(channels, dtype=torch.long).reshape(-1).to(conv.weight.device)
            valid = (channels.numel() > 0 and bool((channels[1:] > channels[:-1]).all())
                     and 0 <= int(channels[0]) and int(channels[-1]) < conv.in_channels)
            if conv.groups not in (1, conv.in_channels) or not valid:
                raise ValueError(f"channels={channels.tolist()} is not allowed for {type(conv).__name__}(in_channels="
                                 f"{conv.in_channels}, groups={conv.groups}): give distinct sorted input channels of a "
                                 "convolution with groups=1 or a depthwise one, or None for all")
        self.conv = conv
        self.channels = channels
        # a depthwise convolution's selected channels are whole groups: the rows of their output channels
        self.rows = None
        if channels is not None and conv.groups > 1:
            per_group = conv.out_channels // conv.groups
            self.rows = (channels[:, None] * per_group + torch.arange(per_group, device=channels.device)).reshape(-1)
        self.gradient_filter = gradient_filter
        self.elements = elements
        taps = self._taps(conv.weight)
        self.param = nn.Parameter(taps.read().clone())
        taps.zero()
        conv.__dict__[_ATTRIBUTE] = self
        # hooks are kept by (dict attribute, key), not by handle: a deep copy of the model then folds its own copy
        self._hooks = [self._key(conv, conv.register_forward_hook(_forward_hook, prepend=True, with_kwargs=True)),
                       self._key(conv, conv.register_state_dict_post_hook(_state_dict_hook)),
                       self._key(conv, conv.register_load_state_dict_pre_hook(_load_pre_hook))]

    @staticmethod
    def _key(conv: nn.Module, handle: Any) -> tuple[list[str], int]:
        dicts = [d() for d in (handle.hooks_dict_ref, *getattr(handle, "extra_dict_ref", ()))]
        return [name for name, value in vars(conv).items() if any(value is d for d in dicts)], handle.id

    def __setstate__(self, state: dict[str, Any]) -> None:
        # hooks are keyed by id; in a new process (torch.load of a pickled model) the id counter restarts, and a
        # later hook on this conv would take one of these keys: move the counter past them
        self.__dict__.update(state)
        from torch.utils.hooks import RemovableHandle

        RemovableHandle.next_id = max(RemovableHandle.next_id, max(key for _, key in self._hooks) + 1)

    def _taps(self, weight: Tensor) -> "_TapView":
        """The trained taps of a weight shaped like the convolution's: the centers, or whole kernels."""
        view = weight if self.elements == "kernel" else weight[center_slice(self.conv.kernel_size)]
        return _TapView(view, self.channels, self.rows)

    def contribution(self, x: Tensor, output: Tensor) -> Tensor:
        """What the trained centers add to the convolution's ``output`` for input ``x``."""
        conv, param = self.conv, self.param
        ndim = len(conv.kernel_size)
        if param.device != x.device:
            raise RuntimeError(f"the center branch of {type(conv).__name__} is on {param.device} but its input is on "
                               f"{x.device}: move the model before the task starts, not during it")
        unbatched = x.dim() == ndim + 1
        if unbatched:
            x, output = x.unsqueeze(0), output.unsqueeze(0)
        if self.elements == "kernel":
            out = self._kernel_contribution(x)
            return out.squeeze(0) if unbatched else out
        x_center = center_input(conv, x, tuple(output.shape[-ndim:]))
        groups = conv.groups if self.rows is None else len(self.channels)  # depthwise: one group per selected channel
        if self.gradient_filter and torch.is_grad_enabled() and param.requires_grad:
            selected = x_center if self.channels is None else x_center.index_select(1, self.channels)
            out = _FilteredPointwise.apply(selected, param, groups, self.gradient_filter)
            if self.rows is not None:
                out = out.new_zeros((out.shape[0], conv.out_channels, *out.shape[2:])).index_copy(1, self.rows, out)
        else:
            out = _SelectedPointwise.apply(x_center, param, self.channels, groups, self.rows, conv.out_channels)
        return out.squeeze(0) if unbatched else out

    def _kernel_contribution(self, x: Tensor) -> Tensor:
        """The trained whole kernels of the selected input channels, convolved as the convolution does (only the
        selected channels of the input are saved for the weight gradient)."""
        conv, param = self.conv, self.param
        ndim = len(conv.kernel_size)
        padding: Any = conv.padding
        if conv.padding_mode != "zeros":  # read the padded input exactly as the convolution does
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        selected = x if self.channels is None else x.index_select(1, self.channels)
        groups = conv.groups if self.rows is None else len(self.channels)
        out = _CONV_FN[ndim](selected, param, None, conv.stride, padding, conv.dilation, groups)
        if self.rows is not None:
            out = out.new_zeros((out.shape[0], conv.out_channels, *out.shape[2:])).index_copy(1, self.rows, out)
        return out

    def full_center(self) -> Tensor:
        """The convolution's whole center ``(out_channels, in_channels // groups)`` as it computes now."""
        weight = self.conv.weight.detach().clone()
        self._taps(weight).write(self.param.detach())
        return weight[center_slice(self.conv.kernel_size)].clone()

    def fold(self) -> nn.Module:
        """Write the trained centers back into the kernel, remove every hook; return the convolution."""
        conv = self.conv
        if attached_branch(conv) is self:
            self._taps(conv.weight).write(self.param.detach())
            for names, key in self._hooks:
                for name in names:
                    getattr(conv, name).pop(key, None)
            del conv.__dict__[_ATTRIBUTE]
        return conv


class _TapView:
    """Read and write, in place, the trained part of a center ``(D, C/g)`` (a view into a kernel): columns
    ``channels``, or, for a depthwise convolution, rows ``rows``."""

    def __init__(self, center: Tensor, channels: Optional[Tensor], rows: Optional[Tensor] = None) -> None:
        self.center = center
        self.dim = 1 if rows is None else 0
        index = channels if rows is None else rows
        self.channels = None if index is None else index.to(center.device)

    def read(self) -> Tensor:
        """The trained taps (detached; a copy unless every channel trains)."""
        if self.channels is None:
            return self.center.detach()
        return self.center.detach().index_select(self.dim, self.channels)

    def write(self, values: Tensor) -> None:
        """Set the trained taps to ``values`` (converted to the center's device and dtype)."""
        values = values.to(self.center.device, self.center.dtype)
        with torch.no_grad():
            if self.channels is None:
                self.center.copy_(values)
            else:
                self.center.index_copy_(self.dim, self.channels, values)

    def zero(self) -> None:
        with torch.no_grad():
            if self.channels is None:
                self.center.zero_()
            else:
                self.center.index_fill_(self.dim, self.channels, 0)
