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
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ClassMoments", "StatisticsHead", "StatisticsRule", "UNSEEN_CLASS_SCORE"]

StatisticsRule = Literal["lda", "ncm"]

log = logging.getLogger(__name__)

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

    def __init__(self) -> None:
        self.counts: Optional[Tensor] = None  # (K,), float64
        self.sums: Optional[Tensor] = None  # (K, F)
        self.outer: Optional[Tensor] = None  # (F, F)

    def add(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch (``(N, F)`` or ``(N, F, ...)`` features, ``(N,)`` integer labels ≥ 0); samples with
        non-finite features are left out.

        Raises:
            ValueError: shapes disagree, or the feature size differs from earlier batches.
        """
        z = features.detach().flatten(1).to(device="cpu", dtype=torch.float64)
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

    def _grow(self, classes: int, features: int) -> None:
        if self.sums is None:
            self.counts = torch.zeros(0, dtype=torch.float64)
            self.sums = torch.zeros(0, features, dtype=torch.float64)
            self.outer = torch.zeros(features, features, dtype=torch.float64)
        if classes > len(self.counts):
            extra = classes - len(self.counts)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
            self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.sums.shape[1])])

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
        return self


class StatisticsHead:
    """Streaming class statistics and the classifier they define.

    Args:
        rule: ``"lda"`` (class means + shared covariance with shrinkage) or ``"ncm"`` (class means only).
        shrinkage: ε of the LDA rule, in [0, 1] (Avalanche's StreamingLDA uses 1e-4).

    Example:
        >>> head = StatisticsHead("lda")
        >>> z = torch.tensor([[0.0, 0.0], [0.2, 0.0], [4.0, 4.0], [4.2, 4.0]])
        >>> head.update(z, torch.tensor([0, 0, 2, 2]))
        >>> head.classes.tolist(), head.logits(torch.tensor([[3.9, 4.1]]), num_classes=3).argmax(1).tolist()
        ([0, 2], [2])
    """

    def __init__(self, rule: StatisticsRule = "lda", shrinkage: float = 1e-4) -> None:
        if rule not in ("lda", "ncm"):
            raise ValueError(f"statistics_head={rule!r} is not allowed: use 'lda' or 'ncm'")
        if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage={shrinkage!r} is not allowed: it must be a number in [0, 1]")
        self.rule = rule
        self.shrinkage = float(shrinkage)
        self.classes = torch.zeros(0, dtype=torch.long)
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.means = torch.zeros(0, 0, dtype=torch.float64)
        self.scatter = torch.zeros(0, 0, dtype=torch.float64)  # within-class sum of squares, all classes
        self._weights: Optional[tuple[Tensor, Tensor]] = None

    def __len__(self) -> int:
        return int(self.classes.numel())

    @property
    def features(self) -> int:
        return int(self.means.shape[1]) if len(self) else 0

    # ------------------------------------------------------------------ statistics
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch: ``features`` ``(N, F)`` (or ``(N, F, ...)``, flattened) with integer ``labels`` ``(N,)``.
        Samples with non-finite features are left out (a NaN would spoil the statistics for good).

        Raises:
            ValueError: shapes disagree, or the feature size differs from earlier batches.
        """
        moments = ClassMoments()
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
        if not len(self):
            self.means = torch.zeros(0, features, dtype=torch.float64)
            self.scatter = torch.zeros(features, features, dtype=torch.float64)
        present = (moments.counts > 0).nonzero().squeeze(1)
        counts, sums = moments.counts[present], moments.sums[present]
        # within-class scatter of the new samples: Σ z zᵀ − Σ_c s_c s_cᵀ / n_c
        self.scatter += moments.outer - (sums.T / counts) @ sums
        for label, n_b, total in zip(present.tolist(), counts.tolist(), sums):
            mean_b = total / n_b
            index = (self.classes == label).nonzero()
            if len(index):
                i = int(index[0, 0])
                n_a, mean_a = float(self.counts[i]), self.means[i]
                delta = mean_b - mean_a
                self.scatter += (n_a * n_b / (n_a + n_b)) * torch.outer(delta, delta)
                self.means[i] = mean_a + delta * (n_b / (n_a + n_b))
                self.counts[i] = n_a + n_b
            else:
                order = torch.searchsorted(self.classes, torch.tensor(label))
                self.classes = torch.cat([self.classes[:order], torch.tensor([label]), self.classes[order:]])
                self.counts = torch.cat([self.counts[:order], torch.tensor([n_b], dtype=torch.float64),
                                         self.counts[order:]])
                self.means = torch.cat([self.means[:order], mean_b[None], self.means[order:]])
        self._weights = None

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
        weight, bias = self._linear()
        z = features.flatten(1)
        return z @ weight.to(z.device, z.dtype).T + bias.to(z.device, z.dtype)

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
        return {"rule": self.rule, "shrinkage": self.shrinkage, "classes": self.classes.clone(),
                "counts": self.counts.clone(), "means": self.means.clone(), "scatter": self.scatter.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rule", self.rule) != self.rule:
            raise ValueError(f"the checkpoint's statistics head uses rule {state['rule']!r}, this one {self.rule!r}")
        self.classes = state["classes"].to(torch.long)
        self.counts = state["counts"].to(torch.float64)
        self.means = state["means"].to(torch.float64)
        self.scatter = state["scatter"].to(torch.float64)
        self._weights = None
