"""A classifier made of feature statistics: streaming class means and one shared covariance (LDA), or class
means alone (nearest class mean). Forward passes only; no gradient, no optimizer.

For features ``z`` of the classifier head's input, the LDA rule (Hayes & Kanan, "Lifelong Machine Learning with
Deep Streaming Linear Discriminant Analysis", CVPRW 2020) scores class ``c`` with

    s_c(z) = μ_cᵀ P z − ½ μ_cᵀ P μ_c,    P = ((1 − ε) Σ + ε I)⁻¹

where ``μ_c`` is the mean feature of class ``c`` and ``Σ`` the within-class covariance pooled over every class
seen (shrinkage ``ε``). Nearest class mean is the same rule with ``P = I``. Batches are merged exactly (the
pairwise update of Chan et al.), so the statistics do not depend on batch size or order. The state is one mean
and one count per class plus one F×F matrix: constant in the number of tasks apart from the class means.

Imports torch only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from .drift import DriftMap

__all__ = ["ClassMoments", "DEFAULT_STATISTICS_RULE", "STATISTICS_RULES", "StatisticsHead", "StatisticsRule",
           "UNSEEN_CLASS_SCORE"]

StatisticsRule = Literal["lda", "ncm", "qda"]
STATISTICS_RULES = ("lda", "ncm", "qda")

log = logging.getLogger(__name__)

#: the rule a front door's ``statistics_head="auto"`` gives a model with one classifier head
DEFAULT_STATISTICS_RULE = "qda"

#: α of the "qda" rule: each class's covariance is (1 − α) its own + α the pooled one
QDA_SHRINKAGE = 0.5
#: ridge of the "qda" rule's covariances, relative to the pooled covariance's mean eigenvalue
QDA_RIDGE = 1e-4

#: score given to classes without statistics (finite, so that softmax and cross-entropy stay finite)
UNSEEN_CLASS_SCORE = -1e9


class ClassMoments:
    """Sums of a stream of labelled features: per class the count and the feature sum, and ``Σ z zᵀ`` over all.
    Sums add across batches and processes, so statistics collected on data shards can be merged exactly.

    Example:
        >>> moments = ClassMoments()
        >>> moments.add(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([2, 2]))
        >>> moments.counts.tolist(), moments.sums[2].tolist()
        ([0.0, 0.0, 2.0], [4.0, 0.0])
    """

    def __init__(self, transform: Optional[Callable[[Tensor], Tensor]] = None, per_class: bool = False) -> None:
        self.transform = transform  # applied to every batch's (float64) features before they are summed
        self.per_class = per_class
        self.counts: Optional[Tensor] = None  # (K,), float64
        self.sums: Optional[Tensor] = None  # (K, F)
        self.outer: Optional[Tensor] = None  # (F, F)
        self.class_outer: Optional[Tensor] = None  # (K, F, F), with per_class only

    def add(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch (``(N, F)`` or ``(N, F, ...)`` features, ``(N,)`` integer labels ≥ 0); samples with
        non-finite features are left out.

        Raises:
            ValueError: shapes disagree, or the feature size differs from earlier batches.
        """
        z = features.detach().flatten(1).to(device="cpu", dtype=torch.float64)
        if self.transform is not None:
            z = self.transform(z)
        y = labels.detach().to("cpu", torch.long).reshape(-1)
        if z.shape[0] != y.shape[0]:
            raise ValueError(f"features hold {z.shape[0]} samples and labels {y.shape[0]}: they must match")
        if self.sums is not None and z.shape[1] != self.sums.shape[1]:
            raise ValueError(f"features have size {z.shape[1]}, earlier batches had {self.sums.shape[1]}")
        finite = torch.isfinite(z).all(1)
        if not bool(finite.all()):
            log.warning("%d of %d samples with non-finite features were left out of the class statistics",
                        int((~finite).sum()), len(finite))
            z, y = z[finite], y[finite]
        if not z.shape[0]:
            return
        self._grow(int(y.max()) + 1, z.shape[1])
        self.counts.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
        self.sums.index_add_(0, y, z)
        self.outer += z.T @ z
        if self.per_class:  # one (F, F) product per class present: an (N, F, F) stack would not fit for wide F
            for c in y.unique().tolist():
                zc = z[y == c]
                self.class_outer[c] += zc.T @ zc

    def _grow(self, classes: int, features: int) -> None:
        if self.sums is None:
            self.counts = torch.zeros(0, dtype=torch.float64)
            self.sums = torch.zeros(0, features, dtype=torch.float64)
            self.outer = torch.zeros(features, features, dtype=torch.float64)
            if self.per_class:
                self.class_outer = torch.zeros(0, features, features, dtype=torch.float64)
        if classes > len(self.counts):
            extra = classes - len(self.counts)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
            self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.sums.shape[1])])
            if self.per_class:
                self.class_outer = torch.cat([self.class_outer, self.class_outer.new_zeros(extra, features, features)])

    def all_reduce_(self, features: int) -> "ClassMoments":
        """Sum these moments over the processes of torch.distributed (a no-op in a single process); ``features``
        is the feature size, for processes that saw no sample. Returns ``self``."""
        from .covariance import all_reduce_max_, all_reduce_sum_

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self
        # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        classes = torch.tensor([len(self.counts) if self.counts is not None else 0], dtype=torch.float64)
        self._grow(int(all_reduce_max_(classes.to(device)).item()), features)
        self.counts, self.sums, self.outer = (all_reduce_sum_(t.to(device)).cpu()
                                              for t in (self.counts, self.sums, self.outer))
        if self.per_class:
            self.class_outer = all_reduce_sum_(self.class_outer.to(device)).cpu()
        return self


