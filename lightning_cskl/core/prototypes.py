"""Prototype replay for class-incremental learning without exemplars (METHOD.md §4), in plain torch.

One mean feature (the input of the classifier head) is stored per old class. While a new task trains, the
head also sees prototypes drawn uniformly from the old classes, so it keeps separating them:

    loss = τ · [CE(f(x) / τ, y) + weight · CE(head(p) / τ, y_p)]

The bracket is the research code's objective. The factor τ does not change its minimizers, nor an Adam step
(which ignores the scale of the gradient), but it keeps the gradient of the tempered cross-entropy the size of
a plain one's: without it, SGD's step grows by 1/τ (10×) and a learning rate that is stable for plain training
(SGD 0.05, momentum 0.9) diverges. The features of old classes stay where the prototypes were measured because only the kernel centers move,
in directions the old tasks' center inputs do not use. Imports torch only.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .head import ClassMoments

__all__ = ["PrototypeMemory"]


class PrototypeMemory:
    """Class-mean features of the classes of finished tasks, and the replay loss drawn from them.

    Args:
        weight: factor of the prototype loss (10 in the research code), >= 0.
        temperature: τ that divides the logits of both loss terms, > 0.
        seed: seed of the per-task generator that draws prototypes (a task's draws do not depend on the
            global random state, so a resumed run draws the same prototypes).

    Example:
        >>> memory = PrototypeMemory()
        >>> memory.begin_collect(); memory.collect(torch.ones(4, 3), torch.tensor([0, 0, 1, 1])); memory.end_collect()
        >>> memory.classes.tolist(), memory.prototypes.shape
        ([0, 1], torch.Size([2, 3]))
        >>> head = nn.Linear(3, 4)
        >>> memory.begin_task(task_index=1)
        >>> float(memory.loss(head, batch_size=8).detach()) > 0
        True
    """

    def __init__(self, weight: float = 10.0, temperature: float = 0.1, seed: int = 0) -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"prototype_weight={weight!r} is not allowed: it must be a number >= 0")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is not allowed: it must be a number > 0")
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.classes = torch.zeros(0, dtype=torch.long)
        self.prototypes = torch.zeros(0, 0)
        self._moments = ClassMoments()
        self._generator: Optional[torch.Generator] = None

    def __len__(self) -> int:
        return int(self.classes.numel())

    # ------------------------------------------------------------------ collection at the end of a task
    def begin_collect(self) -> None:
        self._moments = ClassMoments()

    def collect(self, features: Tensor, labels: Tensor) -> None:
        """Accumulate the features of one batch (``(N, F)``, or ``(N, F, ...)`` flattened) by label; samples with
        non-finite features are left out (a NaN prototype would make every later replay loss NaN)."""
        self._moments.add(features, labels)

    def end_collect(self) -> None:
        """Store the class means collected since :meth:`begin_collect` (a class seen again is replaced)."""
        moments, self._moments = self._moments, ClassMoments()
        self.add_moments(moments)

    def add_moments(self, moments: ClassMoments) -> None:
        """Store the class means of ``moments`` (summed over processes by the caller where that applies)."""
        counts, sums = moments.counts, moments.sums
        if counts is None or not bool((counts > 0).any()):
            return
        stored = {int(c): p for c, p in zip(self.classes.tolist(), self.prototypes)}
        for label in (counts > 0).nonzero().squeeze(1).tolist():
            stored[label] = (sums[label] / counts[label]).to(torch.float32)
        order = sorted(stored)
        self.classes = torch.tensor(order, dtype=torch.long)
        self.prototypes = torch.stack([stored[c] for c in order])

    def carry(self, drift: Any) -> None:
        """Move the stored prototypes across a backbone update (a :class:`~lightning_cskl.core.drift.DriftMap`)."""
        if len(self):
            self.prototypes = drift.apply_means(self.prototypes).to(torch.float32)

    # ------------------------------------------------------------------ replay while a task trains
    def begin_task(self, task_index: int) -> None:
        self._generator = torch.Generator().manual_seed(self.seed + 1_000_003 * int(task_index))

    def scale(self, logits: Tensor) -> Tensor:
        return logits / self.temperature

    def task_loss(self, criterion: Any, logits: Tensor, target: Tensor) -> Tensor:
        """``τ · criterion(logits / τ, target)``: the task's own term of the replay objective."""
        return self.temperature * criterion(self.scale(logits), target)

    def loss(self, head: nn.Module, batch_size: int) -> Tensor:
        """``τ · weight · CE(head(p) / τ, y_p)`` for ``batch_size`` prototypes drawn uniformly from old classes."""
        if not len(self):
            raise RuntimeError("no prototypes stored yet: a task must end before prototypes can be replayed")
        if self._generator is None:
            self.begin_task(0)
        index = torch.randint(len(self), (batch_size,), generator=self._generator)
        reference = next(head.parameters())
        features = self.prototypes[index].to(device=reference.device, dtype=reference.dtype)
        labels = self.classes[index].to(reference.device)
        return self.temperature * self.weight * F.cross_entropy(self.scale(head(features)), labels)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"classes": self.classes.clone(), "prototypes": self.prototypes.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classes = state["classes"].to(torch.long)
        self.prototypes = state["prototypes"].to(torch.float32)
