"""Carry stored class statistics across a backbone update: fit how the current task's features moved, then move
the old classes' statistics the same way.

At the end of a task the features of its own data are known under the backbone before the update (``x``) and
after it (``y``), sample by sample. Old classes have no data left, but if the update acts on them as it acts on
the current data, their stored statistics can follow it:

- ``"affine"`` (default): ``y ≈ x A + b``, fitted in closed form by ridge regression held toward the identity,

      min_A,b  ‖Y − X A − 1 bᵀ‖² + λ ‖A − I‖²,

  with ``λ`` chosen on held-out current samples from a scale-free grid (``λ = r · tr(XcᵀXc)/F`` for each ratio
  ``r``); class means move as ``μ ← μ A + b`` and covariances as ``Σ ← Aᵀ Σ A + Σ_e``, where ``Σ_e`` is the
  covariance of the map's residuals ``y − x A − b`` on the current data: what the update does to a sample that
  no affine map of its old feature predicts still spreads every class (without it the carried covariances are
  too narrow, which cost a per-class-covariance head most of its room, BENCHMARKS.md). One map fitted on current
  data is the idea of learnable drift compensation (Gomez-Villa et al., ECCV 2024); here it is closed-form and
  also moves the covariance.
- ``"shift"``: the mean displacement ``b = mean(y − x)`` for every class, covariances kept.
- ``"sdc"``: semantic drift compensation (Yu et al., CVPR 2020): each class mean moves by the displacements of the
  current samples, weighted by ``exp(−‖x − μ‖² / 2σ²)`` (σ² the median squared distance), covariances kept.

Too little data for a map (fewer samples than features, one class only) falls back on the ridge prior, which
keeps ``A`` near the identity; fewer than two usable samples carry nothing. Each fallback is one warning line.
Imports torch only.

Example:
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> x = torch.randn(200, 3, dtype=torch.float64)
    >>> drift = fit_drift(x, x * 2 + 1)
    >>> [round(v, 2) for v in drift.apply_means(torch.zeros(1, 3, dtype=torch.float64))[0].tolist()]
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor

__all__ = ["CARRY_KINDS", "CarryKind", "DriftCarry", "DriftMap", "feature_distillation", "fit_drift", "validate_carry",
           "validate_distill_weight"]

log = logging.getLogger(__name__)

CarryKind = Literal["affine", "shift", "sdc"]
CARRY_KINDS = ("affine", "shift", "sdc")

#: ridge strengths tried, relative to the mean eigenvalue of the centered old features' scatter
RIDGE_RATIOS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: the prior's strength when there are too few samples to choose one on held-out data
PRIOR_RATIO = 1.0


def validate_carry(value: Optional[str]) -> Optional[str]:
    """Return ``value`` if it is None or one of :data:`CARRY_KINDS`, else raise a ValueError naming them."""
    if value is not None and value not in CARRY_KINDS:
        raise ValueError(f"carry={value!r} is not allowed: use None or one of {', '.join(map(repr, CARRY_KINDS))}")
    return value


@dataclass
class DriftMap:
    """How features moved: ``y = x A + b`` (``weight`` is ``A``, ``(F, F)``), or per-mean shifts for ``"sdc"``.

    Attributes:
        kind: the carry rule that produced it.
        weight: ``A`` (None: the identity).
        bias: ``b`` ``(F,)`` (affine and shift).
        noise: ``Σ_e`` ``(F, F)``, the residual covariance added to every carried covariance (affine; None: none).
        old, shifts: the current samples' old features and displacements (sdc only).
        ridge: the chosen ``λ`` relative to the features' scale (affine only).
        samples: samples the map was fitted on; ``dropped``: non-finite ones left out.
        residual: held-out mean squared error of the map relative to that of no map (affine; nan otherwise).
    """

    kind: str
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    noise: Optional[Tensor] = None
    old: Optional[Tensor] = None
    shifts: Optional[Tensor] = None
    ridge: float = float("nan")
    samples: int = 0
    dropped: int = 0
    residual: float = float("nan")

    def apply_means(self, means: Tensor) -> Tensor:
        """Class means ``(K, F)`` under the new backbone."""
        means = means.to(torch.float64)
        if self.kind == "sdc":
            distance = torch.cdist(means, self.old).pow(2)  # (K, N)
            sigma2 = distance.median().clamp_min(1e-12)
            weight = torch.exp(-distance / (2 * sigma2))
            weight = weight / weight.sum(1, keepdim=True).clamp_min(1e-300)
            return means + weight @ self.shifts
        out = means if self.weight is None else means @ self.weight
        return out + self.bias if self.bias is not None else out

    def apply_scatter(self, scatter: Tensor, counts: Optional[Tensor | float] = None) -> Tensor:
        """A within-class scatter ``(F, F)`` (or ``(K, F, F)``) of ``counts`` samples (a number, or ``(K,)``)
        under the new backbone: ``Aᵀ S A + n Σ_e``; without ``counts`` a covariance (``n = 1``)."""
        out = scatter
        if self.weight is not None:
            a = self.weight.to(scatter.dtype)
            out = a.T @ scatter @ a
        if self.noise is not None:
            n = torch.as_tensor(1.0 if counts is None else counts, dtype=scatter.dtype)
            n = n[:, None, None] if n.dim() else n
            out = out + n * self.noise.to(scatter.dtype)
        return out


def _residual_covariance(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    residual = y - x @ weight - bias
    residual = residual - residual.mean(0)
    return residual.T @ residual / max(len(x) - 1, 1)


def _ridge_fit(x: Tensor, y: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    gram = xc.T @ xc
    features = x.shape[1]
    lam = ratio * max(float(torch.trace(gram)) / features, 1e-12)
    eye = torch.eye(features, dtype=x.dtype)
    weight = torch.linalg.solve(gram + lam * eye, xc.T @ yc + lam * eye)
    return weight, mean_y - mean_x @ weight


def fit_drift(old: Tensor, new: Tensor, kind: CarryKind = "affine", labels: Optional[Tensor] = None,
              holdout: float = 0.2, seed: int = 0, task: str = "this task") -> Optional[DriftMap]:
    """Fit how features moved from ``old`` ``(N, F)`` to ``new`` ``(N, F)`` (the same samples, in order).

    Args:
        kind: ``"affine"``, ``"shift"`` or ``"sdc"`` (see the module docstring).
        labels: the samples' labels (only to notice a task of one class).
        holdout: fraction of the samples that chooses the ridge strength (affine).
        seed: of the held-out split.
        task: named in warnings.

    Returns:
        The map, or None (with a warning) when fewer than two samples with finite features remain.

    Raises:
        ValueError: ``old`` and ``new`` differ in shape, or ``kind`` is not allowed.
    """
    validate_carry(kind)
    if old.shape != new.shape or old.dim() != 2:
        raise ValueError(f"old features {tuple(old.shape)} and new features {tuple(new.shape)} must both be (N, F)")
    x, y = old.detach().to("cpu", torch.float64), new.detach().to("cpu", torch.float64)
    finite = torch.isfinite(x).all(1) & torch.isfinite(y).all(1)
    dropped = int((~finite).sum())
    x, y = x[finite], y[finite]
    if labels is not None:
        labels = labels.detach().cpu().reshape(-1)[finite]
    n, features = x.shape
    if dropped:
        log.warning("%s: %d of %d samples with non-finite features were left out of the drift map", task, dropped,
                    dropped + n)
    if n < 2:
        log.warning("%s: %d usable samples, too few to fit a drift map: the stored statistics are not carried", task, n)
        return None
    if kind == "shift":
        return DriftMap(kind, bias=(y - x).mean(0), samples=n, dropped=dropped)
    if kind == "sdc":
        return DriftMap(kind, old=x, shifts=y - x, samples=n, dropped=dropped)
    one_class = labels is not None and labels.unique().numel() < 2
    if n <= features or one_class or n * holdout < 2:
        why = "one class only" if one_class else f"{n} samples for {features} features"
        log.warning("%s: %s, the drift map is fitted with the ridge prior (λ ratio %g, held toward the identity)",
                    task, why, PRIOR_RATIO)
        weight, bias = _ridge_fit(x, y, PRIOR_RATIO)
        return DriftMap(kind, weight=weight, bias=bias, noise=_residual_covariance(x, y, weight, bias),
                        ridge=PRIOR_RATIO, samples=n, dropped=dropped)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(n * holdout)))
    test, train = order[:held], order[held:]
    baseline = float((y[test] - x[test]).pow(2).mean().clamp_min(1e-300))
    errors = []
    for ratio in RIDGE_RATIOS:
        weight, bias = _ridge_fit(x[train], y[train], ratio)
        error = float((y[test] - x[test] @ weight - bias).pow(2).mean())
        errors.append(error if math.isfinite(error) else float("inf"))
    best = RIDGE_RATIOS[min(range(len(errors)), key=errors.__getitem__)]
    weight, bias = _ridge_fit(x, y, best)
    return DriftMap(kind, weight=weight, bias=bias, noise=_residual_covariance(x, y, weight, bias), ridge=best,
                    samples=n, dropped=dropped, residual=min(errors) / baseline)


class DriftCarry:
    """Pairs of head-input features of one task's data, under the backbone before and after its update, and the
    carry of stored statistics that they define. Both doors use it in their end-of-task pass: each batch runs once
    as the model is and once inside :meth:`CenterKernelLearner.task_start_weights
    <lightning_cskl.core.learner.CenterKernelLearner.task_start_weights>`.

    Args:
        kind: the carry rule (:data:`CARRY_KINDS`).

    Example:
        >>> from lightning_cskl.core.head import StatisticsHead
        >>> head = StatisticsHead("ncm"); head.update(torch.zeros(2, 2), torch.tensor([0, 0]))
        >>> carry = DriftCarry("shift"); carry.add(torch.zeros(4, 2), torch.ones(4, 2), torch.tensor([1, 1, 2, 2]))
        >>> _ = carry.apply([head], task="task 1"); head.means.tolist()
        [[1.0, 1.0]]
    """

    def __init__(self, kind: CarryKind = "affine") -> None:
        self.kind = validate_carry(kind)
        self.last: Optional[DriftMap] = None
        self.seconds = 0.0  # wall time of every carry so far: the passes under the old backbone and the fits
        self.reset()

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Add the block's wall time to :attr:`seconds` (wrap the passes under the old backbone in it)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def reset(self) -> None:
        self._old: list[Tensor] = []
        self._new: list[Tensor] = []
        self._labels: list[Tensor] = []

    def __len__(self) -> int:
        return sum(len(t) for t in self._old)

    def timing(self, context: Callable[[], Any]) -> Callable[[], Any]:
        """``context`` (a context-manager factory such as the learner's ``task_start_weights``) with its blocks'
        wall time added to :attr:`seconds`."""
        @contextlib.contextmanager
        def wrapped() -> Iterator[Any]:
            with self.timed(), context() as value:
                yield value

        return wrapped

    def add(self, old: Tensor, new: Tensor, labels: Tensor) -> None:
        """One batch: features ``(N, F, ...)`` before and after the update (flattened), labels ``(N,)``."""
        self._old.append(old.detach().flatten(1).to("cpu", torch.float64))
        self._new.append(new.detach().flatten(1).to("cpu", torch.float64))
        self._labels.append(labels.detach().reshape(-1).cpu())

    def apply(self, targets: list, task: str = "this task") -> Optional[DriftMap]:
        """Fit the map on the pairs added since :meth:`reset` and call ``target.carry(map)`` on each target (a
        :class:`~lightning_cskl.core.head.StatisticsHead`, a :class:`~lightning_cskl.core.prototypes.PrototypeMemory`);
        then reset. Returns the map (also kept as :attr:`last`), or None if nothing could be carried."""
        start = time.perf_counter()
        pairs = _gather((self._old, self._new, self._labels))  # every process fits the same map on all shards
        self.reset()
        if not pairs[0]:
            log.warning("%s: no features were paired before and after the update: the stored statistics are not "
                        "carried", task)
            self.last = None
            return None
        old, new, labels = (torch.cat(part) for part in pairs)
        try:
            return self._apply(old, new, labels, targets, task)
        finally:
            self.seconds += time.perf_counter() - start

    def _apply(self, old: Tensor, new: Tensor, labels: Tensor, targets: list, task: str) -> Optional[DriftMap]:
        # each target is carried in the space its statistics live in (a power-transformed head's features)
        maps: dict[Any, Optional[DriftMap]] = {}
        drift = None
        for target in targets:
            transform = getattr(target, "transform", None)
            if transform not in maps:
                pair = (old, new) if transform is None else (transform(old), transform(new))
                maps[transform] = fit_drift(*pair, self.kind, labels, task=task)
            drift = maps[transform]
            if drift is not None:
                target.carry(drift)
        self.last = maps.get(None, drift)
        return self.last


def _gather(lists: tuple[list[Tensor], ...]) -> tuple[list[Tensor], ...]:
    """The lists of every process of torch.distributed, concatenated in rank order (as they are alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return lists
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, lists)
    return tuple([t for rank in gathered for t in rank[i]] for i in range(len(lists)))


def validate_distill_weight(value: float) -> float:
    """Return ``value`` as a float if it is a number >= 0, else raise a ValueError quoting it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"distill_weight={value!r} is not allowed: it must be a finite number >= 0 (0: off)")
    return float(value)


def feature_distillation(new: Tensor, old: Tensor) -> Tensor:
    """``mean_n ‖new_n − old_n‖²`` over a batch of features ``(N, F, ...)``; ``old`` is a constant.

    Example:
        >>> float(feature_distillation(torch.ones(2, 3), torch.zeros(2, 3)))
        3.0
    """
    return (new - old.detach().to(new.dtype)).flatten(1).pow(2).sum(1).mean()
