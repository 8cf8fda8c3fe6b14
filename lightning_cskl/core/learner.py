"""The per-task lifecycle that every front door drives.

::

    learner.bind(model)                 # resolve layers, keep original flags (the model is not changed)
    learner.begin_task()                # freeze all but centers (+ head), keep BatchNorm frozen, attach branches
    handle = learner.attach_optimizer(optimizer)   # the branches' centers join the optimizer
    for batch in task:                  # the framework's loop
        loss.backward()
        learner.before_update()         # first `score_batches` steps: DCES scores, nothing moves, then
                                        # the branches shrink to the selected channels
        optimizer.step()                # step hooks project every center update onto the free subspace
    learner.end_task(run_forward)       # covariance of this task's center inputs, fold, unfreeze
    handle.remove()

While a task trains, each trained convolution carries a :class:`~lightning_cskl.core.center.CenterBranch` beside
it: the module's type, its parameter names and its ``state_dict`` keys stay what they were (a checkpoint written
mid-task loads into the plain architecture), and the branch's centers are not parameters of the model; the
learner adds them to every optimizer it is attached to, in the group of their convolution's weight. Everything
that must survive a checkpoint is in :meth:`CenterKernelLearner.state_dict` (tensors and plain values) and in the
model's own ``state_dict``. The learner imports torch only.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from .batchnorm import FrozenBatchNorm
from .center import CenterBranch, attached_branch, center_slice
from .config import CenterKernelConfig
from .covariance import CovarianceCollector, all_reduce_sum_
from .layers import NoEligibleLayerError, refuse_reparametrized, resolve_layers, resolve_train_also
from .projection import layer_projector, project_taps, project_update
from .selection import channel_scores, select_channels
from .step import ConstrainedStep, StepHandle

__all__ = ["BASE", "CenterKernelLearner", "DIVERGED_STEPS", "IDLE", "NoEligibleLayerError", "Phase", "SCORING", "TRAINING", "resolve_layers",
           "resolve_train_also"]

log = logging.getLogger(__name__)

#: the phases of a task (``CenterKernelLearner.phase``): between tasks, the base session, DCES scoring, training
Phase = Literal["idle", "base", "scoring", "training"]
IDLE: Phase = "idle"
BASE: Phase = "base"
SCORING: Phase = "scoring"
TRAINING: Phase = "training"
_PHASES = (IDLE, BASE, SCORING, TRAINING)


#: options that were renamed, so that the one name holds in both doors and the CLI (Avalanche's ``criterion`` is the loss)
_RENAMED = {"criterion": "projection_criterion"}

_HELD = "held:"  # step-hook names of the parameters a scoring step keeps in place

#: consecutive steps with non-finite gradients at the end of a task that count as diverged training
DIVERGED_STEPS = 3


@dataclass
class _Layer:
    """What the learner knows about one trained layer; the live module is looked up by name."""

    name: str
    groups: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    in_place: bool  # the conv's own weight trains (mask mode); else a CenterBranch holds the centers


def _relative_output_change(before: Tensor, after: Tensor, cov: Optional[Tensor], groups: int) -> float:
    """``sqrt(tr(ΔW Σ ΔWᵀ) / tr(W Σ Wᵀ))`` for center weights ``(D, C/g)`` before and after an update and a
    per-group covariance ``(g, C/g, C/g)`` of their inputs (``nan`` without a covariance or an output)."""
    if cov is None:
        return float("nan")
    grouped = [w.to(torch.float64).reshape(groups, w.shape[0] // groups, -1) for w in (after - before, before)]
    cov = cov.to(torch.float64)
    moved, base = (torch.einsum("gdc,gce,gde->", w, cov, w) for w in grouped)
    return float((moved / base).clamp_min(0).sqrt()) if base > 0 else float("nan")


class CenterKernelLearner:
    """The method, independent of any training framework.

    Args:
        config: the method's options (:class:`CenterKernelConfig`); keyword options may be given instead, or
            beside it to override its fields.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
        ...                     nn.Flatten(), nn.Linear(4 * 16, 2))
        >>> learner = CenterKernelLearner(layers=["2"], first_task="center", score_batches=1)
        >>> learner.bind(net)
        >>> learner.begin_task()
        >>> opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
        >>> handle = learner.attach_optimizer(opt)
        >>> for _ in range(3):
        ...     opt.zero_grad(); net(torch.randn(8, 1, 4, 4)).sum().backward()
        ...     learner.before_update(); opt.step()
        >>> learner.end_task(lambda: net(torch.randn(8, 1, 4, 4)))
        >>> handle.remove(); learner.tasks_seen
        1
    """

    def __init__(self, config: Optional[CenterKernelConfig] = None, **options: Any) -> None:
        known = set(CenterKernelConfig().as_dict())
        unknown = sorted(set(options) - known)
        if unknown:
            hints = "".join(f" ({k!r} is now called {_RENAMED[k]!r})" for k in unknown if k in _RENAMED)
            raise TypeError(f"unknown option(s) {unknown}{hints}; the method's options are: {', '.join(sorted(known))}")
        if config is not None and options:
            # options at their default values count as not given (configuration tools such as LightningCLI pass
            # every published option); the others override the config's fields
            defaults = CenterKernelConfig().as_dict()
            options = {k: v for k, v in options.items() if k not in defaults or v != defaults[k]}
            config = CenterKernelConfig(**{**config.as_dict(), **options}) if options else config
        self.config = config if config is not None else CenterKernelConfig(**options)
        self.model: Optional[nn.Module] = None
        self.layers: dict[str, _Layer] = {}
        # state that survives checkpoints
        self.tasks_seen = 0
        self.phase: Phase = IDLE
        self.scored_batches = 0
        self.covariances: dict[str, Tensor] = {}
        self.score_sums: dict[str, Tensor] = {}
        self.selected: dict[str, Tensor] = {}
        self.start_centers: dict[str, Tensor] = {}
        self.start_values: dict[str, Tensor] = {}  # every trained tensor as the task's training began
        self.update_effect: dict[str, dict[str, float]] = {}
        self.skipped_steps = 0
        self.training_steps = 0  # steps of this task past DCES scoring
        self.diverged_tasks = 0  # tasks whose training diverged and was undone
        self._skip_run = 0  # consecutive skipped steps up to now
        self._skip_run_start = 0  # the step where that run began
        self._skip_run_layers: list[str] = []  # the trained tensors whose gradient was non-finite then
        # derived, rebuilt on demand
        self.free_bases: dict[str, Tensor] = {}
        self.free_dims: dict[str, int] = {}
        self.new_selection = False
        self._flags: dict[int, bool] = {}
        self._frozen_bn = FrozenBatchNorm()
        self._collector: Optional[CovarianceCollector] = None  # the end-of-task pass's, while it runs
        self._grad_masks: dict[str, Tensor] = {}
        self._optimizers: list[weakref.ref] = []  # optimizers the branches' centers are added to
        self._held: dict[int, weakref.ref] = {}  # every center ever added to an optimizer, by id
        # bound methods, not lambdas: a deep copy of the learner (a callback copied by the user) then projects
        # its own tensors
        self._holding = False  # this step scored channels: what the optimizer moves is put back after it
        self._clear_state = False  # the selection was made: the optimizer's state of scoring steps is dropped
        self._step = ConstrainedStep(self._constrained_tensors, self._projected, active=self._projecting,
                                     on_done=self._step_done)

    # ------------------------------------------------------------------ structure
    def bind(self, model: nn.Module) -> None:
        """Resolve the trained layers of ``model`` and keep its ``requires_grad`` flags (idempotent; the model's
        modules are not changed).

        Raises:
            NoEligibleLayerError: see :func:`resolve_layers`, or a selected convolution's weight is reparametrized.
        """
        if self.model is model and self.layers:
            return
        names = resolve_layers(model, self.config.layers)
        resolve_train_also(model, self.config.train_also, names)  # a typo fails now, not when task 2 starts
        if self.covariances and set(self.covariances) != set(names):
            raise ValueError(
                f"the model's trained layers {names} differ from the layers this learner protects "
                f"{sorted(self.covariances)}: bind the same architecture with the same `layers`"
            )
        for name in names:
            refuse_reparametrized(name, model.get_submodule(name))
        self._flags = {id(p): p.requires_grad for p in model.parameters()}
        self.layers = {}
        for name in names:
            conv = model.get_submodule(name)
            self.layers[name] = _Layer(name, conv.groups, conv.in_channels, conv.out_channels,
                                       tuple(conv.kernel_size), self.config.mode == "mask")
        self.model = model

    def unbind(self) -> nn.Module:
        """Fold every branch back, restore ``requires_grad`` and BatchNorm behaviour; return the plain model."""
        model = self._require_model()
        self._release_batchnorm()
        self._fold_branches()
        for p in model.parameters():
            if id(p) in self._flags:
                p.requires_grad_(self._flags[id(p)])
        self.model, self.layers, self.free_bases, self._grad_masks = None, {}, {}, {}
        self._optimizers = []
        return model

    def branch(self, name: str) -> Optional[CenterBranch]:
        """The :class:`~lightning_cskl.core.center.CenterBranch` of layer ``name`` while one is attached."""
        return attached_branch(self._require_model().get_submodule(name))

    def trained_tensor(self, name: str) -> Tensor:
        """The tensor that trains for layer ``name``: its branch's centers, or the conv weight in mask mode.

        Raises:
            RuntimeError: the layer trains no tensor now (between tasks, in the base session).
        """
        if self.layers[name].in_place:
            return self._require_model().get_submodule(name).weight
        branch = self.branch(name)
        if branch is None:
            raise RuntimeError(f"layer {name!r} has no center branch in phase {self.phase!r}")
        return branch.param

    def full_center(self, name: str) -> Tensor:
        """The whole center ``(out_channels, in_channels // groups)`` of layer ``name`` as the model computes now."""
        conv = self._require_model().get_submodule(name)
        branch = attached_branch(conv)
        if branch is not None:
            return branch.full_center()
        return conv.weight[center_slice(conv.kernel_size)].detach().clone()

    def _center_view(self, name: str, tensor: Tensor) -> Tensor:
        """The center taps of a trained tensor (itself for a center branch)."""
        layer = self.layers[name]
        return tensor[center_slice(layer.kernel_size)] if tensor.dim() > 2 else tensor

    def _branch_params(self) -> list[nn.Parameter]:
        model = self._require_model()
        branches = (attached_branch(model.get_submodule(name)) for name in self.layers)
        return [branch.param for branch in branches if branch is not None]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that move in the current task (centers, plus ``train_also`` modules)."""
        return list(self._named_trainable().values())

    def _named_trainable(self) -> dict[str, nn.Parameter]:
        """:meth:`trainable_parameters` by name (a branch's under ``"<layer>:branch"``)."""
        model = self._require_model()
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for name in self.layers:
            branch = attached_branch(model.get_submodule(name))
            if branch is not None and branch.param.requires_grad:
                named[f"{name}:branch"] = branch.param
        return named

    @contextlib.contextmanager
    def task_start_weights(self) -> Iterator[bool]:
        """Within the block the model computes as it did when this task's training began (every trained tensor
        holds its value from then; nothing else moved in the task), then it is put back. Yields whether anything
        was swapped (False outside training, or before DCES has chosen the channels).

        This is how the backbone before the update is known exactly, for a pass over the task's data under both
        (drift-carried statistics, feature distillation), at the cost of a copy of the trained tensors.

        Example:
            >>> # with learner.task_start_weights(): old_features = model(x)
        """
        named = self._named_trainable() if self.model is not None and self.phase == TRAINING else {}
        pairs = [(p, self.start_values[n]) for n, p in named.items() if n in self.start_values]
        saved = [p.detach().clone() for p, _ in pairs]
        collector, paused = self._collector, self._collector is not None and self._collector.paused
        with torch.no_grad():
            for p, start in pairs:
                p.copy_(start)
        if collector is not None:  # inside the end-of-task pass: the old backbone's inputs are not this task's
            collector.paused = True
        try:
            yield bool(pairs)
        finally:
            if collector is not None:
                collector.paused = paused
            with torch.no_grad():
                for (p, _), value in zip(pairs, saved):
                    p.copy_(value)

    def _branch_channels(self, name: str) -> Optional[Tensor]:
        """The input channels layer ``name``'s branch holds in this phase (None: all)."""
        selected, layer = self.selected.get(name), self.layers[name]
        sliceable = layer.groups in (1, layer.in_channels)  # plain or depthwise: a general grouped conv is masked
        if self.phase != TRAINING or selected is None or not sliceable or bool(selected.all()):
            return None
        return selected.nonzero().squeeze(1)

    def _sync_branches(self) -> None:
        """Attach, replace or fold the branches so that they match the phase, the selection, the device and the
        dtype (Lightning's ``*-true`` precisions cast the model after ``setup``)."""
        model = self._require_model()
        wanted = self.phase in (SCORING, TRAINING)
        for name, layer in self.layers.items():
            if layer.in_place:
                continue
            conv = model.get_submodule(name)
            branch = attached_branch(conv)
            channels = self._branch_channels(name) if wanted else None
            if branch is not None:
                same = (wanted and branch.param.device == conv.weight.device
                        and branch.param.dtype == conv.weight.dtype
                        and branch.gradient_filter == self.config.gradient_filter
                        and branch.elements == self.config.elements
                        and (branch.channels is None) == (channels is None)
                        and (channels is None or torch.equal(branch.channels.cpu(), channels.cpu())))
                if same:
                    continue
                self._release(branch.param)
                branch.fold()
            if wanted:
                branch = CenterBranch(conv, channels, self.config.gradient_filter, self.config.elements)
                self._hold(branch.param, conv.weight)

    def _fold_branches(self, release: bool = True) -> None:
        model = self._require_model()
        for name in self.layers:
            branch = attached_branch(model.get_submodule(name))
            if branch is not None:
                if release:
                    self._release(branch.param)
                branch.fold()

    def _hold(self, param: nn.Parameter, weight: Tensor) -> None:
        """Add ``param`` to the optimizers that hold ``weight``, in its group; if none does, to the first attached
        optimizer's first group (one optimizer steps a center, never two)."""
        optimizers = [o for o in (ref() for ref in self._optimizers) if o is not None]
        holding = [o for o in optimizers if any(weight is q for g in o.param_groups for q in g["params"])]
        self._held[id(param)] = weakref.ref(param)
        for optimizer in holding or optimizers[:1]:
            if any(param is q for group in optimizer.param_groups for q in group["params"]):
                continue
            groups = [g for g in optimizer.param_groups if any(weight is q for q in g["params"])]
            (groups or optimizer.param_groups)[0]["params"].append(param)

    def forget_centers(self, optimizer: torch.optim.Optimizer) -> None:
        """Take every center this learner ever added out of ``optimizer`` (parameters and state), leaving the
        rest as it is: for an optimizer reused across tasks after a task that ended by an exception (its centers
        were left in it so that a checkpoint of its state could resume the task)."""
        held = {key for key, ref in self._held.items() if ref() is not None}
        self._held = {key: self._held[key] for key in held}
        for group in optimizer.param_groups:
            group["params"][:] = [q for q in group["params"] if id(q) not in held]
        for param in [p for p in optimizer.state if id(p) in held]:
            optimizer.state.pop(param, None)

    def _release(self, param: nn.Parameter) -> None:
        """Take ``param`` and its state out of every attached optimizer (in place: LBFGS keeps the list)."""
        for ref in self._optimizers:
            optimizer = ref()
            if optimizer is None:
                continue
            for group in optimizer.param_groups:
                group["params"][:] = [q for q in group["params"] if q is not param]
            optimizer.state.pop(param, None)

    # ------------------------------------------------------------------ task lifecycle
    @property
    def is_base_task(self) -> bool:
        return self.tasks_seen == 0 and self.config.first_task == "full"

    def begin_task(self) -> None:
        """Enter a task: freeze, keep BatchNorm frozen, and choose channels (unless DCES must score first).

        A task restored mid-way from :meth:`load_state_dict` continues where it stopped.
        """
        self._require_model()
        if self.phase == IDLE:
            self.score_sums, self.selected, self.scored_batches = {}, {}, 0
            self.start_centers = {} if self.is_base_task else {n: self.full_center(n).cpu() for n in self.layers}
            if self.is_base_task:
                self.phase = BASE
            elif self.config.selection == "gradient":
                self.phase = SCORING
            else:
                self._select({})
            self.apply_trainability()
        else:
            self.apply_trainability()
            if self.phase == TRAINING:
                self._build_free_bases()

    def apply_trainability(self) -> None:
        """Set ``requires_grad`` and the branches for the current phase (idempotent, cheap).

        Branches follow the phase (none between tasks and in the base session; every channel while DCES scores;
        the selected channels while training) and the model's device: a model moved between ``begin_task`` and
        training (as Lightning does after ``setup``) gets its branches rebuilt where it now lives.
        """
        model = self._require_model()
        self._sync_branches()
        if self.phase in (IDLE, BASE):
            for p in model.parameters():
                p.requires_grad_(self._flags.get(id(p), True))
            self._release_batchnorm()
            return
        for p in model.parameters():
            p.requires_grad_(False)
        for name in self._train_also_modules():
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(self._flags.get(id(p), True))
        for name, layer in self.layers.items():
            if not layer.in_place:  # a train_also module that holds a trained conv must not train its kernel
                model.get_submodule(name).weight.requires_grad_(False)
            self.trained_tensor(name).requires_grad_(True)
        if self.config.freeze_batchnorm:
            self._frozen_bn.freeze(model)

    def _train_also_modules(self) -> list[str]:
        return resolve_train_also(self._require_model(), self.config.train_also, list(self.layers))

    def _release_batchnorm(self) -> None:
        self._frozen_bn.release()

    def end_task(self, run_forward: Callable[[], Any], fold: bool = True) -> None:
        """Record this task's center-input covariance, then fold the branches back and unfreeze.

        Args:
            run_forward: runs the model over (a representative part of) the task's data; it is called once
                in eval mode under ``torch.no_grad()`` while forward hooks collect center inputs. Forward calls it
                makes inside :meth:`task_start_weights` (the backbone before the update, for a carried statistics
                head) are not collected.
            fold: also unbind (the learner forgets the model; bind it again for the next task); the branches are
                folded back either way.

        If ``run_forward`` raises, the task is not recorded (``tasks_seen`` does not move) but the model is still
        folded back and unfrozen, and the error propagates.
        """
        if self.phase == SCORING:
            log.warning(
                "the task ended while DCES was still scoring (%d of score_batches=%d steps): no center and no "
                "head weight moved in this task; use more steps per task or a smaller score_batches",
                self.scored_batches, self.config.score_batches,
            )
        diverged = self._diverged()
        if diverged:
            self._restore_start(diverged)
        elif self.skipped_steps:
            log.warning("%d optimizer steps of this task had non-finite gradients and were skipped (nothing moved "
                        "in them); NaN or infinite inputs, or a learning rate too large, cause this",
                        self.skipped_steps)
        try:
            self.record(run_forward)
        finally:  # also when the pass raised: the model is never left with branches and frozen
            self.phase = IDLE
            self.skipped_steps = self.training_steps = self._skip_run = 0
            self.score_sums, self.free_bases, self._grad_masks = {}, {}, {}
            self._step.clear()
            self.start_centers, self.start_values = {}, {}
            if fold:
                self.unbind()
            else:
                self.apply_trainability()
            self._optimizers = []

    def _diverged(self) -> str:
        """Why this task's training counts as diverged ("" if it does not): a trained tensor holds NaN or infinity,
        or the task ended on :data:`DIVERGED_STEPS` or more consecutive steps with non-finite gradients (isolated
        skipped steps, such as a batch with a NaN pixel, do not count)."""
        if self.phase != TRAINING:
            return ""
        broken = [n for n, p in self._named_trainable().items() if not bool(torch.isfinite(p.detach()).all())]
        if broken:
            return f"trained values became non-finite ({', '.join(broken)})"
        if self._skip_run >= DIVERGED_STEPS:
            where = f" (first in {', '.join(self._skip_run_layers)})" if self._skip_run_layers else ""
            return (f"every step from step {self._skip_run_start} of {self.training_steps} on had non-finite "
                    f"gradients{where}")
        return ""

    def _restore_start(self, why: str) -> None:
        """Put every trained tensor back to its value when this task's training began (the model before the task)
        and say so; the task's data is still recorded from that model, so the projection state stays valid."""
        named = self._named_trainable()
        with torch.no_grad():
            for name, start in self.start_values.items():
                if name in named:
                    named[name].copy_(start)
        log.warning(
            "this task's training diverged: %s. The model was put back to its state before the task (nothing of "
            "this task was learned; its data is recorded from that model, so the next task can run). Try a lower "
            "learning rate, or gradient clipping.", why)
        self.diverged_tasks += 1

    def record(self, run_forward: Callable[[], Any]) -> None:
        """Add the center-input covariance of the data that ``run_forward`` feeds through the model.

        Call it directly to protect what a pretrained model knows (a base task learned elsewhere).
        """
        model = self._require_model()
        collector = CovarianceCollector({n: model.get_submodule(n) for n in self.layers})
        was_training = model.training
        model.eval()
        self._collector = collector
        try:
            with collector.hooked(), torch.no_grad():
                run_forward()
        finally:
            self._collector = None
            model.train(was_training)
        if collector.skipped:
            log.warning("samples with non-finite center inputs were left out of the recorded covariances: %s",
                        collector.skipped)
        new_covariances = {name: cov.detach().cpu() for name, cov in collector.covariances().items()}
        self.update_effect = self._measure_effect(new_covariances)
        for name, cov in new_covariances.items():
            self.covariances[name] = self.covariances[name] + cov if name in self.covariances else cov
        self.tasks_seen += 1

    def _measure_effect(self, new_covariances: dict[str, Tensor]) -> dict[str, dict[str, float]]:
        """Where this task's center update acts: on the inputs of this task or of the old ones.

        For the update ``ΔW`` of a layer's centers since the task began and a covariance ``Σ`` of center inputs,
        ``tr(ΔW Σ ΔWᵀ)`` is the mean squared change of the center tap's output. Each is given relative to the
        output of the centers at the task's start, ``sqrt(tr(ΔW Σ ΔWᵀ) / tr(W₀ Σ W₀ᵀ))``: ``"new"`` on this task's
        inputs, ``"old"`` on the old tasks' (``nan`` before any old task).
        """
        effect: dict[str, dict[str, float]] = {}
        for name, start in self.start_centers.items():
            now = self.full_center(name).cpu()
            groups = self.layers[name].groups
            effect[name] = {data: _relative_output_change(start, now, cov, groups)
                            for data, cov in (("new", new_covariances.get(name)), ("old", self.covariances.get(name)))}
            log.info("layer %s: the task's center update changed the center output by %.3g on its own inputs and "
                     "%.3g on old tasks' inputs (relative)", name, effect[name]["new"], effect[name]["old"])
        return effect
    # ------------------------------------------------------------------ selection & projection
    def _select(self, score_sums: dict[str, Tensor]) -> None:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * self.tasks_seen)
        self.selected = {}
        for name, layer in self.layers.items():
            if cfg.selection == "gradient":
                scores = channel_scores(score_sums[name], layer.groups)
            elif cfg.selection == "magnitude":
                scores = channel_scores(self.full_center(name), layer.groups)
            else:
                scores = torch.rand(layer.in_channels, generator=generator)
            self.selected[name] = select_channels(scores.cpu(), cfg.channel_ratio)
        self.phase = TRAINING
        self._clear_state = True
        self.apply_trainability()  # the branches shrink to the selected channels
        self.start_values = {n: p.detach().clone() for n, p in self._named_trainable().items()}
        self._build_free_bases()
        self.new_selection = True

    def _build_free_bases(self) -> None:
        cfg = self.config
        energy = min(1.0, cfg.energy + cfg.energy_step * max(0, self.tasks_seen - 1))
        self.free_bases, self.free_dims, self._grad_masks = {}, {}, {}
        for name, layer in self.layers.items():
            tensor = self.trained_tensor(name)
            cg = layer.in_channels // layer.groups
            selected = self.selected[name]
            channels = None if layer.in_place else self._branch_channels(name)
            if cfg.project and name in self.covariances:
                basis, free = layer_projector(
                    self.covariances[name], selected, cfg.projection_criterion, cfg.null_space_factor, energy,
                    cfg.null_space_reference, cfg.relative_threshold, cfg.importance_scale,
                )
            else:  # no projection: the basis is the selected coordinate vectors (masking only)
                eye = torch.eye(cg, dtype=torch.float64).expand(layer.groups, cg, cg)
                basis = eye * selected.reshape(layer.groups, 1, cg).to(torch.float64)
                free = selected.reshape(layer.groups, cg).sum(1)
            if channels is not None:  # the branch holds only the selected channels (depthwise: groups): so does its basis
                basis = basis[:, channels.cpu()] if layer.groups == 1 else basis[channels.cpu()]
            self.free_bases[name] = basis.to(device=tensor.device, dtype=tensor.dtype)
            self.free_dims[name] = int(free.sum())
            if channels is None:  # every channel is held: the unselected ones are masked
                self._grad_masks[name] = selected.reshape(layer.groups, 1, cg).to(device=tensor.device,
                                                                                   dtype=tensor.dtype)

    def selection_stats(self) -> dict[str, float]:
        """Per layer: number of selected channels and free-subspace dimension (for loggers)."""
        stats: dict[str, float] = {}
        for name, mask in self.selected.items():
            stats[f"cskl/{name}/selected_channels"] = float(mask.sum())
            if name in self.free_dims:
                stats[f"cskl/{name}/free_dim"] = float(self.free_dims[name])
        for name, effect in self.update_effect.items():
            for data, value in effect.items():
                stats[f"cskl/{name}/update_effect_{data}"] = value
        return stats

    # ------------------------------------------------------------------ per step
    def before_update(self) -> None:
        """Call after backward and before ``optimizer.step()`` (gradients final: averaged, unscaled).

        While DCES scores a task, it adds the center gradients to the channel scores, drops the centers'
        gradients and zeroes the model's (plugins such as SI read them), and the step hooks put back whatever the
        step moves (weight decay), so the step moves nothing; a step with non-finite gradients (one the AMP scaler
        will skip) is not counted. Afterwards it zeroes the gradients of unselected channels (where a branch holds
        every channel) and non-center taps (mask mode), and drops every gradient of a step whose
        gradients are not finite (a NaN input, a diverging optimizer), so that nothing moves in that step, as
        AMP does; such steps are counted in ``skipped_steps`` and reported when the task ends.
        """
        self._holding = False
        self._reduce_branch_gradients()
        if self.phase == SCORING:
            self._score_step()
        elif self.phase == TRAINING:
            self.training_steps += 1
            if self._gradients_finite():
                self._skip_run = 0
                self._mask_gradients()
            else:
                self._skip_step()

    def _skip_step(self) -> None:
        """A training step with non-finite gradients moves nothing; a run of them is remembered with where it
        began, so that a task that ends on one can say that its training diverged, and from where."""
        self.skipped_steps += 1
        if not self._skip_run:
            self._skip_run_start = self.training_steps
            named = self._named_trainable()
            broken = [n for n, p in named.items() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            if len(broken) == len(named) > 3:
                self._skip_run_layers = ["every trained tensor: the loss itself was non-finite"]
            else:
                self._skip_run_layers = broken[:3] + ([f"{len(broken) - 3} more"] if len(broken) > 3 else [])
        self._skip_run += 1
        for p in self.trainable_parameters():
            p.grad = None

    def _reduce_branch_gradients(self) -> None:
        """Average the centers' gradients over processes (DDP averages only the model's own parameters)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for param in self._branch_params():
            if param.grad is not None:
                all_reduce_sum_(param.grad).div_(dist.get_world_size())

    def _gradients_finite(self) -> bool:
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if not grads:
            return True
        with torch.no_grad():
            return bool(torch.stack([g.detach().float().abs().sum() for g in grads]).isfinite().all())


    def _score_step(self) -> None:
        model = self._require_model()
        with torch.no_grad():
            grads = {}
            for name in self.layers:
                grad = self.trained_tensor(name).grad
                if grad is not None:
                    grads[name] = self._center_view(name, grad).detach().to(torch.float64)
            # every trainable gradient, not only the centers': a step the AMP scaler skips must not count
            finite = self._gradients_finite()
            for p in self._branch_params():
                p.grad = None
            # the model's own gradients are zeroed, not dropped: plugins that read every trainable parameter's
            # gradient after the step (Avalanche's SI, RWalk) find one; the step hooks put back whatever the optimizer
            # moves (weight decay), and the optimizer's state of these steps is dropped once the channels are chosen
            self._holding = True
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            if not finite:
                return
            for name, grad in grads.items():
                self.score_sums[name] = self.score_sums[name] + grad if name in self.score_sums else grad
        self.scored_batches += 1
        if self.scored_batches >= self.config.score_batches:
            missing = [n for n in self.layers if n not in self.score_sums]
            if missing:
                raise RuntimeError(
                    f"layers {missing} received no gradient while DCES scored channels: they are not used in "
                    "the loss, or the optimizer was built before the learner froze the model"
                )
            self._select(self.score_sums)
            self.score_sums = {}

    def _mask_gradients(self) -> None:
        with torch.no_grad():
            for name, layer in self.layers.items():
                tensor = self.trained_tensor(name)
                if tensor.grad is None:
                    continue
                grad = tensor.grad
                if layer.in_place and any(k > 1 for k in layer.kernel_size):
                    center = grad[center_slice(layer.kernel_size)].clone()
                    grad.zero_()
                    grad[center_slice(layer.kernel_size)] = center
                    grad = grad[center_slice(layer.kernel_size)]
                if name not in self._grad_masks:  # a branch of the selected channels only: nothing to mask
                    continue
                d, cg = grad.shape[:2]
                grad.view(layer.groups, d // layer.groups, cg, -1).mul_(self._grad_masks[name].unsqueeze(-1))

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> StepHandle:
        """Add the branches' centers to ``optimizer`` and hook its ``step`` so that every update of a center is
        projected; remove the handle after.

        A center joins the attached optimizer that holds its convolution's weight, in that weight's parameter group
        (if none holds it: the first attached optimizer's first group), now and whenever a branch is rebuilt during
        the task (when DCES has chosen the channels); it leaves when the task ends. The pre-hook only snapshots the centers (optimizers that take a closure compute
        gradients inside ``step``, after the pre-hook), the post-hook replaces the step by its projection
        (:class:`~lightning_cskl.core.step.ConstrainedStep`).
        """
        if not any(ref() is optimizer for ref in self._optimizers):
            self._optimizers.append(weakref.ref(optimizer))
        model = self._require_model()
        for name in self.layers:
            branch = attached_branch(model.get_submodule(name))
            if branch is not None:
                self._hold(branch.param, branch.conv.weight)
        return self._step.attach(optimizer)

    def _constrained_tensors(self) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        if self.phase == SCORING or self._holding:  # a scoring step: nothing may move
            model = self._require_model()
            tensors.update({f"{_HELD}{i}": p for i, p in enumerate(model.parameters()) if p.requires_grad})
        if self.phase == TRAINING:
            tensors.update({name: self.trained_tensor(name) for name in self.layers})
        return tensors

    def _projecting(self) -> bool:
        return self.phase in (SCORING, TRAINING) or self._holding

    def _step_done(self) -> None:
        self._holding = False
        if self._clear_state:  # the scoring steps leave no optimizer state (momentum of zero gradients, step counts)
            self._clear_state = False
            params = [p for p in self._require_model().parameters() if p.requires_grad] if self.model else []
            for optimizer in (ref() for ref in self._optimizers):
                if optimizer is not None:
                    for p in params:
                        optimizer.state.pop(p, None)

    def _projected(self, name: str, before: Tensor, after: Tensor) -> Tensor:
        """The tensor after a step: its center moved by the projected update, every other tap as before (a
        parameter held during a scoring step: as before)."""
        if name.startswith(_HELD):
            return before
        layer = self.layers[name]
        if not layer.in_place and before.dim() > 2:  # whole kernels: every tap's channel axis is projected
            return before + project_taps(after - before, self.free_bases[name])
        center_before = self._center_view(name, before)
        step = project_update(self._center_view(name, after) - center_before, self.free_bases[name])
        if not (layer.in_place and any(k > 1 for k in layer.kernel_size)):
            return center_before + step
        result = before.clone()  # non-center taps never move
        self._center_view(name, result).copy_(center_before + step)
        return result

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "config": self.config.as_dict(),
            "tasks_seen": self.tasks_seen,
            "phase": self.phase,
            "scored_batches": self.scored_batches,
            "covariances": {n: t.detach().cpu() for n, t in self.covariances.items()},
            "score_sums": {n: t.detach().cpu() for n, t in self.score_sums.items()},
            "selected": {n: t.detach().cpu() for n, t in self.selected.items()},
            "start_centers": {n: t.detach().cpu() for n, t in self.start_centers.items()},
            "start_values": {n: t.detach().cpu() for n, t in self.start_values.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; free_bases are rebuilt when the task continues."""
        if state.get("config", {}).get("layers", self.config.layers) != self.config.layers:
            raise ValueError(
                f"checkpoint was made with layers={state['config']['layers']!r}, this learner has "
                f"layers={self.config.layers!r}"
            )
        self.tasks_seen = int(state["tasks_seen"])
        if state["phase"] not in _PHASES:
            raise ValueError(f"the checkpoint's learner phase {state['phase']!r} is not one of {', '.join(_PHASES)}")
        self.phase = state["phase"]
        self.scored_batches = int(state["scored_batches"])
        self.covariances = dict(state["covariances"])
        self.score_sums = dict(state["score_sums"])
        self.selected = dict(state["selected"])
        self.start_centers = dict(state.get("start_centers", {}))
        self.start_values = dict(state.get("start_values", {}))
        self.free_bases = {}
        if self.model is not None and self.layers:
            device = next(iter(self.model.parameters())).device
            self.score_sums = {n: t.to(device) for n, t in self.score_sums.items()}
            self.apply_trainability()

    def suspend(self) -> None:
        """Leave the model plain (branches folded back with what they learned, ``requires_grad`` and BatchNorm as
        before the task) and keep the task's state, so that a checkpoint written now resumes it exactly
        (:meth:`begin_task` re-applies everything). Call it when training stops by an exception."""
        self._step.clear()
        self._release_batchnorm()
        if self.model is not None:
            # the centers stay in the optimizers: a checkpoint of their state written now must match the resumed
            # task's (an interrupted fit's optimizer is not used again)
            self._fold_branches(release=False)
            for p in self.model.parameters():
                p.requires_grad_(self._flags.get(id(p), p.requires_grad))
        self._optimizers = []

    def abort_task(self) -> None:
        """Forget an unfinished task (after an exception): the model is left plain as by :meth:`suspend`, with
        what the task taught it, and stays bound."""
        self.suspend()
        self.phase = IDLE
        self.score_sums, self.free_bases, self.start_centers, self.start_values = {}, {}, {}, {}

    def projection_state_bytes(self) -> int:
        """Bytes kept to protect old tasks: covariances, free_bases, channel masks and the trained tensors' values at
        the task's start (:meth:`task_start_weights`)."""
        tensors = [*self.covariances.values(), *self.free_bases.values(), *self.selected.values(),
                   *self.start_values.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("the learner is not bound to a model: call bind(model) first")
        return self.model
