"""Measurement helpers for the scaling tables: cost against width, projection state against tasks.

Nothing here is the method: CsKO is driven through :class:`~lightning_cskl.core.CenterKernelLearner`, GPM /
Adam-NSCL through a full-kernel projection object with the interface of
:class:`~lightning_cskl.experiments.baselines.FullKernelProjectionPlugin` (passed in, so that this module
imports neither Avalanche nor the benchmark scripts), and every per-step cost through
:func:`~lightning_cskl.core.accounting.measure_step`.

Three kinds of projection state are counted, each exactly as its owner holds it:

* CsKO: :meth:`CenterKernelLearner.projection_state_bytes` (per trained layer a ``C/g × C/g`` float32
  covariance summed over tasks, a ``C`` boolean channel mask and, while a task trains, ``C/g × r`` float32
  free bases).
* GPM as implemented here: the plugin's ``projection_state_bytes()`` (per layer a ``(C/g·k²)²`` float32
  covariance summed over tasks and, while a task trains, ``C/g·k² × r`` float32 free bases).
* GPM as published (Saha et al., ICLR 2021): :class:`PublishedGpmMemory`, the basis ``M`` of the old tasks'
  representation space, grown after every task by the residual's top singular vectors until an energy
  threshold is met, stored as float32 (``C/g·k² × rank``); while a task trains the published code also holds
  the dense projector ``M Mᵀ`` (``(C/g·k²)²`` float32).

Example:
    >>> tasks = synthetic_tasks(2, (1, 6, 6), batch_size=4, n_batches=1)
    >>> len(tasks), tasks[0][0][0].shape
    (2, torch.Size([4, 1, 6, 6]))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..core import CenterKernelLearner
from ..core.accounting import StepCost, make_train_step, measure_step
from ..core.batchnorm import FrozenBatchNorm

__all__ = [
    "PublishedGpmMemory",
    "TaskState",
    "adam",
    "csko_state_over_tasks",
    "full_finetune_setup",
    "full_kernel_setup",
    "full_kernel_state_over_tasks",
    "measure_setups",
    "synthetic_tasks",
]

Batch = tuple[Tensor, Tensor]
#: a method's training setup: (model, optimizer, learner or None); the learner has ``before_update()`` and
#: may have ``projection_state_bytes()`` (see :func:`~lightning_cskl.core.accounting.measure_step`)
Setup = tuple[nn.Module, torch.optim.Optimizer, Any]


def adam(params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """The method's optimizer (METHOD.md §4): Adam, lr 1e-4, weight decay 5e-4."""
    return torch.optim.Adam(list(params), lr=1e-4, weight_decay=5e-4)


def synthetic_tasks(
    n_tasks: int,
    input_shape: tuple[int, ...],
    batch_size: int = 32,
    n_batches: int = 4,
    rank: int = 4,
    noise: float = 0.1,
    num_classes: int = 10,
    seed: int = 0,
) -> list[list[Batch]]:
    """``n_tasks`` synthetic tasks, each its own input distribution: ``x = μ_t + Σ_i z_i B_{t,i} + noise·ε``
    with a per-task mean image ``μ_t``, ``rank`` per-task random directions ``B_{t,i}`` and standard normal
    ``z``, ``ε``; labels uniform over ``num_classes``. Task ``t``'s representations therefore occupy new
    directions that earlier tasks did not, which is what makes GPM's basis grow.

    Returns:
        ``tasks[t]`` is a list of ``n_batches`` ``(inputs, targets)`` batches.
    """
    generator = torch.Generator().manual_seed(seed)
    dim = 1
    for size in input_shape:
        dim *= size
    tasks = []
    for _ in range(n_tasks):
        mean = torch.randn(dim, generator=generator) * 0.5
        directions = torch.randn(rank, dim, generator=generator)
        batches = []
        for _ in range(n_batches):
            z = torch.randn(batch_size, rank, generator=generator)
            x = mean + z @ directions + noise * torch.randn(batch_size, dim, generator=generator)
            y = torch.randint(0, num_classes, (batch_size,), generator=generator)
            batches.append((x.reshape(batch_size, *input_shape), y))
        tasks.append(batches)
    return tasks


