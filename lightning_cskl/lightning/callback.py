"""CenterKernelCallback: Lightning hooks mapped onto :class:`~lightning_cskl.core.CenterKernelLearner`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import lightning.pytorch as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ..core import CenterKernelConfig, CenterKernelLearner
from ..core.config import HeadConfig, publish_options, split_options
from ..core.drift import feature_distillation
from ..core.head import ClassMoments
from ..core.learner import IDLE, SCORING, TRAINING
from ..core.prefix_cache import PrefixCacheConfig

__all__ = ["CenterKernelCallback", "check_strategy", "default_batch_input", "default_batch_target"]

_REFUSED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy", "XLAFSDPStrategy")


def _batch_part(batch: Any, index: int, keys: tuple[str, ...], what: str, remedy: str) -> Any:
    """Element ``index`` of a tuple/list batch, or its first entry among ``keys`` if a mapping."""
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > index:
        return batch[index]
    if isinstance(batch, Mapping):
        for key in keys:
            if key in batch:
                return batch[key]
    raise TypeError(f"cannot find the {what} in a batch of type {type(batch).__name__}: pass {remedy}")


def default_batch_input(batch: Any) -> Any:
    """The model input of a batch: the batch if it is a tensor, its first element if a tuple or list,
    or its ``"x"``/``"input"``/``"image"`` entry if a mapping."""
    if isinstance(batch, Tensor):
        return batch
    return _batch_part(batch, 0, ("x", "input", "image"), "model input",
                       "CenterKernelCallback(forward_fn=lambda module, batch: ...) to say how the model reads a batch")


def check_strategy(strategy: object) -> None:
    """Refuse strategies that shard parameters: the method slices and projects whole parameters."""
    name = type(strategy).__name__
    if name in _REFUSED_STRATEGIES:
        raise ValueError(
            f"CenterKernelCallback does not support strategy {name}: it slices and projects whole, unsharded "
            "parameters. Use strategy='auto', 'ddp', 'ddp_spawn' or a single device."
        )


def default_batch_target(batch: Any) -> Tensor:
    """The labels of a batch: its second element if a tuple or list, or its ``"y"``/``"label"``/``"target"``
    entry if a mapping."""
    return _batch_part(batch, 1, ("y", "label", "target"), "labels",
                       "CenterKernelCallback(target_fn=lambda batch: ...) to say where they are")


def _default_forward(module: torch.nn.Module, batch: Any) -> Any:
    return module(default_batch_input(batch))


def _dataset_size(loader: Any) -> Optional[int]:
    """Samples in the dataset of the training loader (None: several loaders, or a dataset without a length)."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # an IterableDataset without __len__
        return None


def _last_linear(module: torch.nn.Module) -> str:
    names = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise ValueError(f"{type(module).__name__} has no nn.Linear to serve as the classifier head: pass "
                         "CenterKernelCallback(head='<qualified name>')")
    return names[-1]