class StatisticsHead:
    """Streaming class statistics and the classifier they define.

    Args:
        rule: ``"lda"`` (class means + shared covariance with shrinkage), ``"ncm"`` (class means only) or
            ``"qda"`` (per-class means and covariances, shrunk toward the pooled one, scored by the Gaussian
            log-likelihood: regularized discriminant analysis; the per-class covariances are FeCAM's idea, Goswami
            et al. NeurIPS 2023, which scores by Mahalanobis distance alone).
        shrinkage: ε of the LDA rule, in [0, 1] (default 1e-4, as Avalanche's StreamingLDA); for ``"qda"`` α,
            the weight of the pooled covariance in each class's, in [0, 1] (default :data:`QDA_SHRINKAGE`).
        power: β of a power transform ``max(z, 0)^β`` of the features before any statistic (FeCAM's Tukey
            transform), in (0, 1]; 1 (default): none.

    Example:
        >>> head = StatisticsHead("lda")
        >>> z = torch.tensor([[0.0, 0.0], [0.2, 0.0], [4.0, 4.0], [4.2, 4.0]])
        >>> head.update(z, torch.tensor([0, 0, 2, 2]))
        >>> head.classes.tolist(), head.logits(torch.tensor([[3.9, 4.1]]), num_classes=3).argmax(1).tolist()
        ([0, 2], [2])
    """

    def __init__(self, rule: StatisticsRule = "lda", shrinkage: Optional[float] = None, power: float = 1.0) -> None:
        if rule not in STATISTICS_RULES:
            allowed = ", ".join(map(repr, STATISTICS_RULES))
            raise ValueError(f"statistics_head={rule!r} is not allowed: use one of {allowed}")
        if shrinkage is None:
            shrinkage = QDA_SHRINKAGE if rule == "qda" else 1e-4
        if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage={shrinkage!r} is not allowed for statistics_head={rule!r}: it must be a "
                             "number in [0, 1]")
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0.0 < power <= 1.0:
            raise ValueError(f"power={power!r} is not allowed: it must be a number in (0, 1]")
        self.rule = rule
        self.shrinkage = float(shrinkage)
        self.power = float(power)
        self.classes = torch.zeros(0, dtype=torch.long)
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.means = torch.zeros(0, 0, dtype=torch.float64)
        self.scatter = torch.zeros(0, 0, dtype=torch.float64)  # within-class sum of squares, all classes
        self.class_scatter = torch.zeros(0, 0, 0, dtype=torch.float64)  # per class (qda only)
        self._weights: Optional[tuple[Tensor, Tensor]] = None
        self._precisions: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.classes.numel())

    @property
    def features(self) -> int:
        return int(self.means.shape[1]) if len(self) else 0

    # ------------------------------------------------------------------ statistics
    @property
    def transform(self) -> Optional[Callable[[Tensor], Tensor]]:
        """What the statistics are taken of: None (the features themselves), or with ``power`` < 1 the power
        transform of their non-negative part (:meth:`power_features`)."""
        return self.power_features if self.power != 1.0 else None

    def power_features(self, features: Tensor) -> Tensor:
        """``max(z, 0)^β`` (Tukey's ladder, β = ``power``, as FeCAM uses it: Goswami et al., NeurIPS 2023), which
        brings post-ReLU features closer to Gaussian."""
        return features.flatten(1).clamp_min(0).pow(self.power)

    def moments(self) -> ClassMoments:
        """An empty :class:`ClassMoments` that collects what this head needs (transformed features; per-class
        outer products for ``"qda"``), for :meth:`add_moments`."""
        return ClassMoments(self.transform, per_class=self.rule == "qda")

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch: ``features`` ``(N, F)`` (or ``(N, F, ...)``, flattened) with integer ``labels`` ``(N,)``.
        Samples with non-finite features are left out (a NaN would spoil the statistics for good).

        Raises:
            ValueError: shapes disagree, or the feature size differs from earlier batches.
        """
        moments = self.moments()
        moments.add(features, labels)
        self.add_moments(moments)

    def add_moments(self, moments: "ClassMoments") -> None:
        """Merge the statistics of many batches at once (e.g. summed across processes with
        :meth:`ClassMoments.all_reduce_`): exactly what :meth:`update` with all of them would give.

        Raises:
            ValueError: the feature size differs from earlier batches.
        """
        if moments.counts is None or not bool((moments.counts > 0).any()):
            return
        features = moments.sums.shape[1]
        if len(self) and features != self.features:
            raise ValueError(f"features have size {features}, the statistics were built with {self.features}")
        per_class = self.rule == "qda"
        if per_class and moments.class_outer is None:
            raise ValueError("statistics_head='qda' needs per-class moments: collect them with head.moments()")
        if not len(self):
            self.means = torch.zeros(0, features, dtype=torch.float64)
            self.scatter = torch.zeros(features, features, dtype=torch.float64)
            self.class_scatter = torch.zeros(0, features, features, dtype=torch.float64)
        present = (moments.counts > 0).nonzero().squeeze(1)
        counts, sums = moments.counts[present], moments.sums[present]
        # within-class scatter of the new samples: Σ z zᵀ − Σ_c s_c s_cᵀ / n_c
        self.scatter += moments.outer - (sums.T / counts) @ sums
        for label, n_b, total in zip(present.tolist(), counts.tolist(), sums):
            mean_b = total / n_b
            own = moments.class_outer[label] - torch.outer(total, total) / n_b if per_class else None
            index = (self.classes == label).nonzero()
            if len(index):
                i = int(index[0, 0])
                n_a, mean_a = float(self.counts[i]), self.means[i]
                delta = mean_b - mean_a
                between = (n_a * n_b / (n_a + n_b)) * torch.outer(delta, delta)
                self.scatter += between
                if per_class:
                    self.class_scatter[i] += own + between
                self.means[i] = mean_a + delta * (n_b / (n_a + n_b))
                self.counts[i] = n_a + n_b
            else:
                order = torch.searchsorted(self.classes, torch.tensor(label))
                self.classes = torch.cat([self.classes[:order], torch.tensor([label]), self.classes[order:]])
                self.counts = torch.cat([self.counts[:order], torch.tensor([n_b], dtype=torch.float64),
                                         self.counts[order:]])
                self.means = torch.cat([self.means[:order], mean_b[None], self.means[order:]])
                if per_class:
                    self.class_scatter = torch.cat([self.class_scatter[:order], own[None],
                                                    self.class_scatter[order:]])
        self._weights = self._precisions = None

    def carry(self, drift: "DriftMap") -> None:
        """Move the stored statistics across a backbone update (:func:`~lightning_cskl.core.drift.fit_drift`):
        class means ``μ ← μ A + b``, each scatter of ``n`` samples ``S ← Aᵀ S A + n Σ_e``. Call it before the new
        task's statistics are merged.

        Example:
            >>> from lightning_cskl.core.drift import DriftMap
            >>> head = StatisticsHead("ncm"); head.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
            >>> head.carry(DriftMap("shift", bias=torch.tensor([0.0, 2.0], dtype=torch.float64)))
            >>> head.means.tolist()
            [[1.0, 2.0]]
        """
        if not len(self):
            return
        self.means = drift.apply_means(self.means)
        self.scatter = drift.apply_scatter(self.scatter, self.counts.sum())
        if self.rule == "qda":
            self.class_scatter = drift.apply_scatter(self.class_scatter, self.counts)
        self._weights = self._precisions = None

    def covariance(self) -> Tensor:
        """The within-class covariance pooled over all classes (``F×F``, float64)."""
        total = float(self.counts.sum()) if len(self) else 0.0
        return self.scatter / max(total, 1.0)

    def _linear(self) -> tuple[Tensor, Tensor]:
        """``(W, b)`` with scores ``z Wᵀ + b`` for the stored classes (cached until the next update)."""
        if self._weights is None:
            if self.rule == "lda":
                eye = torch.eye(self.features, dtype=torch.float64)
                shrunk = (1.0 - self.shrinkage) * self.covariance() + self.shrinkage * eye
                weight = torch.linalg.solve(shrunk, self.means.T).T  # P μ_c for every class, P symmetric
            else:
                weight = self.means.clone()
            bias = -0.5 * (weight * self.means).sum(1)
            self._weights = (weight, bias)
        return self._weights

    def scores(self, features: Tensor) -> Tensor:
        """Differentiable scores ``(N, len(self))`` of the stored classes (in :attr:`classes` order) for ``features``
        ``(N, F)``: the statistics are constants, the gradient flows into ``features`` (to train a network
        against this classifier).

        Example:
            >>> head = StatisticsHead("ncm")
            >>> head.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
            >>> z = torch.tensor([[0.5, 0.0]], requires_grad=True)
            >>> head.scores(z).sum().backward(); z.grad.tolist()
            [[1.0, 1.0]]
        """
        if not len(self):
            raise RuntimeError("the statistics head has seen no data yet: call update() first")
        if self.rule == "qda":
            return self._qda_scores(features)
        weight, bias = self._linear()
        z = features.flatten(1)
        return z @ weight.to(z.device, z.dtype).T + bias.to(z.device, z.dtype)

    def class_covariances(self) -> Tensor:
        """Per-class covariances ``(K, F, F)`` of the ``"qda"`` rule, shrunk toward the pooled one (regularized
        discriminant analysis, Friedman 1989): ``(1 − α) Σ_c + α Σ + ε·tr(Σ)/F·I`` with α = ``shrinkage`` and
        ε = :data:`QDA_RIDGE`."""
        pooled = self.covariance()
        cov = self.class_scatter / self.counts.clamp_min(1.0)[:, None, None]
        f = pooled.shape[0]
        ridge = QDA_RIDGE * float(torch.trace(pooled)) / max(f, 1) + 1e-12
        eye = torch.eye(f, dtype=cov.dtype)
        return (1.0 - self.shrinkage) * cov + self.shrinkage * pooled + ridge * eye

    def _qda_scores(self, features: Tensor) -> Tensor:
        """``−½ (z − μ_c)ᵀ Σ_c⁻¹ (z − μ_c) − ½ log det Σ_c``: the Gaussian log-likelihood, up to a constant. The
        log-determinant matters: a Mahalanobis distance alone (as FeCAM scores) favours the classes whose
        covariance is broad; on our frozen SmallCNN features it cost 10 points against LDA (BENCHMARKS.md)."""
        if self._precisions is None:
            cov = self.class_covariances()
            self._precisions = (torch.linalg.inv(cov), torch.logdet(cov))
        precision, logdet = self._precisions
        z = features.flatten(1)
        if self.transform is not None:
            z = self.transform(z)
        diff = z[:, None, :] - self.means.to(z.device, z.dtype)[None]  # (N, K, F)
        quad = torch.einsum("nkf,kfg,nkg->nk", diff, precision.to(z.device, z.dtype), diff)
        return -0.5 * quad - 0.5 * logdet.to(z.device, z.dtype)[None]

    def logits(self, features: Tensor, num_classes: Optional[int] = None) -> Tensor:
        """Scores ``(N, num_classes)`` for ``features`` ``(N, F)``; classes without statistics score
        :data:`UNSEEN_CLASS_SCORE`. ``num_classes`` defaults to the largest stored label + 1.

        Raises:
            RuntimeError: no statistics yet.
        """
        if not len(self):
            raise RuntimeError("the statistics head has seen no data yet: call update() first")
        width = int(self.classes.max()) + 1 if num_classes is None else int(num_classes)
        z = features.detach().flatten(1)
        scores = self.scores(z.to(torch.float64))
        out = torch.full((z.shape[0], width), UNSEEN_CLASS_SCORE, dtype=torch.float64, device=z.device)
        known = self.classes < width
        out[:, self.classes[known].to(z.device)] = scores[:, known.to(z.device)]
        return out.to(features.dtype if features.is_floating_point() else torch.float32)

    # ------------------------------------------------------------------ as a module's output
    def attach(self, head: nn.Module) -> RemovableHandle:
        """Make ``head`` answer with these statistics in eval mode (its trained output in train mode).

        A forward hook replaces the output of ``head`` (width kept) by :meth:`logits` of its input whenever
        ``head.training`` is False and statistics exist; remove the returned handle to undo it. The model keeps
        its modules, parameters and ``state_dict``.

        Example:
            >>> head, stats = nn.Linear(2, 3), StatisticsHead("ncm")
            >>> stats.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
            >>> handle = stats.attach(head.eval())
            >>> head(torch.tensor([[0.9, 0.1]])).argmax(1).tolist()
            [0]
            >>> handle.remove()
        """
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            if module.training or not len(self) or not isinstance(output, Tensor) or output.dim() != 2:
                return None
            return self.logits(inputs[0], num_classes=output.shape[1]).to(output.dtype)

        return head.register_forward_hook(hook)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
        return {"rule": self.rule, "shrinkage": self.shrinkage, "power": self.power, "classes": self.classes.clone(),
                "counts": self.counts.clone(), "means": self.means.clone(), "scatter": self.scatter.clone(),
                "class_scatter": self.class_scatter.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rule", self.rule) != self.rule:
            raise ValueError(f"the checkpoint's statistics head uses rule {state['rule']!r}, this one {self.rule!r}")
        self.classes = state["classes"].to(torch.long)
        self.counts = state["counts"].to(torch.float64)
        self.means = state["means"].to(torch.float64)
        self.scatter = state["scatter"].to(torch.float64)
        self.class_scatter = state.get("class_scatter", torch.zeros(0, 0, 0)).to(torch.float64)
        self._weights = self._precisions = None
