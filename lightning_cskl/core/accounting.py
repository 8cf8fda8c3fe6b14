"""Per-step training cost: FLOPs, saved activations, gradients, optimizer state, step time.

Plain PyTorch, shared by CsKO and every baseline so that all methods are measured by the same code
(see the cost metrics of the evaluation protocol). Each function measures one thing of one training step:

* :func:`saved_activation_bytes`: bytes of the tensors autograd saves for backward, each storage once,
  weights and buffers excluded.
* :func:`training_flops`: FLOPs counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls,
  convolutions and their backward; frozen weights get no weight-gradient FLOPs; element-wise work such as
  the optimizer's update is not counted, projections are ``bmm`` and are).
* :func:`gradient_bytes`, :func:`optimizer_state_bytes`, :func:`trainable_parameter_count`.
* :func:`median_step_time`, :func:`median_step_times` (interleaved, for ratios measured side by side).

:func:`measure_step` runs all of them on one ``(inputs, targets)`` batch and returns a :class:`StepCost`.

Example:
    >>> net = nn.Linear(4, 2)
    >>> opt = torch.optim.Adam(net.parameters())
    >>> batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    >>> cost = measure_step(net, opt, nn.functional.cross_entropy, batch, repeats=2)
    >>> cost.trainable_parameters, cost.gradient_bytes, cost.flops      # flops: forward + weight gradient
    (10, 40, 256)
    >>> cost.saved_activation_bytes  # input 128 + log-softmax 64 + int64 targets 64 + loss weight sum 4
    260
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "StepCost",
    "conv_backward_flops",
    "gradient_bytes",
    "make_train_step",
    "measure_step",
    "median_step_time",
    "median_step_times",
    "optimizer_state_bytes",
    "saved_activation_bytes",
    "storage_bytes",
    "trainable_parameter_count",
    "training_flops",
]

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def _storage_key(tensor: Tensor) -> Optional[tuple[int, int]]:
    """``(data_ptr, nbytes)`` of the storage under ``tensor``; None for tensors without real storage."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested or meta-like tensors
        return None
    if storage.data_ptr() == 0 or storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes()


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages under ``tensors`` (a storage shared by views counts once).

    Whole storages are counted: a strided view keeps all of its base's memory alive.

    Example:
        >>> x = torch.zeros(10)                      # 40 bytes
        >>> storage_bytes([x, x[2:5], x.view(2, 5), torch.zeros(3)])
        52
    """
    seen: dict[int, int] = {}
    for tensor in tensors:
        key = _storage_key(tensor)
        if key is not None:
            seen[key[0]] = key[1]
    return sum(seen.values())


def _excluded_storages(exclude: Union[nn.Module, Iterable[Tensor], None]) -> set[int]:
    if exclude is None:
        return set()
    tensors = [*exclude.parameters(), *exclude.buffers()] if isinstance(exclude, nn.Module) else list(exclude)
    return {key[0] for key in map(_storage_key, tensors) if key is not None}


def saved_activation_bytes(fn: Callable[[], Any], exclude: Union[nn.Module, Iterable[Tensor], None] = None) -> int:
    """Bytes of the activations that autograd saves for backward while ``fn()`` runs.

    ``fn`` is typically a forward pass that produces a loss (what is saved then is what backward will need:
    the activation memory at the peak of a training step); it may also run backward. Every tensor handed to
    :func:`torch.autograd.graph.saved_tensors_hooks` is keyed by its untyped storage, so views of one tensor
    (and the same tensor saved by several operations) count once, and a saved view counts its whole storage.

    Weights are not activations: a saved :class:`torch.nn.Parameter` is skipped, and so is any saved tensor
    whose storage is that of a parameter or buffer of ``exclude`` (a reshaped weight, BatchNorm running
    statistics). Pass the model as ``exclude``. The model's input batch, when saved (by a trainable first
    layer), is counted: it is kept alive for backward like any other activation.

    While ``fn`` runs the storages seen are held, so an address freed and reused inside ``fn`` cannot merge
    two different storages.

    Args:
        fn: runs the computation to measure; its return value is dropped (the graph is freed afterwards).
        exclude: a module whose parameters and buffers are not counted, or an iterable of such tensors.

    Returns:
        Total bytes of the distinct non-weight storages saved for backward.

    Example:
        >>> lin = nn.Linear(5, 3)
        >>> x = torch.randn(4, 5)                          # 80 bytes: Linear saves its input only
        >>> saved_activation_bytes(lambda: lin(x).sum(), exclude=lin)
        80
        >>> with torch.no_grad():
        ...     saved_activation_bytes(lambda: lin(x).sum(), exclude=lin)
        0
    """
    excluded = _excluded_storages(exclude)
    held: dict[int, tuple[int, Any]] = {}

    def pack(tensor: Tensor) -> Tensor:
        if not isinstance(tensor, nn.Parameter):
            key = _storage_key(tensor)
            if key is not None and key[0] not in excluded and key[0] not in held:
                held[key[0]] = (key[1], tensor.untyped_storage())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    total = sum(nbytes for nbytes, _ in held.values())
    held.clear()
    return total


def _prod(values: Iterable[int]) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result


def conv_backward_flops(
    grad_out_shape: Sequence[int],
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: Sequence[bool],
    out_shape: Any = None,
    **_: Any,
) -> int:
    """FLOPs of ``aten.convolution_backward``, correct for grouped and depthwise convolutions.

    Each gradient costs as much as the forward convolution: ``2 · N · (positions) · prod(w_shape)`` where the
    weight shape ``(C_out, C_in / groups, *k)`` already accounts for groups and the positions are the output
    grid (the input grid for a transposed convolution). torch 2.14's own formula computes the weight-gradient
    term as a dense convolution over all ``C_in × C_out`` channel pairs, ignoring ``groups``: it overcounts a
    depthwise convolution's weight gradient by a factor of its channel count (upstream: pytorch/pytorch PR
    183405). The input-gradient term is the same as torch's.

    Example:
        >>> dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)   # 72 weights, 4×4 output, batch 2
        >>> x = torch.randn(2, 8, 4, 4, requires_grad=True)
        >>> training_flops(lambda: dw(x).sum().backward())   # forward + grad input + grad weight: 3 * 2*2*16*72
        13824
    """
    positions = _prod((x_shape if transposed else grad_out_shape)[2:])
    one_pass = 2 * int(x_shape[0]) * positions * _prod(w_shape)
    return one_pass * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def training_flops(step_fn: Callable[[], Any]) -> int:
    """FLOPs of ``step_fn()`` as counted by :class:`~torch.utils.flop_counter.FlopCounterMode`.

    Run one whole training step in ``step_fn`` (forward, backward, gradient masking, optimizer step with its
    hooks). The counter covers matrix products and convolutions, forward and backward; a frozen weight
    gets no weight-gradient FLOPs and a tensor that needs no input gradient gets no input-gradient FLOPs,
    so the saving of training fewer weights shows. Element-wise work (activations, BatchNorm, the optimizer's
    update) is not counted; a projection written as ``bmm``/``mm`` is. Convolution backward uses
    :func:`conv_backward_flops` (torch's formula ignores ``groups`` in the weight gradient).

    Example:
        >>> a, b = torch.randn(8, 16), torch.randn(16, 4)
        >>> training_flops(lambda: a @ b)                 # 2 * 8 * 16 * 4
        1024
    """
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step_fn()
    return int(counter.get_total_flops())


def gradient_bytes(params: Iterable[Tensor]) -> int:
    """Bytes of the ``.grad`` tensors that ``params`` hold now (each storage once; missing grads count 0).

    Measure right after backward (before ``zero_grad``), having cleared stale gradients beforehand.

    Example:
        >>> lin = nn.Linear(5, 3)                          # 18 parameters, 72 bytes
        >>> lin(torch.randn(2, 5)).sum().backward()
        >>> gradient_bytes(lin.parameters())
        72
        >>> _ = lin.requires_grad_(False).zero_grad(set_to_none=True)
        >>> gradient_bytes(lin.parameters())
        0
    """
    return storage_bytes(p.grad for p in params if p.grad is not None)


def _tensors_in(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, step counters, momentum buffers), storage once.

    The state exists only after the first step. Adam holds two moments per parameter plus a scalar step.

    Example:
        >>> lin = nn.Linear(5, 3)
        >>> opt = torch.optim.Adam(lin.parameters())
        >>> lin(torch.randn(2, 5)).sum().backward(); opt.step()
        >>> optimizer_state_bytes(opt)                     # 2 * 72 moment bytes + 2 float32 step counters
        152
    """
    return storage_bytes(t for state in optimizer.state.values() for t in _tensors_in(state))


def trainable_parameter_count(params: Union[nn.Module, Iterable[Tensor]]) -> int:
    """Number of elements of the distinct parameters that require a gradient.

    Example:
        >>> net = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
        >>> _ = net[0].requires_grad_(False)
        >>> trainable_parameter_count(net)
        8
    """
    tensors = params.parameters() if isinstance(params, nn.Module) else params
    unique = {id(p): p for p in tensors if p.requires_grad}
    return sum(p.numel() for p in unique.values())


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_step_times(
    step_fns: Mapping[str, Callable[[], Any]],
    warmup: int = 3,
    repeats: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median wall time in seconds of each step function, measured interleaved round-robin.

    Interleaving (a, b, c, a, b, c, ...) exposes every function to the same drift of a busy machine, so the
    ratios of the medians are fairer than timings taken one after another. Where CUDA is in use, each timed
    call is bracketed by ``torch.cuda.synchronize()``, so it counts the GPU work it queued.

    Args:
        step_fns: name -> a function that runs one training step.
        warmup: untimed rounds first (allocator, thread pool and optimizer state warm up).
        repeats: timed rounds.
        clock: the time source: wall time (default, what the protocol reports) or ``time.process_time``,
            the CPU time of this process, which does not count time spent descheduled on a machine shared
            with other jobs (meaningful with one torch thread: idle-spinning worker threads count too).

    Raises:
        ValueError: if ``repeats < 1`` or ``warmup < 0``.

    Example:
        >>> times = median_step_times({"a": lambda: None, "b": lambda: None}, warmup=0, repeats=3)
        >>> sorted(times) == ["a", "b"] and all(t >= 0 for t in times.values())
        True
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"warmup={warmup!r}, repeats={repeats!r} are not allowed: need warmup >= 0 and repeats >= 1")
    for _ in range(warmup):
        for fn in step_fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in step_fns}
    for _ in range(repeats):
        for name, fn in step_fns.items():
            _synchronize()
            start = clock()
            fn()
            _synchronize()  # a GPU step is done when its kernels are, not when Python has queued them
            samples[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def median_step_time(
    step_fn: Callable[[], Any], warmup: int = 3, repeats: int = 10, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median time in seconds of ``step_fn()`` over ``repeats`` calls after ``warmup`` calls (see
    :func:`median_step_times` for ``clock``).

    Example:
        >>> median_step_time(lambda: None, warmup=0, repeats=3) >= 0
        True
    """
    return median_step_times({"step": step_fn}, warmup, repeats, clock)["step"]


def make_train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batch: Batch, learner: Any = None
) -> Callable[[], Tensor]:
    """One training step as a closure: zero grads, forward, backward, ``learner.before_update()``, step.

    Args:
        model, optimizer, loss_fn: the training setup; ``loss_fn(model(inputs), targets)`` is the loss.
        batch: ``(inputs, targets)``, already on the model's device.
        learner: anything with ``before_update()`` (a :class:`~lightning_cskl.core.CenterKernelLearner`
            whose optimizer hooks are attached), or None for plain training.

    Returns:
        A function that runs the step and returns the detached loss.
    """
    inputs, targets = batch

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        if learner is not None:
            learner.before_update()
        optimizer.step()
        return loss.detach()

    return step


@dataclass
class StepCost:
    """The cost of one training step of one method (bytes, FLOPs and seconds).

    Attributes:
        trainable_parameters: elements of the parameters that require a gradient.
        flops: FLOPs of forward + backward + optimizer step (projection included), see :func:`training_flops`.
        saved_activation_bytes: see :func:`saved_activation_bytes`.
        gradient_bytes: ``.grad`` bytes after backward.
        optimizer_state_bytes: bytes of the optimizer's state after a step.
        projection_state_bytes: what the method keeps between steps and tasks for its projection
            (covariances, free_bases, channel masks); 0 for methods without one.
        step_time_s: median wall time of one step, or None when not timed.
        forward_flops: FLOPs of the forward pass and loss alone (None when not measured); the rest of
            ``flops`` is the backward pass and the optimizer step with its projection (:attr:`backward_flops`).
    """

    trainable_parameters: int
    flops: int
    saved_activation_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    projection_state_bytes: int = 0
    step_time_s: Optional[float] = None
    forward_flops: Optional[int] = None

    @property
    def backward_flops(self) -> Optional[int]:
        """``flops − forward_flops``: backward pass + optimizer step (the projection included); None if unknown.

        Example:
            >>> StepCost(10, 900, 0, 40, 80, forward_flops=300).backward_flops
            600
        """
        return None if self.forward_flops is None else self.flops - self.forward_flops

    @property
    def gradient_and_optimizer_bytes(self) -> int:
        """Gradients plus optimizer state."""
        return self.gradient_bytes + self.optimizer_state_bytes

    @property
    def training_memory_bytes(self) -> int:
        """Gradients + optimizer state + saved activations + projection state (frozen weights excluded)."""
        return self.gradient_and_optimizer_bytes + self.saved_activation_bytes + self.projection_state_bytes

    def as_dict(self) -> dict[str, Any]:
        """Fields and derived totals as plain values (for tables and loggers)."""
        values = asdict(self)
        values["backward_flops"] = self.backward_flops
        values["gradient_and_optimizer_bytes"] = self.gradient_and_optimizer_bytes
        values["training_memory_bytes"] = self.training_memory_bytes
        return values

    def ratios(self, baseline: "StepCost") -> dict[str, Optional[float]]:
        """Each quantity divided by the baseline's (None where the baseline's is 0 or missing).

        Example:
            >>> full = StepCost(100, 1000, 400, 400, 800, 0, 0.2)
            >>> StepCost(10, 400, 100, 40, 80, 16, 0.1).ratios(full)["gradient_and_optimizer_bytes"]
            0.1
        """
        ours, theirs = self.as_dict(), baseline.as_dict()
        result: dict[str, Optional[float]] = {}
        derived = ["backward_flops", "gradient_and_optimizer_bytes", "training_memory_bytes"]
        for name in [f.name for f in fields(self)] + derived:
            a, b = ours[name], theirs[name]
            result[name] = None if a is None or not b else a / b
        return result


def measure_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    batch: Batch,
    learner: Any = None,
    *,
    warmup: int = 3,
    repeats: int = 10,
    time_steps: bool = True,
) -> StepCost:
    """Measure every per-step cost of training ``model`` with ``optimizer`` on one batch.

    The model, optimizer and learner are used as they are (bring the learner to the state to measure,
    e.g. past its DCES scoring steps, before calling). Each measurement runs real steps, so weights move.
    Order: one step (creates optimizer state), saved activations of a forward pass in the model's current
    mode, gradient bytes after a backward, optimizer state after that step, FLOPs of one step and of its
    forward pass alone, then timing.

    Args:
        model, optimizer, loss_fn, batch, learner: see :func:`make_train_step`; ``learner`` may also
            provide ``projection_state_bytes()``, ``trainable_parameters()`` (tensors it trains beside the
            model's own parameters count as parameters) and ``extra_forward_passes()`` (no-gradient forward
            passes of the model that each step also runs, such as feature distillation's: their FLOPs are added
            to ``flops`` and ``forward_flops``; the timing does not run them).
        warmup, repeats: see :func:`median_step_time`.
        time_steps: False skips timing (``step_time_s`` is None).

    Returns:
        The :class:`StepCost`.
    """
    step = make_train_step(model, optimizer, loss_fn, batch, learner)
    inputs, targets = batch
    step()
    # a learner may train tensors held beside the model (CsKO's center branches): they count as parameters
    beside = list(learner.trainable_parameters()) if hasattr(learner, "trainable_parameters") else []
    params = list({id(p): p for p in [*model.parameters(), *beside]}.values())
    frozen = [*model.parameters(), *model.buffers(), *beside]
    saved = saved_activation_bytes(lambda: loss_fn(model(inputs), targets), exclude=frozen)
    for p in params:
        p.grad = None
    loss_fn(model(inputs), targets).backward()
    if learner is not None:
        learner.before_update()
    grads = gradient_bytes(params)
    optimizer.step()
    state = optimizer_state_bytes(optimizer)
    flops = training_flops(step)
    forward = training_flops(lambda: loss_fn(model(inputs), targets))
    passes = int(learner.extra_forward_passes()) if hasattr(learner, "extra_forward_passes") else 0
    if passes:  # e.g. the backbone before the update, for feature distillation: counted, not run by `step`
        with torch.no_grad():
            extra = passes * training_flops(lambda: model(inputs))
        flops, forward = flops + extra, forward + extra
    seconds = median_step_time(step, warmup, repeats) if time_steps else None
    projection = int(learner.projection_state_bytes()) if hasattr(learner, "projection_state_bytes") else 0
    return StepCost(
        trainable_parameters=trainable_parameter_count(params),
        flops=flops,
        saved_activation_bytes=saved,
        gradient_bytes=grads,
        optimizer_state_bytes=state,
        projection_state_bytes=projection,
        step_time_s=seconds,
        forward_flops=forward,
    )
