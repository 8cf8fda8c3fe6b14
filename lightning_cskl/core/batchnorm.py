"""Frozen BatchNorm: running statistics as constants while a task trains, whatever ``model.train()`` says.

Frameworks call ``model.train()`` every epoch, so the mode flag cannot keep statistics frozen; and eval-mode
``F.batch_norm`` saves its input for backward, while ``x * scale + shift`` with constant ``scale`` saves only
``scale``. :class:`FrozenBatchNorm` gives every BatchNorm of a model that behaviour until released. The modules
keep their type and parameters (the frozen forward is an instance attribute), so hooks, names and checkpoints
see the model as it was built. CsKO and every baseline use it, so that their saved-activation columns compare
methods, not BatchNorm implementations. Imports torch only.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)).train()
    >>> frozen = FrozenBatchNorm()
    >>> frozen.freeze(net)
    >>> _ = net(torch.randn(4, 1, 3, 3)); net[1].num_batches_tracked.item()   # statistics do not move
    0
    >>> frozen.release(); type(net[1]).__name__, "forward" in vars(net[1])
    ('BatchNorm2d', False)
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

__all__ = ["FrozenBatchNorm", "frozen_batchnorm_forward"]


def frozen_batchnorm_forward(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Eval-mode BatchNorm as a constant per-channel affine map (its weight and bias may still train)."""
    affine = [p for p in (module.weight, module.bias) if p is not None]
    with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in affine)):
        scale = torch.rsqrt(module.running_var + module.eps)
        shift = -module.running_mean * scale
        if module.weight is not None:
            scale = scale * module.weight
            shift = shift * module.weight + module.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.to(x.dtype).reshape(shape) + shift.to(x.dtype).reshape(shape)


class FrozenBatchNorm:
    """Freeze the BatchNorms of models until :meth:`release` (idempotent; a BatchNorm without running statistics
    is left as it is)."""

    def __init__(self) -> None:
        self._modules: list[nn.Module] = []

    def __len__(self) -> int:
        return len(self._modules)

    def freeze(self, model: nn.Module) -> None:
        for module in model.modules():
            if (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None
                    and all(module is not m for m in self._modules)):
                # an instance attribute shadows the class's forward; deleting it restores the class's
                module.forward = functools.partial(frozen_batchnorm_forward, module)
                self._modules.append(module)

    def release(self) -> None:
        for module in self._modules:
            module.__dict__.pop("forward", None)
        self._modules = []
