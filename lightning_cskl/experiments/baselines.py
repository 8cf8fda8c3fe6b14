"""The methods of the comparison (PROTOCOL.md), each an Avalanche strategy built by name from :data:`METHODS`.

=====================  ==========================================================================================
name                   what trains after the base session (experience 0 always trains every parameter)
=====================  ==========================================================================================
``full_finetune``      everything (Avalanche ``Naive``)
``last_layer``         the classifier head
``head_replay``        the classifier head, with CsKO's prototype replay (single-head models): the cheapest
                       trained baseline; a backbone method's *adaptation gain* is its ACC minus this one's
``slda``               nothing (no backward pass): streaming LDA on the frozen base-session features
``ncm``                nothing: nearest class mean on the frozen base-session features
``full_finetune_lda``  everything (as ``full_finetune``), evaluated with the LDA statistics head: what
                       adapting the whole backbone gives the statistics head, and what it costs the old classes
``bias_only``          every bias (conv, BatchNorm, linear) and the head (TinyTL-style)
``sparse_update``      whole k×k kernels of the last convolutions on the input channels of largest weight
                       magnitude, and the head (MCUNetV3-style; no anti-forgetting)
``ewc``, ``lwf``       everything, with Avalanche's ``EWCPlugin`` / ``LwFPlugin``
``gpm``                whole k×k kernels of the last convolutions, each step projected away from old tasks'
                       unfolded C·k² input patches by the energy criterion (GPM), and the head
``adam_nscl``          the same with the null-space criterion (Adam-NSCL)
``center_only``        CsKO centers of all channels, no projection (ablation; trained head)
``csko_no_dces``       CsKO on all channels with projection (CsKO without DCES; trained head)
``csko_dces``          CsKO + DCES (the method as published: engine defaults, trained head)
``csko_dces_lda``      CsKO + DCES evaluated with the LDA statistics head of its own features (CSKLStrategy's
                       default for single-head models)
=====================  ==========================================================================================

``csko_dces_filter`` is CsKO + DCES with 2×2 gradient filtering on the center branches (less
activation memory, exact forward). ``gpm_replay`` and ``adam_nscl_replay`` are GPM and Adam-NSCL with
CsKO's prototype replay (``prototype_replay="auto"``: single-head models only; on task-incremental
multi-head models they are ``gpm`` and ``adam_nscl``): beside CsKO + DCES, which replays prototypes too, they
compare the backbone updates alone. ``gpm_all`` and ``adam_nscl_all`` are the published forms: every k×k
convolution trains, projected (``layers="all"``).

Methods other than ``full_finetune``, ``ewc`` and ``lwf`` keep BatchNorm statistics frozen after the base
session, so what they do not train stays bit-identical. "The last convolutions" are those CsKO trains with
``layers="auto"`` (:func:`~lightning_cskl.core.resolve_layers`), so the projection baselines and CsKO train
the same layers. Every plugin resets the optimizer state at each experience, as :class:`CSKLPlugin` does.
The plugin-based baselines take ``prototype_replay=True`` to get CsKO's classifier-side remedy for
class-incremental runs (off by default; CsKO has it on for single-head models).

Every factory has the same keyword signature (see :func:`build_method`)::

    strategy = METHODS["gpm"](model=model, optimizer=optimizer, evaluator=evaluator,
                              train_epochs=5, train_mb_size=32, eval_mb_size=256)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from avalanche.core import BasePlugin
from avalanche.models.fecam import FeCAMClassifier, compute_covariance, compute_means
from avalanche.models.utils import is_multi_task_module
from avalanche.training import Cumulative, Naive
from avalanche.training.plugins import EWCPlugin, LwFPlugin
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from typing_extensions import override

from ..core import resolve_layers
from .full_kernel import (
    FullKernelCovariance, full_kernel_projector, project_kernel_update, protected_basis,
)
from ..core.batchnorm import FrozenBatchNorm
from ..core.head import UNSEEN_CLASS_SCORE, StatisticsHead, StatisticsRule
from ..core.projection import ProjectionCriterion
from ..core.prototypes import PrototypeMemory
from ..core.selection import channel_scores, select_channels, validate_channel_ratio
from ..core.step import ConstrainedStep
from ..avalanche.strategy import CSKLStrategy, PrototypeReplayHooks, find_classifier, find_head, record_pass
from .statistics import RemeasurePlugin, head_features

__all__ = [
    "AvalancheFeCAMPlugin",
    "BiasOnlyPlugin",
    "FROZEN_METHODS",
    "FrozenBackbonePlugin",
    "FullFinetunePlugin",
    "FullKernelProjectionPlugin",
    "IncrementalFreezePlugin",
    "LastLayerPlugin",
    "METHODS",
    "SINGLE_HEAD_METHODS",
    "SparseUpdatePlugin",
    "UnknownMethodError",
    "build_method",
    "method_base",
    "find_classifier",
]

Evaluator = Union[EvaluationPlugin, Callable[[], EvaluationPlugin], None]


class UnknownMethodError(ValueError):
    """A method name that is not in :data:`METHODS`."""


class IncrementalFreezePlugin(PrototypeReplayHooks, supports_distributed=True):
    """Base of the on-device and projection baselines: experience 0 (the base session) trains every
    parameter; every later one trains only :meth:`trainable` and keeps BatchNorm frozen (CsKO's
    :class:`~lightning_cskl.core.batchnorm.FrozenBatchNorm`).

    Subclasses choose the trained parameters and may hook the optimizer's steps (:meth:`begin_experience`).
    Frozen parameters stay in Avalanche's optimizer but never get a gradient, so they never move.

    Args:
        head: the classifier head (see :func:`find_classifier`).
        prototype_replay: give the baseline CsKO's classifier-side remedy for class-incremental runs (METHOD.md
            §4, :class:`~lightning_cskl.core.prototypes.PrototypeMemory`): logits divided by ``temperature``
            and a loss on old-class mean features passed through the head. Off by default (the published
            baselines have none); on, it separates what the backbone update does from what the head does.
            ``"auto"``: on for single-head models, off for multi-task ones (as :class:`CSKLPlugin`).
        prototype_weight, temperature: of the prototype replay.
        record_batches: batches of each experience used at its end for prototypes and representations
            (None: all).
        statistics_head: ``"lda"``, ``"ncm"`` or ``"qda"``: evaluate with class statistics of the head's input features
            (:class:`~lightning_cskl.core.head.StatisticsHead`) instead of the trained head; None: the trained
            head.
        shrinkage: ε of the ``"lda"`` statistics head, α of the ``"qda"`` one (None: 1e-4 and 0.5).
    """

    def __init__(
        self,
        head: str = "auto",
        *,
        prototype_replay: Union[bool, str] = False,
        prototype_weight: float = 10.0,
        temperature: float = 0.1,
        record_batches: Optional[int] = None,
        statistics_head: Optional[StatisticsRule] = None,
        shrinkage: Optional[float] = None,
    ) -> None:
        super().__init__()
        if not isinstance(head, str):
            raise ValueError(f"head={head!r} is not allowed: use 'auto' or a qualified module name")
        if not isinstance(prototype_replay, bool) and prototype_replay != "auto":
            raise ValueError(f"prototype_replay={prototype_replay!r} is not allowed: use True, False or 'auto'")
        if record_batches is not None and (
            isinstance(record_batches, bool) or not isinstance(record_batches, int) or record_batches < 1
        ):
            raise ValueError(f"record_batches={record_batches!r} is not allowed: use None or an int >= 1")
        self.head = head
        self.prototype_replay = prototype_replay
        self.memory = PrototypeMemory(prototype_weight, temperature)
        self.statistics = StatisticsHead(statistics_head, shrinkage) if statistics_head is not None else None
        self.record_batches = record_batches
        self._frozen_bn = FrozenBatchNorm()
        self.experiences_seen = 0
        self._handles: list[Any] = []
        self._replay_head: Optional[nn.Module] = None

    @property
    def is_base(self) -> bool:
        return self.experiences_seen == 0

    def trainable(self, model: nn.Module) -> list[str]:
        """Qualified names of the parameters that train after the base session."""
        prefix = find_classifier(model, self.head)
        return [n for n, _ in model.named_parameters() if n.startswith(prefix + ".")]

    def check_model(self, model: nn.Module) -> None:
        """Validate the model-dependent options now (head, layers), without changing the model.

        Raises:
            ValueError: no such head, ``layers`` selects no convolution whose kernel can be unfolded, or
                prototype replay is asked of a multi-task model (its heads need task labels).
        """
        self.trainable(model)
        self._check_statistics(model)
        if self.prototype_replay is True and is_multi_task_module(model):
            raise ValueError(f"prototype_replay=True needs a single-head (class-incremental) model, and "
                             f"{type(model).__name__} is a multi-task module: use prototype_replay=False")

    def begin_experience(self, strategy: SupervisedTemplate) -> None:
        """Called after freezing and the fresh optimizer, for incremental experiences only."""

    def end_experience(self, strategy: SupervisedTemplate) -> None:
        """Called at the end of every experience (the base session included), before the counter moves."""

    def recorders(self, model: nn.Module) -> list[Any]:
        """Objects with a ``hooked()`` context that record during the end-of-experience pass over its data."""
        return []

    def _record(self, strategy: SupervisedTemplate) -> None:
        """One eval-mode pass over the experience's data for :meth:`recorders` and the prototypes."""
        model = strategy.model
        recorders = self.recorders(model)
        head = model.get_submodule(find_classifier(model, self.head)) if self.records_features(model) else None
        if not recorders and head is None:
            return
        was_training = model.training
        model.eval()
        self._begin_feature_collection()
        try:
            with torch.no_grad(), contextlib.ExitStack() as stack:
                for recorder in recorders:
                    stack.enter_context(recorder.hooked())
                record_pass(strategy, self.record_batches, head, self._collect_features)
        finally:
            model.train(was_training)
        self._end_feature_collection()

    def _freeze_batchnorm(self, model: nn.Module) -> None:
        if not self.is_base:
            self._frozen_bn.freeze(model)

    @override
    def before_training_exp(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        model = strategy.model
        self._remove_hooks()
        if self.is_base:
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            keep = set(self.trainable(model))
            for name, p in model.named_parameters():
                p.requires_grad_(name in keep)
            self._freeze_batchnorm(model)
        strategy.make_optimizer(reset_optimizer_state=True)  # parameters outside the model stay, as in Naive
        self._replay_head = None
        if not self.is_base:
            if self.replays_prototypes(model) and len(self.memory):
                self._replay_head = model.get_submodule(find_classifier(model, self.head))
                self.memory.begin_task(self.experiences_seen)
            self.begin_experience(strategy)

    @override
    def after_training_exp(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self._remove_hooks()
        self._frozen_bn.release()
        self._replay_head = None
        self._record(strategy)
        self.end_experience(strategy)
        self.experiences_seen += 1
        for p in strategy.model.parameters():
            p.requires_grad_(True)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
        state = {"experiences_seen": self.experiences_seen, "prototypes": self.memory.state_dict()}
        if self.statistics is not None:
            state["statistics"] = self.statistics.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.experiences_seen = int(state["experiences_seen"])
        self.memory.load_state_dict(state["prototypes"])
        if self.statistics is not None:
            self.statistics.load_state_dict(state["statistics"])


class LastLayerPlugin(IncrementalFreezePlugin):
    """After the base session only the classifier head trains."""


class FullFinetunePlugin(IncrementalFreezePlugin):
    """Every parameter trains in every experience and BatchNorm keeps training mode: full fine-tuning, as a plugin
    so that it can take a statistics head (``full_finetune_lda``: how much adapting the whole backbone gives a
    statistics head, and how much the old classes' stored statistics suffer from it)."""

    @override
    def trainable(self, model: nn.Module) -> list[str]:
        find_classifier(model, self.head)  # validates the head
        return [n for n, _ in model.named_parameters()]

    @override
    def _freeze_batchnorm(self, model: nn.Module) -> None:
        pass


class FrozenBackbonePlugin(IncrementalFreezePlugin):
    """After the base session nothing trains: no backward pass, no optimizer step. Each experience only feeds
    its data forward once, at its end, into the statistics head (``statistics_head``, required), which then
    classifies. With ``"lda"`` this is streaming LDA on the frozen base (Hayes & Kanan 2020), our own
    :class:`~lightning_cskl.core.head.StatisticsHead` rather than Avalanche's ``StreamingLDA`` strategy, which
    cannot start from a loaded base session and updates per sample; ours merges batches exactly and predicts
    as Avalanche's does (``tests/test_head.py``). With ``"ncm"``, nearest class mean.
    """

    def __init__(self, head: str = "auto", *, statistics_head: StatisticsRule = "lda", **options: Any) -> None:
        if statistics_head is None:
            raise ValueError("statistics_head=None is not allowed for a frozen backbone: use 'lda' or 'ncm'")
        super().__init__(head, statistics_head=statistics_head, **options)

    @override
    def trainable(self, model: nn.Module) -> list[str]:
        find_classifier(model, self.head)  # validates the head
        return []

    @override
    def before_training_epoch(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        super().before_training_epoch(strategy, *args, **kwargs)
        if not self.is_base:
            strategy.stop_training()  # Avalanche ends the experience's epoch loop before the first epoch


class AvalancheFeCAMPlugin(FrozenBackbonePlugin):
    """The frozen base with Avalanche's :class:`~avalanche.models.fecam.FeCAMClassifier` as it ships (per-class
    covariances of Tukey-transformed features, shrinkage, covariance normalization): updated with every
    experience's training features and answering in place of the trained head during evaluation (the ``fecam``
    baseline). Our own head with per-class covariances is ``StatisticsHead("qda")`` (``slda_qda``)."""

    def __init__(self, head: str = "auto", **options: Any) -> None:
        IncrementalFreezePlugin.__init__(self, head, **options)
        self.classifier = FeCAMClassifier()
        self._answer: Any = None

    @override
    def end_experience(self, strategy: SupervisedTemplate) -> None:
        head = find_head(strategy.model, self.head)
        features, labels = head_features(strategy, head, strategy.experience.dataset)
        features = self.classifier.apply_transforms(features.clamp_min(0))
        self.classifier.update_class_means_dict(compute_means(features, labels))
        self.classifier.update_class_cov_dict(self.classifier.apply_cov_transforms(compute_covariance(features, labels)))

    @override
    def before_eval_exp(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self._remove_answer()
        if not self.classifier.class_means_dict:
            return
        classifier = self.classifier

        def answer(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            if module.training:
                return None
            scores = classifier(inputs[0].flatten(1).detach().cpu().clamp_min(0))
            out = torch.full_like(output, UNSEEN_CLASS_SCORE)
            width = min(out.shape[1], scores.shape[1])
            out[:, :width] = torch.nan_to_num(scores[:, :width], neginf=UNSEEN_CLASS_SCORE).to(out.device, out.dtype)
            return out

        self._answer = find_head(strategy.model, self.head).register_forward_hook(answer)

    @override
    def after_eval_exp(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self._remove_answer()

    def _remove_answer(self) -> None:
        if self._answer is not None:
            self._answer.remove()
            self._answer = None


class BiasOnlyPlugin(IncrementalFreezePlugin):
    """After the base session every bias (convolutions, BatchNorm shifts, linear layers) and the head train
    (TinyTL-style bias-only update; BatchNorm statistics frozen)."""

    @override
    def trainable(self, model: nn.Module) -> list[str]:
        head = set(super().trainable(model))
        return [n for n, _ in model.named_parameters() if n in head or n.rsplit(".", 1)[-1] == "bias"]


def _conv_layers(model: nn.Module, layers: Union[str, list[str]]) -> dict[str, nn.Conv2d]:
    from .full_kernel import validate_full_kernel_conv

    return {name: validate_full_kernel_conv(name, model.get_submodule(name)) for name in resolve_layers(model, layers)}


class SparseUpdatePlugin(IncrementalFreezePlugin):
    """MCUNetV3-style sparse update: the whole k×k kernels of ``layers`` train, restricted to the input
    channels of largest weight magnitude (chosen anew each experience), plus the head. No anti-forgetting.

    The restriction holds for the optimizer's step itself (weight decay and momentum included): the
    unselected input channels are put back after every step.

    Args:
        layers: which convolutions train (``"auto"``: those CsKO would train; see
            :func:`~lightning_cskl.core.resolve_layers`).
        channel_ratio: fraction of input channels per layer that train, (0, 1].
        head: the classifier head.
        **replay: ``prototype_replay``, ``prototype_weight``, ``temperature``, ``record_batches`` (see
            :class:`IncrementalFreezePlugin`).
    """

    def __init__(
        self, layers: Union[str, list[str]] = "auto", channel_ratio: float = 0.5, head: str = "auto", **replay: Any
    ) -> None:
        super().__init__(head, **replay)
        self.layers = layers
        self.channel_ratio = validate_channel_ratio(channel_ratio)
        self.selected: dict[str, Tensor] = {}

    @override
    def trainable(self, model: nn.Module) -> list[str]:
        weights = [f"{name}.weight" for name in _conv_layers(model, self.layers)]
        return weights + super().trainable(model)

    @override
    def begin_experience(self, strategy: SupervisedTemplate) -> None:
        convs = _conv_layers(strategy.model, self.layers)
        self.selected = {}
        for name, conv in convs.items():
            w = conv.weight.detach()
            scores = channel_scores(w.abs().sum(dim=(2, 3)), conv.groups)  # L1 magnitude per input channel
            self.selected[name] = select_channels(scores.cpu(), self.channel_ratio)

        def keep(name: str, conv: nn.Conv2d) -> Tensor:
            cg = conv.in_channels // conv.groups
            mask = self.selected[name].reshape(conv.groups, 1, cg).to(conv.weight.device)
            d = conv.out_channels
            return mask.expand(conv.groups, d // conv.groups, cg).reshape(d, cg)  # (D, C/g): True = trains

        masks = {name: keep(name, conv) for name, conv in convs.items()}
        step = ConstrainedStep(lambda: {name: conv.weight for name, conv in convs.items()},
                               lambda name, before, after: torch.where(masks[name][..., None, None], after, before))
        self._handles = [step.attach(strategy.optimizer)]


class FullKernelProjectionPlugin(IncrementalFreezePlugin):
    """GPM / Adam-NSCL with full k×k kernels: the whole kernels of ``layers`` and the head train; every
    optimizer step of a kernel is projected onto the free subspace of the old tasks' unfolded input patches
    (``C/g·k²``-dimensional), by the same projection code as CsKO (:mod:`lightning_cskl.core.projection`).

    The representation is CsKO's, only bigger: an uncentered covariance summed over tasks of each task's
    mean ``p pᵀ``, recorded in eval mode on the experience's data at its end. Biases of the projected
    convolutions stay frozen (a bias change shifts old outputs).

    Args:
        projection_criterion: ``"energy"`` (GPM: protect a fraction ε of the energy) or ``"null_space"`` (Adam-NSCL:
            free the eigenvalues ≤ θ·λ_min).
        layers: which convolutions train (``"auto"``: those CsKO would train).
        null_space_factor: θ.
        energy: ε for the first incremental experience; ``energy_step`` is added per later one (capped at 1).
        energy_step: see ``energy``.
        head: the classifier head.
        **replay: ``prototype_replay``, ``prototype_weight``, ``temperature``, ``record_batches`` (batches of
            each experience used for its covariance and prototypes; see :class:`IncrementalFreezePlugin`).
    """

    def __init__(
        self,
        projection_criterion: ProjectionCriterion = "energy",
        layers: Union[str, list[str]] = "auto",
        null_space_factor: float = 5.0,
        energy: float = 0.97,
        energy_step: float = 0.003,
        head: str = "auto",
        **replay: Any,
    ) -> None:
        super().__init__(head, **replay)
        if projection_criterion not in ("energy", "null_space"):
            raise ValueError(f"projection_criterion={projection_criterion!r} is not allowed: use 'energy' or "
                             "'null_space'")
        if not null_space_factor > 0:
            raise ValueError(f"null_space_factor={null_space_factor!r} is not allowed: it must be > 0")
        for name, value in (("energy", energy), ("energy_step", energy_step)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} is not allowed: it must lie in [0, 1]")
        self.projection_criterion = projection_criterion
        self.layers = layers
        self.null_space_factor = null_space_factor
        self.energy = energy
        self.energy_step = energy_step
        self._collector: Optional[FullKernelCovariance] = None
        self.covariances: dict[str, Tensor] = {}
        self.bases: dict[str, Tensor] = {}
        self.protected: dict[str, bool] = {}  # per layer: ``bases`` holds the used directions, not the free ones

    @override
    def trainable(self, model: nn.Module) -> list[str]:
        weights = [f"{name}.weight" for name in _conv_layers(model, self.layers)]
        return weights + super().trainable(model)

    def current_energy(self) -> float:
        return min(1.0, self.energy + self.energy_step * max(0, self.experiences_seen - 1))

    @override
    def begin_experience(self, strategy: SupervisedTemplate) -> None:
        convs = _conv_layers(strategy.model, self.layers)
        self.bases, self.protected = {}, {}
        for name, conv in convs.items():
            if name in self.covariances:
                basis, _ = full_kernel_projector(
                    self.covariances[name], self.projection_criterion, self.null_space_factor, self.current_energy()
                )
                # keep the smaller of the free and the used bases: the same projection at the lower cost
                self.protected[name] = basis.shape[2] > basis.shape[1] / 2
                if self.protected[name]:
                    basis = protected_basis(basis)
                self.bases[name] = basis.to(device=conv.weight.device, dtype=conv.weight.dtype)
        step = ConstrainedStep(
            lambda: {name: convs[name].weight for name in self.bases},
            lambda name, before, after: before + project_kernel_update(after - before, self.bases[name],
                                                                       self.protected[name]))
        self._handles = [step.attach(strategy.optimizer)]

    @override
    def recorders(self, model: nn.Module) -> list[Any]:
        self._collector = FullKernelCovariance(_conv_layers(model, self.layers))
        return [self._collector]

    @override
    def end_experience(self, strategy: SupervisedTemplate) -> None:
        if self._collector is not None:
            for name, cov in self._collector.covariances().items():
                self.covariances[name] = self.covariances[name] + cov if name in self.covariances else cov
        self._collector = None
        self.bases = {}

    def free_dims(self) -> dict[str, int]:
        """Per projected layer, the dimension of the free subspace the current experience moves in (summed over
        groups; padded group bases count at their widest)."""
        dims = {}
        for name, basis in self.bases.items():
            groups, m, width = basis.shape
            dims[name] = groups * (m - width if self.protected.get(name) else width)
        return dims

    def projection_state_bytes(self) -> int:
        """Bytes kept for the projection: the (C/g·k²)² covariances and the free bases."""
        return sum(t.numel() * t.element_size() for t in [*self.covariances.values(), *self.bases.values()])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "covariances": {n: t.cpu() for n, t in self.covariances.items()}}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.covariances = dict(state["covariances"])


# ---------------------------------------------------------------------------------------------- registry
def _template(plugin_or_none: Optional[BasePlugin], **kwargs: Any) -> SupervisedTemplate:
    if isinstance(plugin_or_none, IncrementalFreezePlugin):
        plugin_or_none.check_model(kwargs["model"])
    plugins = [*kwargs.pop("plugins"), *([plugin_or_none] if plugin_or_none is not None else [])]
    strategy = Naive(plugins=plugins, **kwargs)
    strategy.baseline = plugin_or_none  # the method's plugin, for tests and cost accounting
    return strategy


def _plugin_method(make_plugin: Callable[..., BasePlugin]) -> Callable[..., SupervisedTemplate]:
    def factory(**kwargs: Any) -> SupervisedTemplate:
        common, options = _split(kwargs)
        return _template(make_plugin(**options), **common)

    factory.__doc__ = f"Build the strategy with {getattr(make_plugin, '__name__', 'the plugin')}(**options)."
    return factory


def _cskl_method(**defaults: Any) -> Callable[..., SupervisedTemplate]:
    def factory(**kwargs: Any) -> SupervisedTemplate:
        common, options = _split(kwargs)
        options = {**defaults, **options}
        if options.pop("remeasure", False):  # the ceiling: statistics re-measured on all data (needs old data)
            common["plugins"] = [*common["plugins"], RemeasurePlugin()]
        strategy = CSKLStrategy(**common, **options)
        strategy.baseline = strategy.cskl
        return strategy

    factory.__doc__ = f"Build CSKLStrategy with {defaults or 'the engine defaults'} (overridable by options)."
    return factory


_COMMON = ("model", "optimizer", "criterion", "train_mb_size", "train_epochs", "eval_mb_size", "device",
           "plugins", "evaluator", "eval_every")


def _joint_lda(**kwargs: Any) -> SupervisedTemplate:
    """The ceiling: every experience trains all parameters on the data of every experience so far (Avalanche's
    ``Cumulative``), then an LDA head is measured on all of it."""
    common, options = _split(kwargs)
    plugin = FullFinetunePlugin(**{"statistics_head": "lda", **options})
    plugin.check_model(common["model"])
    common["plugins"] = [*common["plugins"], plugin, RemeasurePlugin()]
    strategy = Cumulative(**common)
    strategy.baseline = plugin
    return strategy


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    common = {k: kwargs.pop(k) for k in _COMMON if k in kwargs}
    if common.get("criterion") is None:
        common["criterion"] = nn.CrossEntropyLoss()
    common["plugins"] = list(common.get("plugins") or ())  # a new list: the caller's is never changed
    return common, kwargs


#: method name -> factory(*, model, optimizer, evaluator, train_epochs, train_mb_size, eval_mb_size, device,
#: plugins, criterion, eval_every, **method options) -> an Avalanche SupervisedTemplate
METHODS: dict[str, Callable[..., SupervisedTemplate]] = {
    "full_finetune": _plugin_method(lambda: None),  # plain Naive
    "last_layer": _plugin_method(LastLayerPlugin),
    "head_replay": _plugin_method(lambda **o: LastLayerPlugin(**{"prototype_replay": "auto", **o})),
    "slda": _plugin_method(lambda **o: FrozenBackbonePlugin(**{"statistics_head": "lda", **o})),
    "ncm": _plugin_method(lambda **o: FrozenBackbonePlugin(**{"statistics_head": "ncm", **o})),
    "full_finetune_lda": _plugin_method(lambda **o: FullFinetunePlugin(**{"statistics_head": "lda", **o})),
    "bias_only": _plugin_method(BiasOnlyPlugin),
    "sparse_update": _plugin_method(SparseUpdatePlugin),
    "ewc": _plugin_method(lambda ewc_lambda=100.0, mode="separate", **o: EWCPlugin(ewc_lambda, mode, **o)),
    "lwf": _plugin_method(lambda alpha=1.0, temperature=2.0: LwFPlugin(alpha, temperature)),
    "gpm": _plugin_method(lambda **o: FullKernelProjectionPlugin(**{"projection_criterion": "energy", **o})),
    "adam_nscl": _plugin_method(lambda **o: FullKernelProjectionPlugin(**{"projection_criterion": "null_space", **o})),
    "gpm_all": _plugin_method(lambda **o: FullKernelProjectionPlugin(**{"projection_criterion": "energy", "layers": "all", **o})),
    "adam_nscl_all": _plugin_method(
        lambda **o: FullKernelProjectionPlugin(**{"projection_criterion": "null_space", "layers": "all", **o})),
    "gpm_replay": _plugin_method(
        lambda **o: FullKernelProjectionPlugin(**{"projection_criterion": "energy", "prototype_replay": "auto", **o})),
    "adam_nscl_replay": _plugin_method(
        lambda **o: FullKernelProjectionPlugin(**{"projection_criterion": "null_space", "prototype_replay": "auto", **o})),
    # all channels: no DCES scoring steps needed (with channel_ratio=1 any selection rule keeps every channel)
    "center_only": _cskl_method(project=False, channel_ratio=1.0, selection="magnitude", statistics_head=None),
    "csko_no_dces": _cskl_method(channel_ratio=1.0, selection="magnitude", statistics_head=None),
    "csko_dces": _cskl_method(statistics_head=None),
    "csko_dces_filter": _cskl_method(gradient_filter=2, statistics_head=None),
    "csko_dces_lda": _cskl_method(statistics_head="lda"),
    "fecam": _plugin_method(AvalancheFeCAMPlugin),
    "slda_qda": _plugin_method(lambda **o: FrozenBackbonePlugin(**{"statistics_head": "qda", **o})),
    "joint_lda": _joint_lda,
    "cskl": _cskl_method(),  # exactly what `cskl run` runs with its defaults (CSKLStrategy's own)
}


def method_base(name: str) -> str:
    """The registry method that ``name`` runs: itself, or for a variant ``"<method>@<tag>"`` the part before
    ``@`` (a variant runs that method with options of its own, e.g. in :func:`~lightning_cskl.experiments.bench.run_bench`'s
    ``method_options``, so that one comparison can hold several settings of one method).

    Raises:
        UnknownMethodError: the method is not in :data:`METHODS`; the message lists the allowed names.

    Example:
        >>> method_base("csko_dces_lda@energy"), method_base("slda")
        ('csko_dces_lda', 'slda')
    """
    base = name.split("@", 1)[0] if isinstance(name, str) else name
    if base not in METHODS:
        raise UnknownMethodError(f"method {name!r} is not known: use one of {', '.join(METHODS)} "
                                 "(or '<method>@<tag>' for a variant)")
    return base


#: methods that train nothing after the base session (no backward pass, no epochs)
FROZEN_METHODS = frozenset({"slda", "ncm", "fecam", "slda_qda"})

#: methods whose classifier is a statistics head: single-head (class- and domain-incremental) models only
SINGLE_HEAD_METHODS = frozenset({"slda", "ncm", "fecam", "slda_qda", "full_finetune_lda", "csko_dces_lda",
                                 "joint_lda"})


def build_method(
    name: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    evaluator: Evaluator = default_evaluator,
    train_epochs: int = 1,
    train_mb_size: int = 32,
    eval_mb_size: int = 256,
    device: Union[str, torch.device] = "cpu",
    plugins: Sequence[BasePlugin] = (),
    criterion: Optional[Callable[..., Tensor]] = None,
    **options: Any,
) -> SupervisedTemplate:
    """Build the strategy of method ``name`` (a key of :data:`METHODS`) with the common settings.

    Args:
        name: the method.
        model, optimizer, evaluator, train_epochs, train_mb_size, eval_mb_size, device, criterion: as for
            Avalanche's ``SupervisedTemplate`` (``criterion`` None: cross-entropy). The optimizer should hold
            every parameter of ``model``; plugins rebuild it per experience.
        plugins: further plugins (copied, never changed).
        **options: the method's own options (e.g. ``channel_ratio`` for ``sparse_update`` and CsKO,
            ``ewc_lambda`` for ``ewc``, ``energy`` for ``gpm``).

    Returns:
        The strategy; ``strategy.baseline`` is the method's plugin (None for ``full_finetune``).

    Raises:
        UnknownMethodError: ``name`` is not a known method (or ``"<method>@<tag>"`` variant of one); the message
            lists the allowed names.

    Example:
        >>> from lightning_cskl.avalanche import ClassIncrementalNet
        >>> from lightning_cskl.models import SmallCNN
        >>> model = ClassIncrementalNet(SmallCNN(10).features, 32)
        >>> opt = torch.optim.Adam(model.parameters(), 1e-3)
        >>> type(build_method("gpm", model=model, optimizer=opt, evaluator=None).baseline).__name__
        'FullKernelProjectionPlugin'
    """
    return METHODS[method_base(name)](
        model=model, optimizer=optimizer, evaluator=evaluator, train_epochs=train_epochs,
        train_mb_size=train_mb_size, eval_mb_size=eval_mb_size, device=device, plugins=plugins,
        criterion=criterion, **options,
    )
