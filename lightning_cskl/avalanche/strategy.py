"""CSKLStrategy and CSKLPlugin: Avalanche's plugin hooks mapped onto :class:`~lightning_cskl.core.CenterKernelLearner`.

The plugin holds no math of its own. Per experience it calls, in order:

=============================  ==================================================================
Avalanche hook                 learner call
=============================  ==================================================================
before_train_dataset_adapt.    refuse an experience without samples (before models adapt to it)
before_training_exp            ``bind`` + ``begin_task`` (freeze, attach the center branches),
                               then rebuild the optimizer from the model with a fresh state and
                               ``attach_optimizer`` (the centers join it; every step is projected)
after_backward                 ``before_update`` (DCES scoring steps move nothing; then the
                               branches keep only the selected channels)
after_training_exp             ``end_task``: center-input covariance of the experience, fold back
=============================  ==================================================================

Class-incremental runs with one expanding head add the prototype replay of METHOD.md §4
(:class:`~lightning_cskl.core.prototypes.PrototypeMemory`): the loss is taken on the logits divided by τ and a
loss on old-class prototypes passed through the head is added before backward; and, by default, they are
evaluated with a statistics head (:class:`~lightning_cskl.core.head.StatisticsHead`, QDA by default) of the
head's input.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch
from avalanche.core import BasePlugin, SupervisedPlugin
from avalanche.models import IncrementalClassifier, MultiHeadClassifier
from avalanche.models.utils import is_multi_task_module
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from ..core import CenterKernelConfig, CenterKernelLearner, resolve_layers
from ..core.config import HeadConfig, publish_options, split_options
from ..core.drift import DriftCarry, feature_distillation
from ..core.head import ClassMoments, StatisticsHead, StatisticsRule
from ..core.layers import resolve_train_also
from ..core.learner import IDLE, SCORING, TRAINING
from ..core.prefix_cache import PrefixCache, PrefixCacheConfig
from ..core.prototypes import PrototypeMemory

__all__ = ["CSKLPlugin", "CSKLStrategy", "EmptyExperienceError", "PrototypeReplayHooks", "find_classifier", "find_head",
           "with_sample_index"]

class EmptyExperienceError(ValueError):
    """An experience to train on holds no samples."""


def _experience_name(experience: Any) -> str:
    stream = getattr(getattr(experience, "origin_stream", None), "name", "?")
    return f"experience {getattr(experience, 'current_experience', '?')} of stream {stream!r}"


def find_classifier(model: nn.Module, head: str = "auto") -> str:
    """Qualified name of the classifier head: ``head`` itself, or with ``"auto"`` the last outermost Avalanche
    ``IncrementalClassifier`` / ``MultiHeadClassifier`` of the model, else its last ``nn.Linear``.

    Example:
        >>> from lightning_cskl.avalanche import TaskIncrementalNet
        >>> from lightning_cskl.models import SmallCNN
        >>> find_classifier(TaskIncrementalNet(SmallCNN(10).features, 32))
        'head'

    Raises:
        ValueError: no such module.
    """
    names = dict(model.named_modules())
    if head != "auto":
        if head not in names:
            raise ValueError(f"head={head!r} is not a module of {type(model).__name__}")
        return head
    for kinds in ((IncrementalClassifier, MultiHeadClassifier), (nn.Linear,)):
        found = [n for n, m in names.items() if isinstance(m, kinds)]
        # outermost only: a MultiHeadClassifier holds one IncrementalClassifier per task
        outer = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
        if outer:
            return outer[-1]
    raise ValueError(f"{type(model).__name__} has no classifier head (nn.Linear or Avalanche classifier): "
                     "pass head='<qualified name>'")


def find_head(model: nn.Module, head: str = "auto") -> nn.Module:
    """The classifier head module (see :func:`find_classifier`)."""
    return model.get_submodule(find_classifier(model, head))


#: the data attribute that carries each sample's position in the experience's dataset (for the prefix cache)
SAMPLE_INDEX = "cskl_sample_index"


def with_sample_index(dataset: Any) -> Any:
    """``dataset`` whose items end with their position in it (an Avalanche data attribute, so subsets and
    task-balanced loaders keep it), or None for a dataset that cannot carry one.

    Example:
        >>> from lightning_cskl.data import split_digits_benchmark
        >>> data = with_sample_index(split_digits_benchmark("class").train_stream[0].dataset)
        >>> int(data[5][-1])
        5
    """
    from avalanche.benchmarks.utils import DataAttribute

    if not hasattr(dataset, "update_data_attribute"):
        return None
    return dataset.update_data_attribute(
        SAMPLE_INDEX, DataAttribute(list(range(len(dataset))), SAMPLE_INDEX, use_in_getitem=True))


def record_loader(strategy: SupervisedTemplate, record_batches: Optional[int], indexed: bool = False) -> DataLoader:
    """The loader of the end-of-experience pass over the experience's data (eval transforms, batches of the
    training batch size).

    With ``record_batches`` set, only that many batches are read, so they are drawn in a seeded random order: an
    experience's dataset is often sorted by class, and its first batches would hold one class only. With
    ``indexed``, each batch ends with its samples' positions in the experience's dataset (:func:`with_sample_index`).
    """
    dataset = strategy.experience.dataset.eval()
    if indexed:
        dataset = with_sample_index(dataset)
    # BatchNorm is in eval mode here, so the batch size sets only the speed. The training one, as in the Lightning
    # door: a prefix cache recomputes each pass's first batch to check it, and a large eval batch would make that
    # the whole pass on a small experience
    batch_size = strategy.train_mb_size or strategy.eval_mb_size or 1
    generator = torch.Generator().manual_seed(0) if record_batches is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=record_batches is not None, generator=generator,
                      collate_fn=getattr(dataset, "collate_fn", None))


def record_pass(strategy: SupervisedTemplate, record_batches: Optional[int], head: Optional[nn.Module],
                collect: Callable[..., None], before_update: Optional[Callable[[], Any]] = None,
                cache: Optional[PrefixCache] = None) -> None:
    """The end-of-experience pass: feed (up to ``record_batches`` batches of) the experience's data through the
    model exactly as training does (``strategy.forward``: task labels for multi-task models), and hand the input
    of ``head`` with the labels of each batch to ``collect``. The caller sets eval mode, ``no_grad`` and whatever
    hooks record other statistics; the strategy's current mini-batch is restored afterwards.

    With ``before_update`` (a context-manager factory, the learner's ``task_start_weights``), each batch runs
    once more inside it and ``collect`` also receives the head input it gave there (features before the update,
    paired sample by sample).

    With an active ``cache`` (:class:`~lightning_cskl.core.prefix_cache.PrefixCache`) the batches read the
    experience's stored prefix instead of running it, where the check of the pass's first batch allows."""
    features: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: features.append(args[0])) if head else None
    saved_batch = strategy.mbatch
    indexed = cache is not None and cache.active and cache.cut is not None
    if indexed:
        cache.new_pass()
    try:
        for index, batch in enumerate(record_loader(strategy, record_batches, indexed)):
            if record_batches is not None and index >= record_batches:
                break
            samples = None
            if indexed:
                *batch, samples = batch
            strategy.mbatch = [t.to(strategy.device) for t in batch]
            # no cut is searched for here: its probe passes would be recorded
            with cache.batch(samples, None) if indexed else contextlib.nullcontext():
                features.clear()
                strategy.forward()
                if not features:
                    continue
                if before_update is None:
                    collect(features[-1], strategy.mbatch[1])
                    continue
                new = features[-1]
                features.clear()
                with before_update():
                    strategy.forward()
                collect(new, strategy.mbatch[1], features[-1])
    finally:
        if hook is not None:
            hook.remove()
        strategy.mbatch = saved_batch


class PrototypeReplayHooks(SupervisedPlugin):
    """The classifier-side hooks shared by every plugin that offers them: prototype replay (METHOD.md §4) and a
    statistics head.

    While a subclass has set ``_replay_head`` for the current experience, the strategy's loss term is taken on
    the logits divided by τ (``strategy.mb_output`` itself stays unscaled for other plugins and metrics) and the
    loss on old-class prototypes passed through that head is added before backward (``self.memory``, a
    :class:`~lightning_cskl.core.prototypes.PrototypeMemory`, does the math). With ``self.statistics`` set (a
    :class:`~lightning_cskl.core.head.StatisticsHead`), the head's input features of every finished experience
    update class statistics, and during evaluation the head answers with the statistics' scores.
    """

    memory: PrototypeMemory
    prototype_replay: Union[bool, str] = False
    statistics: Optional[StatisticsHead] = None
    statistics_head: Union[Literal["auto"], StatisticsRule, None] = None  # as asked; "auto" is resolved per model
    head: str = "auto"
    _replay_head: Optional[nn.Module] = None
    _statistics_handle: Any = None
    _drift: Optional[DriftCarry] = None  # pairs features before / after the update to carry the statistics
    _moments: Optional[ClassMoments] = None  # of this experience's features, for the prototypes
    _statistics_moments: Optional[ClassMoments] = None  # the same, as the statistics head takes them

    def replays_prototypes(self, model: nn.Module) -> bool:
        """Whether prototype replay applies to ``model`` (see ``prototype_replay``)."""
        if self.prototype_replay == "auto":
            return not is_multi_task_module(model)
        return bool(self.prototype_replay)

    def records_features(self, model: nn.Module) -> bool:
        """Whether the end-of-experience pass must capture the head's input (prototypes or statistics)."""
        return self.replays_prototypes(model) or self.statistics is not None

    def _resolve_statistics(self, model: nn.Module) -> None:
        """``statistics_head="auto"``: no statistics head for multi-task models."""
        if self.statistics_head == "auto" and is_multi_task_module(model):
            self.statistics = None

    def _check_statistics(self, model: nn.Module) -> None:
        if self.statistics is not None and is_multi_task_module(model):
            raise ValueError(f"statistics_head={self.statistics.rule!r} needs a single-head (class- or "
                             f"domain-incremental) model, and {type(model).__name__} is a multi-task module: use "
                             "statistics_head=None")

    def _begin_feature_collection(self) -> None:
        self._moments = ClassMoments()
        self._statistics_moments = self.statistics.moments() if self.statistics is not None else None
        if self._drift is not None:
            self._drift.reset()

    def _collect_features(self, features: torch.Tensor, labels: torch.Tensor,
                          old_features: Optional[torch.Tensor] = None) -> None:
        if self._moments is None:
            self._begin_feature_collection()
        self._moments.add(features, labels)
        if self._statistics_moments is not None:
            self._statistics_moments.add(features, labels)
        if old_features is not None and self._drift is not None:
            self._drift.add(old_features, features, labels)

    def _end_feature_collection(self, task: str = "this experience") -> None:
        """Carry the stored statistics across the update (when pairs were collected), then merge this
        experience's."""
        if self._drift is not None and len(self._drift):
            self._drift.apply([t for t in (self.statistics, self.memory) if t is not None], task=task)
        if self._moments is not None:
            self.memory.add_moments(self._moments)
        if self.statistics is not None and self._statistics_moments is not None:
            self.statistics.add_moments(self._statistics_moments)
        self._moments = self._statistics_moments = None

    @override
    def before_backward(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        if self._replay_head is not None:
            # the temperature applies inside this loss only: strategy.mb_output stays unscaled for every other
            # plugin (LwF's distillation, metrics), and the strategy's criterion term is swapped for its scaled form
            output, target = strategy.mb_output, strategy.mb_y
            swap = self.memory.task_loss(strategy._criterion, output, target) - strategy._criterion(output, target)
            strategy.loss = strategy.loss + swap + self.memory.loss(self._replay_head, len(target))

    @override
    def before_eval_exp(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self._detach_statistics()
        if self.statistics is not None and len(self.statistics):
            self._statistics_handle = self.statistics.attach(find_head(strategy.model, self.head))

    @override
    def after_eval_exp(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self._detach_statistics()

    def _detach_statistics(self) -> None:
        if self._statistics_handle is not None:
            self._statistics_handle.remove()
            self._statistics_handle = None


class CSKLPlugin(PrototypeReplayHooks, supports_distributed=True):
    """Center-Sensitive Kernel Optimization with DCES as an Avalanche plugin; add it to any SupervisedTemplate.

    The first experience trains every parameter (the base session, ``first_task="full"``); each later one
    trains only the centers of the chosen convolutions (on the input channels DCES selects, in directions
    old experiences do not use) plus the classifier head. The optimizer's state is reset at every
    experience; parameters that Avalanche puts back into the optimizer but that are frozen get no gradient,
    so they never move.

    Args:
        config: the engine's options (:class:`~lightning_cskl.core.CenterKernelConfig`); or give its fields
            as keyword options.
        **options: the fields of :class:`~lightning_cskl.core.HeadConfig` (``statistics_head``, ``carry``,
            ``prototype_replay``, ``head``, ``record_batches``, ...), of
            :class:`~lightning_cskl.core.prefix_cache.PrefixCacheConfig` (``prefix_cache``,
            ``prefix_cache_precision``, ``prefix_cache_min_flops``) and of
            :class:`~lightning_cskl.core.CenterKernelConfig` (``channel_ratio``, ``layers``, ...), which document
            them; all are published in this signature. ``prototype_replay="auto"``
            (default) is on for single-head models and off for Avalanche ``MultiTaskModule`` models;
            ``statistics_head="auto"`` (default) is ``"qda"`` for single-head models and None for
            ``MultiTaskModule`` ones.

    Example:
        >>> plugin = CSKLPlugin(channel_ratio=0.5)
        >>> # strategy = Naive(model=model, optimizer=opt, plugins=[plugin]); strategy.train(experience)
        >>> plugin.config.channel_ratio
        0.5
    """

    @publish_options(HeadConfig, PrefixCacheConfig, CenterKernelConfig)
    def __init__(self, config: Optional[CenterKernelConfig] = None, **options: Any) -> None:
        super().__init__()
        self.options, options = split_options(options, HeadConfig)
        cache, engine_options = split_options(options, PrefixCacheConfig)
        self.learner = CenterKernelLearner(config, **engine_options)
        self.prefix_cache = cache.build()
        self._cache_size: Optional[int] = None  # samples of this experience's indexed dataset (None: not indexed)
        o = self.options
        self.carry = o.carry
        self._drift = o.drift()
        self.distill_weight = o.distill_weight
        self._distill_handle: Any = None
        self._distill_features: list[torch.Tensor] = []
        self._distill_old: Optional[torch.Tensor] = None
        self.distill_loss: Optional[torch.Tensor] = None  # the last step's term, for loggers and tests
        self.statistics_head = o.statistics_head
        self.statistics = o.statistics()
        self.prototype_replay = o.prototype_replay
        self.memory = o.prototypes(seed=self.learner.config.seed)
        self.head = o.head
        self.record_batches = o.record_batches
        self._optimizer_handle: Any = None
        self._replay_head: Optional[nn.Module] = None

    @property
    def config(self) -> CenterKernelConfig:
        return self.learner.config

    def check_model(self, model: nn.Module) -> None:
        """Validate the model-dependent options now, without changing the model.

        Raises:
            NoEligibleLayerError: ``layers`` selects no convolution whose center can train.
            ValueError: ``train_also`` names no module of the model, or prototype replay / a statistics head is
                asked for and no head is found.
        """
        resolve_train_also(model, self.config.train_also, resolve_layers(model, self.config.layers))
        self._resolve_statistics(model)
        self._check_statistics(model)
        if self.prototype_replay is True or self.statistics is not None or (
            self.prototype_replay == "auto" and self.head != "auto"
        ):
            find_head(model, self.head)

    # ------------------------------------------------------------------ hooks
    @override
    def before_train_dataset_adaptation(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        experience = strategy.experience
        dataset = getattr(experience, "dataset", None)
        if dataset is None or len(dataset) == 0:
            raise EmptyExperienceError(
                f"{_experience_name(experience)} has no samples: every experience to train on needs data "
                "(check the benchmark's class split and the data root)"
            )

    @override
    def after_train_dataset_adaptation(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        # every sample carries its position, the key of its stored prefix (not in the base session: it trains all)
        self._cache_size = None
        if self.prefix_cache.enabled and not self.learner.is_base_task:
            indexed = with_sample_index(strategy.adapted_dataset)
            if indexed is not None:
                strategy.adapted_dataset, self._cache_size = indexed, len(indexed)

    @override
    def before_training_exp(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        model = strategy.model
        if self.learner.phase != IDLE and self.learner.model is model:
            # the previous experience raised before it ended: start this one afresh (its branches stay bound)
            self.learner.abort_task()
        self._resolve_statistics(model)
        self.learner.bind(model)
        self.learner.begin_task()
        # a fresh optimizer state (old momentum must not leak into a new task), over the model's own parameters
        # (their names never change) and whatever else the user gave the optimizer (a learnable temperature is
        # kept, as Naive keeps it); centers left from a task that raised are taken out, and the learner then adds
        # this task's, which are not parameters of the model, to the group of their convolution's weight
        self.learner.forget_centers(strategy.optimizer)
        strategy.make_optimizer(reset_optimizer_state=True)
        self._remove_optimizer_hooks()
        self._optimizer_handle = self.learner.attach_optimizer(strategy.optimizer)
        self._warn_if_scoring_fills(strategy)
        self._replay_head = None
        if self.replays_prototypes(model) and len(self.memory) and not self.learner.is_base_task:
            self._replay_head = find_head(model, self.head)
            self.memory.begin_task(self.learner.tasks_seen)
        self._remove_distill_hook()
        if self.distill_weight > 0 and not self.learner.is_base_task:
            self._distill_handle = find_head(model, self.head).register_forward_pre_hook(
                lambda module, args: self._distill_features.append(args[0]))
        self._begin_cache(strategy)

    def _begin_cache(self, strategy: SupervisedTemplate) -> None:
        self.prefix_cache.end_task()
        if not self.prefix_cache.enabled or self.learner.is_base_task:
            return
        # a plugin after this one may have swapped the dataset for one without the index (a replay buffer)
        if not hasattr(strategy.adapted_dataset, SAMPLE_INDEX):
            self._cache_size = None
        self.prefix_cache.begin_task(strategy.model, list(self.learner.layers), self._cache_size)

    @override
    def before_training_epoch(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self.prefix_cache.new_pass()

    @override
    def before_training_iteration(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        # the index leaves the mini-batch before any other plugin sees it (this plugin runs first)
        samples = None
        if self._cache_size is not None and isinstance(strategy.mbatch, list) and len(strategy.mbatch) > 1:
            samples = strategy.mbatch.pop()
        self.prefix_cache.open_batch(samples, strategy.forward)

    @override
    def after_forward(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self.prefix_cache.close_batch()

    @override
    def before_forward(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        # the backbone before the update runs first: swapping the trained tensors in place after the training
        # forward would change tensors its graph saved
        self._distill_features.clear()
        self._distill_old = None
        if self._distill_handle is not None and self.learner.phase == TRAINING:
            with torch.no_grad(), self.learner.task_start_weights() as swapped:
                if swapped:
                    strategy.forward()
            if swapped and self._distill_features:
                self._distill_old = self._distill_features[-1]
            self._distill_features.clear()

    @override
    def before_backward(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self.distill_loss = None
        if self._distill_old is not None and self._distill_features:
            # the training forward's head input (prototype replay calls the head only after this)
            term = self.distill_weight * feature_distillation(self._distill_features[0], self._distill_old)
            strategy.loss = strategy.loss + term
            self.distill_loss = term.detach()
        self._distill_features.clear()
        self._distill_old = None
        super().before_backward(strategy, *args, **kwargs)

    def _remove_distill_hook(self) -> None:
        if self._distill_handle is not None:
            self._distill_handle.remove()
            self._distill_handle = None
        self._distill_features.clear()

    def _warn_if_scoring_fills(self, strategy: SupervisedTemplate) -> None:
        remaining = self.config.score_batches - self.learner.scored_batches
        loader = getattr(strategy, "dataloader", None)
        if self.learner.phase != SCORING or loader is None:
            return
        try:
            steps = len(loader) * int(strategy.train_epochs)
        except TypeError:  # a loader without a length
            return
        if steps <= remaining:
            warnings.warn(
                f"{_experience_name(strategy.experience)} has {steps} optimizer steps but DCES scores for "
                f"{remaining} (score_batches={self.config.score_batches}): no center and no head weight will move "
                "in it. Lower score_batches or train longer.", stacklevel=2)

    @override
    def after_backward(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self.learner.before_update()

    @override
    def after_training_exp(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self._remove_optimizer_hooks()
        self._remove_distill_hook()
        self._replay_head = None
        model = strategy.model
        head = find_head(model, self.head) if self.records_features(model) else None
        # the backbone before the update is known exactly (the trained tensors' start values): with a carry, each
        # batch of the pass also runs under it, so that old and new features are paired sample by sample
        pairs = self._drift is not None and head is not None and self.learner.phase == TRAINING
        before = self._drift.timing(self.learner.task_start_weights) if pairs else None
        self._begin_feature_collection()
        self.prefix_cache.close_batch()
        try:
            self.learner.end_task(lambda: record_pass(strategy, self.record_batches, head, self._collect_features,
                                                      before, self.prefix_cache))
        finally:
            self.prefix_cache.end_task()
        self._end_feature_collection(_experience_name(strategy.experience))

    def _remove_optimizer_hooks(self) -> None:
        if self._optimizer_handle is not None:
            self._optimizer_handle.remove()
            self._optimizer_handle = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
        state = {"learner": self.learner.state_dict(), "prototypes": self.memory.state_dict()}
        if self.statistics is not None:
            state["statistics"] = self.statistics.state_dict()  # carried statistics included
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.memory.load_state_dict(state["prototypes"])
        if self.statistics is not None and "statistics" in state:
            self.statistics.load_state_dict(state["statistics"])


class CSKLStrategy(SupervisedTemplate):
    """Avalanche's SupervisedTemplate plus one :class:`CSKLPlugin`: continual learning that trains only
    kernel centers, DCES-selected and projected away from what old experiences use.

    Works for class-incremental benchmarks (one expanding head, e.g. ``IncrementalClassifier``, with prototype
    replay) and task-incremental ones (task labels and an Avalanche ``MultiTaskModule`` such as
    ``MultiHeadClassifier``), with Avalanche's classic benchmarks, ``nc_benchmark`` and
    ``benchmark_from_datasets``.

    Args:
        model, optimizer, criterion, train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator,
            eval_every, peval_mode: as for Avalanche's ``SupervisedTemplate``. ``plugins`` is copied, never
            changed; the CSKL plugin is put first in the copy and available as ``strategy.cskl``.
        config: the engine's options (:class:`~lightning_cskl.core.CenterKernelConfig`); or give its fields
            as keyword options.
        **options: the fields of :class:`~lightning_cskl.core.HeadConfig` (``statistics_head``, ``carry``,
            ``prototype_replay``, ...), of :class:`~lightning_cskl.core.prefix_cache.PrefixCacheConfig`
            (``prefix_cache``, ``prefix_cache_precision``, ``prefix_cache_min_flops``) and of
            :class:`~lightning_cskl.core.CenterKernelConfig`
            (``channel_ratio``, ``layers``, ...), which document them; all published in this signature (see
            :class:`CSKLPlugin`).

    Raises:
        NoEligibleLayerError: ``layers`` selects no convolution of ``model`` whose center can train.
        ValueError: an option is outside its allowed values (e.g. ``channel_ratio`` not in (0, 1]).

    Example:
        >>> from lightning_cskl.models import SmallCNN
        >>> model = SmallCNN(10)
        >>> strategy = CSKLStrategy(model=model, optimizer=torch.optim.Adam(model.parameters(), 1e-3),
        ...                         train_mb_size=32, train_epochs=2, eval_mb_size=128, evaluator=None,
        ...                         channel_ratio=0.75)
        >>> strategy.cskl.config.channel_ratio
        0.75
        >>> # for exp in benchmark.train_stream: strategy.train(exp); strategy.eval(benchmark.test_stream)
    """

    @publish_options(HeadConfig, PrefixCacheConfig, CenterKernelConfig)
    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Optional[Callable[..., torch.Tensor]] = None,
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = 1,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[Sequence[BasePlugin]] = None,
        evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin], None] = default_evaluator,
        eval_every: int = -1,
        peval_mode: str = "epoch",
        config: Optional[CenterKernelConfig] = None,
        **options: Any,
    ) -> None:
        plugin = CSKLPlugin(config, **options)
        plugin.check_model(model)
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            # first: the branches are folded back before other plugins' after_training_exp (EWC's importances
            # then see the plain, trainable model)
            plugins=[plugin, *(plugins or ())],
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
        )
        self.cskl = plugin

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Avalanche's ``train``; if it raises, the model is left plain (branches folded back, flags restored)
        and the next ``train`` starts the experience afresh."""
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            self.cskl.prefix_cache.end_task()
            self.cskl.learner.suspend()
            raise


def _keyword_only(init: Callable[..., None]) -> Callable[..., None]:
    """Refuse positional arguments before Avalanche's legacy wrapper sees them: it maps them onto the signature
    and silently drops every keyword it does not know, misspelled ones included."""

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            raise TypeError(f"{type(self).__name__} takes keyword arguments only (got {len(args)} positional "
                            "argument(s)): write model=..., optimizer=..., ...")
        init(self, **kwargs)

    return wrapper


CSKLStrategy.__init__ = _keyword_only(CSKLStrategy.__init__)  # type: ignore[method-assign]