# ------------------------------------------------------------------------------------------ per-step costs
def full_finetune_setup(base: nn.Module) -> Setup:
    """A copy of ``base`` in training mode, every parameter trained by Adam."""
    model = copy.deepcopy(base).train()
    return model, adam(list(model.parameters())), None


def _freeze_batchnorm(model: nn.Module) -> None:
    FrozenBatchNorm().freeze(model)  # for the model's lifetime (a copy made for one measurement)


def full_kernel_setup(base: nn.Module, plugin: Any, record_batches: Sequence[Tensor]) -> Setup:
    """A copy of ``base`` trained as the full-kernel projection baseline in its steady state.

    ``plugin`` is a :class:`~lightning_cskl.experiments.baselines.FullKernelProjectionPlugin` (or anything with
    its ``trainable``, ``recorders``, ``end_experience``, ``begin_experience``, ``experiences_seen`` and
    ``projection_state_bytes``). The inputs of ``record_batches`` stand for an old task: their full-kernel
    covariance is recorded (the plugin's own end-of-experience path), then the next experience begins with
    the plugin's free bases and optimizer hooks, as Avalanche would drive it. Only the plugin's trainable
    parameters (the layers' whole kernels and the head) require a gradient; BatchNorm stays frozen.

    Returns:
        ``(model, optimizer, learner)`` where ``learner.projection_state_bytes`` is the plugin's.
    """
    model = copy.deepcopy(base)
    _record_full_kernel(model, plugin, record_batches)
    model.train()
    _freeze_batchnorm(model)
    optimizer = _begin_full_kernel_experience(model, plugin)
    learner = SimpleNamespace(before_update=lambda: None, projection_state_bytes=plugin.projection_state_bytes)
    return model, optimizer, learner


def _record_full_kernel(model: nn.Module, plugin: Any, inputs: Sequence[Tensor]) -> dict[str, Tensor]:
    """One eval-mode pass through the plugin's recorders, then its end of experience; returns this task's
    mean patch covariances (before they are added to the plugin's sum)."""
    recorders = plugin.recorders(model)
    was_training = model.training
    model.eval()
    try:
        for recorder in recorders:
            with recorder.hooked(), torch.no_grad():
                for x in inputs:
                    model(x)
    finally:
        model.train(was_training)
    task_covariances = {}
    for recorder in recorders:
        task_covariances.update(recorder.covariances())
    plugin.end_experience(SimpleNamespace(model=model))
    plugin.experiences_seen += 1
    return task_covariances


