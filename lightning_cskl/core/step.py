"""Optimizer steps that stay where they are allowed to go, whatever the optimizer (momentum, Adam, weight decay).

A projected *gradient* does not give a projected *step* under a stateful optimizer, so the step itself is
rewritten: the optimizer's own step hooks snapshot the constrained tensors before each step and replace each by
``rewrite(name, before, after)`` after it. A step that the optimizer or an AMP scaler skips changes nothing, and
an optimizer that computes its gradients inside ``step`` (a closure, as Lightning does) is handled, because the
snapshot is taken in the pre-hook, before the closure runs. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = ["ConstrainedStep", "StepHandle"]


class StepHandle:
    """The hooks :meth:`ConstrainedStep.attach` registered on one optimizer; :meth:`remove` removes them."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ConstrainedStep:
    """Rewrite every optimizer step of some tensors.

    Args:
        tensors: returns the constrained tensors by name (called at every step, so it may follow rebinding).
        rewrite: ``(name, before, after) -> value``: what the tensor holds after the step (``before`` is the
            snapshot, ``after`` what the optimizer wrote).
        active: whether steps are rewritten now (default: always).
        on_done: called after every completed step, rewritten or not.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> keep_first = ConstrainedStep(lambda: {"w": w}, lambda name, before, after: torch.cat([before[:1], after[1:]]))
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> handle = keep_first.attach(opt)
        >>> w.grad = torch.ones(3); opt.step(); w.tolist()
        [0.0, -1.0, -1.0]
        >>> handle.remove()
    """

    def __init__(self, tensors: Callable[[], Mapping[str, Tensor]], rewrite: Callable[[str, Tensor, Tensor], Tensor],
                 active: Callable[[], bool] = lambda: True, on_done: Callable[[], None] = lambda: None) -> None:
        self.tensors = tensors
        self.rewrite = rewrite
        self.active = active
        self.on_done = on_done
        # name -> (tensor, its value before the step): the tensors are those of the pre-hook, even if ``tensors()``
        # returns others by the time the step ends
        self._snapshots: dict[str, tuple[Tensor, Tensor]] = {}

    def attach(self, optimizer: torch.optim.Optimizer) -> StepHandle:
        """Hook ``optimizer.step``; remove the returned handle to stop."""
        return StepHandle(optimizer.register_step_pre_hook(self._before),
                          optimizer.register_step_post_hook(self._after))

    def clear(self) -> None:
        """Forget a snapshot taken before a step that never completed (an exception inside ``step``)."""
        self._snapshots = {}

    def _before(self, *_: Any) -> None:
        if self.active():
            self._snapshots = {name: (tensor, tensor.detach().clone()) for name, tensor in self.tensors().items()}

    def _after(self, *_: Any) -> None:
        with torch.no_grad():
            for name, (tensor, before) in self._snapshots.items():
                tensor.copy_(self.rewrite(name, before, tensor.detach()))
        self._snapshots = {}
        self.on_done()
