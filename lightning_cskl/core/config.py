"""The engine's configuration: every option of the method, validated once at construction."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional, Union

from .center import validate_elements, validate_gradient_filter
from .drift import CarryKind, DriftCarry, validate_carry, validate_distill_weight
from .head import DEFAULT_STATISTICS_RULE, StatisticsHead, StatisticsRule
from .projection import ProjectionCriterion
from .prototypes import PrototypeMemory
from .selection import SelectionCriterion, validate_channel_ratio

__all__ = ["CenterKernelConfig", "HeadConfig", "LayerSpec", "publish_options", "split_options"]

LayerSpec = Union[Literal["auto", "all"], str, list[str]]


def _check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: use one of {', '.join(repr(a) for a in allowed)}")


@dataclass
class CenterKernelConfig:
    """Options of Center-Sensitive Kernel Optimization with Dynamic Channel Element Selection.

    Args:
        layers: which convolutions train their center. ``"auto"`` (default): the deepest eighth (rounded
            down, at least two) of the odd k×k convolutions (k > 1, depthwise included) in registration order, since the
            center carries the most knowledge in deeper layers; 1×1 convolutions only if there is no k×k one;
            ``"all"``: every odd-kernel convolution, grouped and
            depthwise included; a list of qualified module names; or a regular expression matched in full
            against qualified names. A 1×1 convolution is all center: its whole weight trains in place. On
            depthwise-separable nets "auto" picks depthwise convolutions (one center scale per channel); on
            MobileNetV2 their centers never moved (their null space holds only dead channels) and training the
            1×1 convolutions of the same blocks instead was no more accurate (BENCHMARKS.md).
        channel_ratio: fraction of input channels per layer whose center weights may change in a task, (0, 1].
        selection: how channels are chosen: ``"gradient"`` (DCES), ``"magnitude"`` or ``"random"``.
        score_batches: optimizer steps at the start of a task that only accumulate DCES scores (their
            updates are skipped, so no weight moves before the selection is made).
        projection_criterion: free subspace rule: ``"null_space"`` (λ ≤ θ·λ_min), ``"energy"`` (protect ε energy),
            ``"relative"`` (λ ≤ ``relative_threshold``·λ_max) or ``"scaled"`` (SGP: every direction, its update
            scaled down by its old-task importance; see :mod:`lightning_cskl.core.projection`).
        null_space_factor: θ of the null-space rule (> 0).
        null_space_reference: ``"selected"`` (default, the research code's rule): λ_min of ``Σ[S, S]``;
            ``"layer"``: λ_min of the layer's whole covariance, stricter (a principal submatrix's eigenvalues
            never fall below it), which can leave no free direction at all.
        energy: ε of the energy rule for the first incremental task, in [0, 1].
        energy_step: added to ε per further task (GPM uses 0.003); ε is capped at 1.
        relative_threshold: of the ``"relative"`` rule, in (0, 1].
        importance_scale: α ≥ 1 of the ``"scaled"`` rule (1: importance λ/λ_max; larger protects more).
        project: False disables the null-space projection (channel masking only): the ablation
            "center-only without projection".
        mode: ``"decouple"`` holds each conv's trained centers in a 1×1 center branch beside it (cheap: only the
            branch has a weight gradient); ``"mask"`` keeps the model as it is and masks the full weight's
            update to the center (the whole weight is a trainable tensor; same trajectory under plain SGD).
        first_task: ``"full"``: the first task trains all parameters (the base session) and its
            representations are recorded at its end; ``"center"``: every task, the first included, trains
            only centers (use :meth:`CenterKernelLearner.record` to protect a pretrained model's knowledge).
        train_also: modules trained fully besides the centers during incremental tasks: ``"auto"`` (the
            classifier head: the last child module with parameters that holds no trained convolution, see
            :func:`~lightning_cskl.core.learner.resolve_train_also`), a list of qualified names or a regex, or None.
        gradient_filter: None (exact) or a patch size r ≥ 2: the decoupled branches back-propagate with
            gradient filtering (output gradient averaged over r×r cells), which saves only the r×r sums of their
            inputs, about r²× less activation memory for the trained layers; the forward stays exact. 1×1
            convolutions trained in place and mask mode are not filtered.
        elements: which elements of each selected input channel's kernel train: ``"center"`` (CsKO, the paper's
            method: the center tap, a 1×1 branch) or ``"kernel"`` (the whole k×k kernel of the DCES-selected input
            channels, in a k×k branch beside the convolution). Selection, masking, slicing and cost accounting are
            the same; the projection acts on the input-channel axis of every tap (the center inputs' covariance
            stands for every tap's), and ``gradient_filter`` is refused.
        freeze_batchnorm: keep every BatchNorm in eval mode with frozen statistics during incremental tasks.
        seed: seed of the ``"random"`` selection.

    Example:
        >>> CenterKernelConfig(channel_ratio=0.5).channel_ratio
        0.5
        >>> CenterKernelConfig(channel_ratio=0)
        Traceback (most recent call last):
        ...
        ValueError: channel_ratio=0 is not allowed: it must be a number in (0, 1]
    """

    layers: LayerSpec = "auto"
    channel_ratio: float = 0.75
    selection: SelectionCriterion = "gradient"
    score_batches: int = 8
    projection_criterion: ProjectionCriterion = "null_space"
    null_space_factor: float = 5.0
    null_space_reference: Literal["layer", "selected"] = "selected"
    energy: float = 0.97
    energy_step: float = 0.003
    relative_threshold: float = 1e-2
    importance_scale: float = 10.0
    project: bool = True
    mode: Literal["decouple", "mask"] = "decouple"
    first_task: Literal["full", "center"] = "full"
    train_also: Union[str, list[str], None] = "auto"
    gradient_filter: Optional[int] = None
    elements: Literal["center", "kernel"] = "center"
    freeze_batchnorm: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.channel_ratio = validate_channel_ratio(self.channel_ratio)
        _check_choice("selection", self.selection, ("gradient", "magnitude", "random"))
        _check_choice("projection_criterion", self.projection_criterion, ("null_space", "energy", "relative", "scaled"))
        _check_choice("null_space_reference", self.null_space_reference, ("layer", "selected"))
        _check_choice("mode", self.mode, ("decouple", "mask"))
        _check_choice("first_task", self.first_task, ("full", "center"))
        if not isinstance(self.score_batches, int) or self.score_batches < 1:
            raise ValueError(f"score_batches={self.score_batches!r} is not allowed: it must be an int >= 1")
        if not 0.0 < self.relative_threshold <= 1.0:
            raise ValueError(f"relative_threshold={self.relative_threshold!r} is not allowed: it must lie in (0, 1]")
        if not self.importance_scale >= 1.0:
            raise ValueError(f"importance_scale={self.importance_scale!r} is not allowed: it must be >= 1")
        if not self.null_space_factor > 0:
            raise ValueError(f"null_space_factor={self.null_space_factor!r} is not allowed: it must be > 0")
        for name in ("energy", "energy_step"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} is not allowed: it must lie in [0, 1]")
        validate_gradient_filter(self.gradient_filter)
        validate_elements(self.elements)
        if self.elements == "kernel" and self.gradient_filter is not None:
            raise ValueError(f"gradient_filter={self.gradient_filter!r} is not allowed with elements='kernel': use "
                             "gradient_filter=None (filtering is defined for the 1×1 center branch only)")
        if self.elements == "kernel" and self.mode != "decouple":
            raise ValueError(f"elements='kernel' needs mode='decouple', got mode={self.mode!r}")
        if isinstance(self.layers, (list, tuple)):
            if not self.layers or not all(isinstance(n, str) for n in self.layers):
                raise ValueError(f"layers={self.layers!r} is not allowed: a list must hold at least one module name")
            self.layers = list(self.layers)
        elif not isinstance(self.layers, str):
            raise ValueError(
                f"layers={self.layers!r} is not allowed: use 'auto', 'all', a list of module names or a regex"
            )

    def as_dict(self) -> dict:
        """Plain-value copy, safe for checkpoints and loggers."""
        return asdict(self)


@dataclass
class HeadConfig:
    """The classifier-side options of both front doors (:class:`~lightning_cskl.avalanche.CSKLStrategy`,
    :class:`~lightning_cskl.avalanche.CSKLPlugin`, :class:`~lightning_cskl.CenterKernelCallback`) and of ``cskl run``'s
    ``strategy:`` section, written once; each door publishes them as keyword parameters of its own.

    Args:
        statistics_head: ``"lda"``, ``"ncm"`` or ``"qda"``: at the end of every task the head's input features of the
            task's data update class statistics (:class:`~lightning_cskl.core.head.StatisticsHead`), and in eval mode
            the head answers with their scores instead of its trained output; None: the trained head; ``"auto"``
            (default): ``"qda"`` (per-class Gaussian statistics) for a model with one classifier head (class- and
            domain-incremental), None for task-incremental models.
        shrinkage: ε of the ``"lda"`` statistics head, α of the ``"qda"`` one (None: 1e-4 and 0.5).
        head: qualified name of the classifier head (its input is the feature that statistics and prototypes
            store); ``"auto"``: the door's choice (the last Avalanche classifier or ``nn.Linear``).
        record_batches: batches of each task's data read at its end for the covariance, statistics and prototypes
            (None: all).
        prototype_replay: replay one mean feature per old class through the head in later tasks (METHOD.md §4):
            ``"auto"`` (Avalanche door: on for single-head models, off for multi-task ones), True or False.
        prototype_weight: weight of the prototype loss (10).
        temperature: τ dividing the logits while prototypes are replayed (0.1).
        carry: carry the stored class statistics and prototypes across each task's backbone update
            (:mod:`lightning_cskl.core.drift`): at the task's end its data runs once more through the backbone as it
            was before the task, a map from old to new features is fitted on those pairs, and the stored statistics
            move through it before the task's own are merged: ``"affine"``, ``"shift"``, ``"sdc"``, or None (they
            stay as measured).
        distill_weight: weight of a feature-distillation term on the task's own data, ``weight · mean_n ‖f(x_n) −
            f₀(x_n)‖²`` on the head's input, ``f₀`` the backbone before the task (one extra forward pass per step,
            without gradient); 0 (default): off.

    Example:
        >>> HeadConfig(carry="affine").carry
        'affine'
        >>> HeadConfig(record_batches=0)
        Traceback (most recent call last):
        ...
        ValueError: record_batches=0 is not allowed: use None or an int >= 1
    """

    statistics_head: Union[Literal["auto"], StatisticsRule, None] = "auto"
    shrinkage: Optional[float] = None
    head: str = "auto"
    record_batches: Optional[int] = None
    prototype_replay: Union[Literal["auto"], bool] = "auto"
    prototype_weight: float = 10.0
    temperature: float = 0.1
    carry: Optional[CarryKind] = None
    distill_weight: float = 0.0

    def __post_init__(self) -> None:
        # the statistics head and the prototype memory check their own numbers when a door builds them
        if not isinstance(self.head, str):
            raise ValueError(f"head={self.head!r} is not allowed: use 'auto' or a qualified module name")
        if self.record_batches is not None and (
            isinstance(self.record_batches, bool) or not isinstance(self.record_batches, int) or self.record_batches < 1
        ):
            raise ValueError(f"record_batches={self.record_batches!r} is not allowed: use None or an int >= 1")
        if self.prototype_replay not in ("auto", True, False):
            raise ValueError(f"prototype_replay={self.prototype_replay!r} is not allowed: use 'auto', True or False")
        validate_carry(self.carry)
        self.distill_weight = validate_distill_weight(self.distill_weight)

    def as_dict(self) -> dict:
        """Plain-value copy, safe for checkpoints and loggers."""
        return asdict(self)

    def statistics(self) -> Optional[StatisticsHead]:
        """The statistics head these options ask for, or None (``"auto"``:
        :data:`~lightning_cskl.core.head.DEFAULT_STATISTICS_RULE`; a door that finds a multi-task model drops it)."""
        rule = DEFAULT_STATISTICS_RULE if self.statistics_head == "auto" else self.statistics_head
        return StatisticsHead(rule, self.shrinkage) if rule is not None else None

    def drift(self) -> Optional[DriftCarry]:
        """The carry of stored statistics these options ask for, or None."""
        return DriftCarry(self.carry) if self.carry is not None else None

    def prototypes(self, seed: int = 0) -> PrototypeMemory:
        """The prototype memory (its replay is on only where ``prototype_replay`` says)."""
        return PrototypeMemory(self.prototype_weight, self.temperature, seed=seed)


def publish_options(*configs: type, defaults: Optional[Mapping[str, Any]] = None) -> Callable[[Callable], Callable]:
    """Decorate an ``__init__(self, ..., **options)`` so that its signature also lists every field of the
    dataclasses ``configs`` as a keyword-only parameter (with its type and default; ``defaults`` overrides some
    defaults for this door). Avalanche checks keyword names against the signature, and jsonargparse (LightningCLI,
    ``cskl``) and IDEs read it, so each option is written once, in its dataclass. Parameters the function names
    itself are kept (e.g. Avalanche's ``criterion``, the loss, beside the engine's ``projection_criterion``).

    Example:
        >>> @publish_options(HeadConfig, defaults={"prototype_replay": False})
        ... def init(self, *, log_stats: bool = True, **options): ...
        >>> inspect.signature(init).parameters["prototype_replay"].default
        False
    """
    defaults = dict(defaults or {})

    def decorate(init: Callable) -> Callable:
        signature = inspect.signature(init)
        params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in params}
        for config in configs:
            hints = typing.get_type_hints(config)  # real types, not strings, for CLI parsers
            for field in dataclasses.fields(config):
                if field.name in taken:
                    continue
                taken.add(field.name)
                params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY,
                                                default=defaults.get(field.name, field.default),
                                                annotation=hints.get(field.name, inspect.Parameter.empty)))
        init.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return init

    return decorate


def split_options(options: Mapping[str, Any], config: type,
                  defaults: Optional[Mapping[str, Any]] = None) -> tuple[Any, dict[str, Any]]:
    """``config(**the fields of config in options, others from defaults)`` and the options left over.

    Example:
        >>> head, rest = split_options({"carry": "shift", "channel_ratio": 0.5}, HeadConfig)
        >>> head.carry, rest
        ('shift', {'channel_ratio': 0.5})
    """
    names = {f.name for f in dataclasses.fields(config)}
    given = {**{k: v for k, v in (defaults or {}).items() if k in names},
             **{k: v for k, v in options.items() if k in names}}
    return config(**given), {k: v for k, v in options.items() if k not in names}