def _begin_full_kernel_experience(model: nn.Module, plugin: Any) -> torch.optim.Optimizer:
    keep = set(plugin.trainable(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    optimizer = adam([p for p in model.parameters() if p.requires_grad])
    plugin.begin_experience(SimpleNamespace(model=model, optimizer=optimizer))
    return optimizer


def measure_setups(setups: Mapping[str, Callable[[], Setup]], batch: Batch) -> dict[str, StepCost]:
    """Per-step cost (bytes and FLOPs, no timing) of each method, built by its setup function when measured
    (one model in memory at a time)."""
    costs = {}
    for name, setup in setups.items():
        model, optimizer, learner = setup()
        costs[name] = measure_step(
            model, optimizer, nn.functional.cross_entropy, batch, learner, time_steps=False
        )
        del model, optimizer, learner
    return costs


# ------------------------------------------------------------------------------------- state over tasks
@dataclass
class TaskState:
    """Projection state after ``tasks`` tasks have ended.

    Attributes:
        tasks: number of ``end_task`` / end-of-experience calls so far.
        between_bytes: what is kept between tasks (after the ``tasks``-th task ended).
        during_bytes: what is held while the next task trains (free bases built from the state above).
        free_dims: free-subspace dimension per layer while the next task trains.
        published_bytes: GPM as published: bytes of the basis ``M`` (float32) after the ``tasks``-th task.
        published_ranks: columns of ``M`` per layer (summed over groups).
        published_during_bytes: ``M`` plus the dense projector ``M Mᵀ`` the published code builds per task.
    """

    tasks: int
    between_bytes: int
    during_bytes: Optional[int]
    free_dims: dict[str, int] = field(default_factory=dict)
    published_bytes: Optional[int] = None
    published_ranks: dict[str, int] = field(default_factory=dict)
    published_during_bytes: Optional[int] = None


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[Batch], learner: Any,
                 steps: int) -> None:
    for i in range(steps):
        make_train_step(model, optimizer, nn.functional.cross_entropy, batches[i % len(batches)], learner)()


def csko_state_over_tasks(
    model: nn.Module, tasks: Sequence[Sequence[Batch]], train_steps: int = 2, **options: Any
) -> list[TaskState]:
    """Run CsKO + DCES over ``tasks`` (each: ``begin_task``, ``score_batches`` DCES steps, ``train_steps``
    projected steps, ``end_task`` on the task's inputs, folded) and record its projection state.

    ``options`` go to :class:`~lightning_cskl.core.CenterKernelConfig` (default here: ``first_task="center"``,
    ``score_batches=2``; everything else the engine's defaults). ``model`` is trained in place.

    Returns:
        One :class:`TaskState` per task: ``between_bytes`` right after its ``end_task``; ``during_bytes`` and
        ``free_dims`` once the following task has finished its DCES scoring (bases built), None / empty for
        the last task.
    """
    options = {"first_task": "center", "score_batches": 2, **options}
    learner = CenterKernelLearner(**options)
    states: list[TaskState] = []
    for t, batches in enumerate(tasks):
        learner.bind(model)
        learner.begin_task()
        model.train()
        optimizer = adam(learner.trainable_parameters())
        handle = learner.attach_optimizer(optimizer)
        _train_steps(model, optimizer, batches, learner, learner.config.score_batches)  # DCES scoring
        if states:
            states[-1].during_bytes = learner.projection_state_bytes()
            states[-1].free_dims = dict(learner.free_dims)
        _train_steps(model, optimizer, batches, learner, train_steps)
        handle.remove()
        learner.end_task(lambda: [model(x) for x, _ in batches])
        states.append(TaskState(t + 1, learner.projection_state_bytes(), None))
    return states


class PublishedGpmMemory:
    """GPM's memory as published (Saha, Garg, Roy, "Gradient Projection Memory for Continual Learning",
    ICLR 2021, Algorithm 1 / §4): per layer an orthonormal basis ``M`` of the old tasks' representations.

    After task ``t`` with representation matrix ``R`` (here given as its mean outer product ``Σ = R Rᵀ / N``,
    which has the same singular directions and the same energy ratios): the residual ``R̂ = R − M Mᵀ R`` is
    decomposed and its top directions are added to ``M`` until the energy ``‖M Mᵀ R‖² + Σ_{i<k} σ̂_i²``
    reaches ``ε_t ‖R‖²``. ``M`` grows with every task whose representations leave its span, up to the
    layer's input dimension. Grouped layers keep one basis per group.

    Example:
        >>> memory = PublishedGpmMemory()
        >>> memory.update({"conv": torch.diag(torch.tensor([4.0, 1.0, 0.0])).unsqueeze(0)}, energy=0.75)
        >>> memory.ranks(), memory.nbytes()             # one direction holds 80% of the energy; 3 × 1 float32
        ({'conv': 1}, 12)
    """

    def __init__(self) -> None:
        self.bases: dict[str, list[Tensor]] = {}

    def update(self, task_covariances: Mapping[str, Tensor], energy: float) -> None:
        """Grow the bases with one task's mean covariances ``(groups, m, m)`` at threshold ``energy``."""
        for name, cov in task_covariances.items():
            groups = self.bases.setdefault(name, [cov.new_zeros(cov.shape[1], 0, dtype=torch.float64)] * cov.shape[0])
            self.bases[name] = [self._grow(basis, c.to(torch.float64), energy) for basis, c in zip(groups, cov)]

    @staticmethod
    def _grow(basis: Tensor, cov: Tensor, energy: float) -> Tensor:
        total = torch.trace(cov)
        if total <= 0:
            return basis
        residual_projector = torch.eye(cov.shape[0], dtype=cov.dtype) - basis @ basis.T
        residual = residual_projector @ cov @ residual_projector
        values, vectors = torch.linalg.eigh((residual + residual.T) / 2)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        accumulated = (total - values.sum()) / total  # energy already inside span(M)
        k = 0
        while k < len(values) and accumulated < energy:
            accumulated += values[k] / total
            k += 1
        grown = torch.cat([basis, vectors[:, :k]], dim=1)
        return grown[:, : cov.shape[0]]

    def ranks(self) -> dict[str, int]:
        """Columns of ``M`` per layer, summed over groups."""
        return {name: sum(b.shape[1] for b in bases) for name, bases in self.bases.items()}

    def nbytes(self, element_size: int = 4) -> int:
        """Bytes of the bases stored as float32 (GPM keeps them as float32 arrays)."""
        return sum(b.numel() for bases in self.bases.values() for b in bases) * element_size

    def projector_nbytes(self, element_size: int = 4) -> int:
        """Bytes of the dense free_bases ``M Mᵀ`` (``m × m`` per group) the published code builds for a task."""
        return sum(b.shape[0] ** 2 for bases in self.bases.values() for b in bases) * element_size


def full_kernel_state_over_tasks(
    model: nn.Module, tasks: Sequence[Sequence[Batch]], plugin: Any, train_steps: int = 2,
    energy: Callable[[int], float] = lambda t: min(1.0, 0.97 + 0.003 * t),
) -> list[TaskState]:
    """Run the full-kernel projection baseline over ``tasks`` and record its projection state after each.

    Task 0 is the base session (``plugin.experiences_seen == 0``: not trained here, only recorded); every
    later task begins an experience (free bases, optimizer hooks), trains the plugin's parameters for
    ``train_steps`` projected steps and is recorded. Each task's mean patch covariance also feeds a
    :class:`PublishedGpmMemory` at threshold ``energy(t)`` (GPM's schedule for ResNet-18, ``0.97 + 0.003·t``,
    t counted from 0): the published basis sizes for the same representations.

    Returns:
        One :class:`TaskState` per task: ``between_bytes`` after its end of experience (the plugin's
        ``projection_state_bytes()``), ``during_bytes`` / ``free_dims`` after the following task's
        ``begin_experience`` (None / empty for the last task), and the published memory's sizes.
    """
    published = PublishedGpmMemory()
    states: list[TaskState] = []
    model.train()
    _freeze_batchnorm(model)
    for t, batches in enumerate(tasks):
        if t > 0:
            optimizer = _begin_full_kernel_experience(model, plugin)
            states[-1].during_bytes = plugin.projection_state_bytes()
            states[-1].free_dims = plugin.free_dims()
            _train_steps(model, optimizer, batches, None, train_steps)
        task_covariances = _record_full_kernel(model, plugin, [x for x, _ in batches])
        published.update(task_covariances, energy(t))
        states.append(TaskState(
            t + 1, plugin.projection_state_bytes(), None, {}, published.nbytes(), published.ranks(),
            published.nbytes() + published.projector_nbytes(),
        ))
    for p in model.parameters():
        p.requires_grad_(True)
    return states