class CenterKernelCallback(Callback):
    """Train only the center elements of conv kernels, on the input channels DCES selects, in directions old
    tasks do not use.

    Use one instance for a sequence of tasks, with one Trainer per task:

    * ``setup``: freezes everything but the classifier head, before ``configure_optimizers`` runs (and before
      DDP wraps the model); build the optimizer from ``self.parameters()`` as usual;
    * ``on_fit_start``: attaches a center branch beside each chosen convolution (the model keeps its modules,
      parameter names and ``state_dict`` keys) and adds its centers to the optimizer that holds the
      convolution's weight, in that weight's parameter group (else to the first optimizer's first group), before
      a checkpoint's optimizer state is restored;
    * ``on_before_optimizer_step``: the first ``score_batches`` steps of a task score channels (no weight
      moves), then the branches keep only the selected channels; the optimizer's own step hooks project every
      update onto the free subspace of old-task center inputs, whatever the optimizer;
    * ``on_train_end``: records this task's center-input covariance from the training data and folds the
      branches back into the kernels.

    A checkpoint written mid-task holds the plain architecture's keys (the centers are written into the
    kernels), so it loads into the model without the callback, and resumes the task exactly with it.

    The first task trains all parameters (``first_task="full"``, the base session) unless told otherwise.

    Prefix cache (:mod:`lightning_cskl.core.prefix_cache`): during an incremental task every module below the lowest
    trained layer is frozen, so with ``index_fn`` (each batch's sample indices in the task's training dataset) the
    first epoch stores that prefix's output per sample and later epochs and the ``on_train_end`` pass start from
    it, with the uncached run's results (``prefix_cache_precision="float32"``). The dataset must hand out the same
    sample at the same index every epoch, without random augmentation (checked once per epoch: a sample that
    changed switches the cache off for the task, with a log line), and the training loader's dataset must have a
    length (its ``len`` sizes the store; the index is the position in the whole dataset, also under DDP). A prefix
    that spends fewer than ``prefix_cache_min_flops`` FLOPs per stored value is recomputed instead. Without
    ``index_fn`` nothing is cached (one info line if ``prefix_cache`` was given); the base session never is.

    Args:
        config: a :class:`~lightning_cskl.core.CenterKernelConfig`; or give its fields as keyword options.
            Layer names are qualified names inside the LightningModule (e.g. ``"net.layer4.1.conv2"``).
        forward_fn: ``(module, batch) -> output`` used for the covariance pass at the end of a task;
            the default calls the module on the batch's first element.
        log_stats: log per layer the selected channels and free-subspace dimension through the loggers.
        target_fn: ``batch -> labels`` for the statistics head and prototypes (default:
            :func:`default_batch_target`).
        index_fn: ``batch -> indices``: one integer per sample, its position in the training loader's dataset
            (e.g. ``lambda batch: batch[-1]`` for a dataset returning ``(x, y, index)``; the module's
            ``training_step`` ignores it). It turns the prefix cache on (``prefix_cache="on"``, the default);
            None (default): no cache.
        **options: the fields of :class:`~lightning_cskl.core.HeadConfig`, of
            :class:`~lightning_cskl.core.prefix_cache.PrefixCacheConfig` (``prefix_cache``, ``prefix_cache_precision``,
            ``prefix_cache_min_flops``) and of :class:`~lightning_cskl.core.CenterKernelConfig`, which document them (all published in this
            signature).
            In this door: ``statistics_head`` updates the statistics from the task's training loader at
            ``on_train_end``, and the head answers with their scores in eval mode (validation, test, predict, or
            ``model.eval()`` and a plain call, also after the fit; a forward hook attached at ``setup``,
            :meth:`detach_statistics` removes it); its ``"auto"`` (default) is ``"qda"`` when the module has
            exactly one ``nn.Linear`` (one classifier head), else None (give ``head=``). ``head="auto"`` is the
            module's last ``nn.Linear``. ``record_batches`` None reads as many batches as the Trainer's
            ``limit_train_batches`` allows (an endless loader needs ``record_batches``). ``prototype_replay`` is
            True or False (default): it adds ``τ · prototype_weight · CE(head(p) / τ, y_p)`` on old-class
            prototypes to the loss the module's ``training_step`` returns (the Avalanche door also divides the
            task's own logits by τ, which a callback cannot do to a user's loss). ``distill_weight`` adds its term
            to that loss too, through ``forward_fn``.

    Example:
        >>> cb = CenterKernelCallback(channel_ratio=0.75)
        >>> # for task in tasks:
        >>> #     trainer = L.Trainer(max_epochs=5, callbacks=[cb]); trainer.fit(model, task_loader)
        >>> # with the prefix cache, the loader's batches being (x, y, index):
        >>> cb = CenterKernelCallback(index_fn=lambda batch: batch[-1])
    """

    @publish_options(HeadConfig, PrefixCacheConfig, CenterKernelConfig, defaults={"prototype_replay": False})
    def __init__(
        self,
        config: Optional[CenterKernelConfig] = None,
        *,
        forward_fn: Optional[Callable[[torch.nn.Module, Any], Any]] = None,
        log_stats: bool = True,
        target_fn: Optional[Callable[[Any], Tensor]] = None,
        index_fn: Optional[Callable[[Any], Tensor]] = None,
        **options: Any,
    ) -> None:
        self.options, rest = split_options(options, HeadConfig, defaults={"prototype_replay": False})
        cache, engine_options = split_options(rest, PrefixCacheConfig)
        self.learner = CenterKernelLearner(config, **engine_options)
        self.prefix_cache = cache.build()
        self.index_fn = index_fn
        if index_fn is None and self.prefix_cache.enabled and "prefix_cache" in options:
            rank_zero_info(f"CenterKernelCallback: prefix_cache={cache.prefix_cache!r} is not used: the callback "
                           "cannot tell which samples a batch holds; give index_fn=lambda batch: <their indices in "
                           "the task's training dataset>")
        o = self.options
        self.carry = o.carry
        self._drift = o.drift()
        self.distill_weight = o.distill_weight
        self.distill_loss: Optional[Tensor] = None  # the last step's term
        if not isinstance(o.prototype_replay, bool):
            raise ValueError(f"prototype_replay={o.prototype_replay!r} is not allowed here: use True or False")
        self.prototype_replay = o.prototype_replay
        self.memory = o.prototypes(seed=self.learner.config.seed)
        self._replay_module: Optional[torch.nn.Module] = None
        self.record_batches = o.record_batches
        self._aborted = False
        self.forward_fn = forward_fn or _default_forward
        self.log_stats = log_stats
        self.statistics_head = o.statistics_head  # as asked; "auto" is resolved per module at setup
        self.statistics = o.statistics()
        self.head = o.head
        self.target_fn = target_fn or default_batch_target
        self._optimizer_handles: list[Any] = []
        self._statistics_handle: Any = None
        self._statistics_head: Optional[torch.nn.Module] = None

    def head_module(self, pl_module: torch.nn.Module) -> torch.nn.Module:
        """The classifier head whose input the statistics head reads.

        Raises:
            ValueError: ``head`` is not a module of ``pl_module`` (or, for ``"auto"``, it has no ``nn.Linear``).
        """
        name = _last_linear(pl_module) if self.head == "auto" else self.head
        if name not in dict(pl_module.named_modules()):
            raise ValueError(f"head={self.head!r} is not a module of {type(pl_module).__name__}")
        return pl_module.get_submodule(name)

    @property
    def config(self) -> CenterKernelConfig:
        return self.learner.config

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.statistics_head == "auto" and self.head == "auto" and self.statistics is not None and not len(
                self.statistics):
            linears = [n for n, m in pl_module.named_modules() if isinstance(m, torch.nn.Linear)]
            if len(linears) != 1:  # several heads (task-incremental) or an MLP head: the trained head answers
                rank_zero_info(f"CenterKernelCallback: statistics_head='auto' found {len(linears)} nn.Linear modules, "
                               "not one classifier head: the trained head answers (give statistics_head= and head= "
                               "to use class statistics)")
                self.statistics = None
        if self.statistics is not None:
            head = self.head_module(pl_module)
            if self._statistics_head is not head:  # attached once per head; it stays after fit (see the docs)
                self.detach_statistics()
                self._statistics_handle, self._statistics_head = self.statistics.attach(head), head
        if stage != "fit":
            return
        check_strategy(trainer.strategy)
        if self._aborted:  # the last fit raised: start a fresh task, unless a checkpoint restores one after setup
            self.learner.abort_task()
            self._aborted = False
        self.learner.bind(pl_module)
        self.learner.begin_task()

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the strategy moved the model and built the optimizers, before a checkpoint's optimizer state is
        # loaded: the branches live on the model's device and their centers are in the optimizers
        self.learner.begin_task()  # continues a task restored from a checkpoint; builds free_bases on device
        self._remove_optimizer_hooks()
        self._optimizer_handles = [self.learner.attach_optimizer(opt) for opt in trainer.optimizers]

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record_limit(trainer)  # an endless loader without record_batches fails now, not after the task
        self._start_replay(pl_module)
        self._begin_cache(trainer, pl_module)
        remaining = self.config.score_batches - self.learner.scored_batches
        if self.learner.phase == SCORING and trainer.estimated_stepping_batches <= remaining:
            rank_zero_warn(
                f"this fit has {trainer.estimated_stepping_batches} optimizer steps but DCES scores for "
                f"{remaining} more (score_batches={self.config.score_batches}): nothing would train. "
                "Lower score_batches or train longer."
            )
        if self.learner.new_selection:
            self._log_selection(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.learner.before_update()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.prefix_cache.new_pass()

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.prefix_cache.close_batch()
        if self.prefix_cache.active:
            # `run` is the cut's probe on the task's first batch: the module's forward on this batch
            self.prefix_cache.open_batch(self._batch_index(batch), lambda: self.forward_fn(pl_module, batch))

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.prefix_cache.close_batch()  # after the backward and the optimizer step, which run no forward
        if self.learner.new_selection:
            self._log_selection(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_optimizer_hooks()
        self._stop_replay()
        self.prefix_cache.close_batch()
        # the pass reads the stored prefix where the check of its first batch allows (no cut is searched for
        # here: the probe's passes would be recorded)
        cached = self.prefix_cache.active and self.prefix_cache.cut is not None
        if cached:
            self.prefix_cache.new_pass()
        loader = trainer.train_dataloader
        device = pl_module.device
        features: list[Tensor] = []
        capture = None
        moments = ClassMoments()  # summed over DDP ranks after the pass: each rank reads its own shard
        statistics_moments = self.statistics.moments() if self.statistics is not None else None
        records = self.statistics is not None or self.prototype_replay
        # with a carry, each batch also runs under the backbone before the task: old and new features, paired
        pairs = self._drift is not None and records and self.learner.phase == TRAINING
        if self._drift is not None:
            self._drift.reset()
        limit = self._record_limit(trainer)  # before any hook is registered: it may refuse an endless loader
        if records:
            capture = self.head_module(pl_module).register_forward_pre_hook(
                lambda module, args: features.append(args[0]))

        def run_forward() -> None:
            for index, batch in enumerate(loader):
                if index >= limit:
                    break
                # the Trainer's own input conversion (a `*-true` precision casts the model, and so the inputs)
                batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch, device))
                with self.prefix_cache.batch(self._batch_index(batch), None) if cached else contextlib.nullcontext():
                    features.clear()
                    self.forward_fn(pl_module, batch)
                    if not (records and features):
                        continue
                    new, target = features[-1], self.target_fn(batch)
                    moments.add(new, target)
                    if statistics_moments is not None:
                        statistics_moments.add(new, target)
                    if pairs:
                        features.clear()
                        with self._drift.timed(), self.learner.task_start_weights():
                            self.forward_fn(pl_module, batch)
                        self._drift.add(features[-1], new, target)

        try:
            self.learner.end_task(run_forward)
        finally:
            if capture is not None:
                capture.remove()
            self.prefix_cache.end_task()
        if records:
            # a rank that saw no sample still takes part in the reduction, with the head's input size
            size = moments.sums.shape[1] if moments.sums is not None else getattr(self.head_module(pl_module),
                                                                                  "in_features", 0)
            moments = moments.all_reduce_(size)
            if pairs:
                targets = [t for t in (self.statistics, self.memory if self.prototype_replay else None) if t is not None]
                self._drift.apply(targets, task=f"task {self.learner.tasks_seen}")
            if self.statistics is not None:
                self.statistics.add_moments(statistics_moments.all_reduce_(size))
            if self.prototype_replay:
                self.memory.add_moments(moments)
        rank_zero_info(f"CenterKernelCallback: task {self.learner.tasks_seen} done, branches folded back")

    def _begin_cache(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start this task's prefix cache, after the branches are attached (the cut is found among their layers)."""
        self.prefix_cache.end_task()
        if not self.prefix_cache.enabled or self.index_fn is None or self.learner.is_base_task:
            return
        size = _dataset_size(trainer.train_dataloader)
        if size is None:
            rank_zero_info("CenterKernelCallback: prefix cache off for this task: the training loader's dataset has "
                           "no length (an IterableDataset, or several training loaders), so the store cannot be "
                           "sized; the task runs uncached")
            return
        self.prefix_cache.begin_task(pl_module, list(self.learner.layers), size)

    def _batch_index(self, batch: Any) -> Tensor:
        """``index_fn(batch)``, checked: one integer per sample."""
        index = self.index_fn(batch)
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point() or index.is_complex():
            what = (f"a tensor of shape {tuple(index.shape)} and dtype {index.dtype}" if isinstance(index, Tensor)
                    else f"a {type(index).__name__}")
            raise ValueError(f"index_fn returned {what}: it must return a 1-D integer tensor, each sample's position "
                             "in the task's training dataset")
        return index

    def _record_limit(self, trainer: L.Trainer) -> float:
        """Batches the end-of-task pass reads: ``record_batches``, within the Trainer's ``limit_train_batches``."""
        available = float(trainer.num_training_batches)
        limit = min(available, float(self.record_batches)) if self.record_batches is not None else available
        if limit == float("inf"):
            raise ValueError("the training loader has no length (an infinite IterableDataset?): give "
                             "CenterKernelCallback(record_batches=N) so that the end-of-task pass ends")
        return limit

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # the learner's state stays as it is, so that a checkpoint written now (OnExceptionCheckpoint runs after
        # this hook) can resume the task; the next setup starts a fresh task unless that checkpoint is loaded
        self._remove_optimizer_hooks()
        self._stop_replay()
        self.prefix_cache.end_task()
        self.learner.suspend()
        self._aborted = True

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_optimizer_hooks()
        self._stop_replay()
        self.prefix_cache.end_task()
        if stage == "fit" and self.learner.model is not None and self.learner.phase != IDLE and not self._aborted:
            # the fit ended without training (an empty loader, max_steps=0): Lightning never called on_train_end
            rank_zero_warn("CenterKernelCallback: the fit ended before training ended (an empty training loader?): "
                           "the task was not recorded and the model is left as it was")
            self.learner.suspend()
            self._aborted = True

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self.learner.state_dict()
        if self.statistics is not None:
            state["statistics"] = self.statistics.state_dict()
        if self.prototype_replay:
            state["prototypes"] = self.memory.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        statistics = state.pop("statistics", None)
        prototypes = state.pop("prototypes", None)
        self.learner.load_state_dict(state)
        if self.statistics is not None and statistics is not None:
            self.statistics.load_state_dict(statistics)
        if self.prototype_replay and prototypes is not None:
            self.memory.load_state_dict(prototypes)

    def replay_loss(self, pl_module: torch.nn.Module, batch_size: int) -> Tensor:
        """The prototype term for a batch of ``batch_size`` samples (what ``prototype_replay=True`` adds to the
        loss; call it yourself to place it in a loss of your own).

        Raises:
            RuntimeError: no task has ended yet, so there are no prototypes.
        """
        return self.memory.loss(self.head_module(pl_module), batch_size)

    def _start_replay(self, pl_module: L.LightningModule) -> None:
        """Add the prototype term and the distillation term to the module's training loss for this task (an
        instance attribute over its ``training_step``, removed when the task ends or fails)."""
        if self.learner.is_base_task or self._replay_module:
            return
        replay = bool(self.prototype_replay and len(self.memory))
        distill = self.distill_weight > 0
        if not (replay or distill):
            return
        if replay:
            self.memory.begin_task(self.learner.tasks_seen)
        step = pl_module.training_step
        head = self.head_module(pl_module)

        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            old = self._old_features(pl_module, head, batch) if distill else None
            captured: list[Tensor] = []
            capture = head.register_forward_pre_hook(lambda module, a: captured.append(a[0])) if old is not None else None
            try:
                output = step(batch, *args, **kwargs)
            finally:
                if capture is not None:
                    capture.remove()
            loss = output["loss"] if isinstance(output, Mapping) else output
            if not isinstance(loss, Tensor):  # the step skipped the batch (None)
                return output
            self.distill_loss = None
            if old is not None and captured:
                term = self.distill_weight * feature_distillation(captured[0], old)
                loss = loss + term
                self.distill_loss = term.detach()
            if replay:
                loss = loss + self.replay_loss(pl_module, len(self.target_fn(batch)))
            return {**output, "loss": loss} if isinstance(output, Mapping) else loss

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._replay_module = pl_module

    def _old_features(self, pl_module: torch.nn.Module, head: torch.nn.Module, batch: Any) -> Optional[Tensor]:
        """The head's input for ``batch`` under the backbone before the task (None before DCES has chosen)."""
        features: list[Tensor] = []
        handle = head.register_forward_pre_hook(lambda module, args: features.append(args[0]))
        try:
            with torch.no_grad(), self.learner.task_start_weights() as swapped:
                if swapped:
                    self.forward_fn(pl_module, batch)
        finally:
            handle.remove()
        return features[-1] if features else None

    def _stop_replay(self) -> None:
        if self._replay_module is not None:
            self._replay_module.__dict__.pop("training_step", None)
            self._replay_module = None

    def detach_statistics(self) -> None:
        """Let the head answer with its trained output again in eval mode (undoes the statistics head)."""
        if self._statistics_handle is not None:
            self._statistics_handle.remove()
        self._statistics_handle, self._statistics_head = None, None

    def record(self, model: torch.nn.Module, dataloader: Any) -> None:
        """Protect what a pretrained ``model`` knows: record its center-input covariance on ``dataloader``
        (its base-task data) without training. The next fit is then an incremental task.

        Example:
            >>> # cb = CenterKernelCallback(); cb.record(pretrained_module, base_loader)
        """
        self.learner.bind(model)
        device = next(model.parameters()).device

        def run_forward() -> None:
            for batch in dataloader:
                self.forward_fn(model, move_data_to_device(batch, device))

        self.learner.record(run_forward)
        self.learner.unbind()

    def _log_selection(self, trainer: L.Trainer) -> None:
        self.learner.new_selection = False
        if not self.log_stats:
            return
        stats = self.learner.selection_stats()
        stats["cskl/task"] = float(self.learner.tasks_seen)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(stats, step=trainer.global_step)

    def _remove_optimizer_hooks(self) -> None:
        for handle in self._optimizer_handles:
            handle.remove()
        self._optimizer_handles = []
