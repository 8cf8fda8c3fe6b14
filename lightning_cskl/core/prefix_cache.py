"""The frozen prefix computed once per task: later epochs and the task-end pass start at the lowest trained layer.

During an incremental task every module that runs before the lowest trained convolution is frozen (parameters
fixed, BatchNorm frozen by :class:`~lightning_cskl.core.batchnorm.FrozenBatchNorm`), so for a sample that does not
change between epochs its output is the same every epoch. :class:`PrefixCache` stores, per sample index of the
task's dataset, the input of a *cut* module (the lowest trained convolution, or the smallest module around it
whose input carries everything the rest of the model needs: on a ResNet the residual block, whose shortcut reads
the same input). A batch whose samples are all stored then runs with every module before the cut skipped (its
``forward`` answers a zero placeholder of the right shape) and the cut's input taken from the store.

Nothing is trusted, everything is checked:

- the cut is chosen by running one batch both ways (eval mode, no gradient, random state restored) and comparing
  the outputs; a model whose outputs differ (a skip connection around the cut, glue code that needs the real
  prefix) gets no cache;
- the first fully stored batch of every pass (epoch, task-end pass) runs the prefix anyway and compares what it
  computes with what is stored: random augmentation, or any transform that changes a sample between passes,
  switches the cache off for the rest of the task;
- a prefix with a trainable parameter or a BatchNorm / dropout in training mode gets no cache;
- a store larger than the budget is never allocated;
- a prefix too cheap to be worth storing is not stored: the cache pays only where recomputing a stored value costs
  more than writing it once and reading it every later pass. The prefix's FLOPs per value it would store
  (:class:`torch.utils.flop_counter.FlopCounterMode`, counted on the probe batch) must reach ``min_flops``
  (:data:`DEFAULT_MIN_FLOPS`). On this project's CPU (``benchmarks/prefix_cache.py``) a first conv block of
  18 FLOPs per value (the SmallCNN's) costs as much to store and read as to recompute; a slim ResNet-18 cut at
  its last block spends thousands per value and runs a 4-epoch task twice as fast.

Each of these says so in one log line (``lightning_cskl.core.prefix_cache``, level WARNING; INFO for a prefix too
cheap to store, where nothing is wrong) and the task goes on uncached, with the same results. Storage is float32
(exact: the same values the prefix computes), float16, or 8-bit with a scale per sample and channel
(:class:`PrefixStore`). The cache lives for one task, on the device of the cut's input, and never goes into a
checkpoint (a resumed task rebuilds it). Imports torch only.

Example:
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
    ...                     nn.Flatten(), nn.Linear(4 * 16, 2))
    >>> _ = net[0].requires_grad_(False)    # the prefix is frozen, as during a task
    >>> cache = PrefixCache("on", min_flops=0)         # this toy prefix is too cheap to be worth it otherwise
    >>> cache.begin_task(net, ["2"], size=8)
    True
    >>> x = torch.randn(8, 1, 4, 4); index = torch.arange(8)
    >>> with cache.batch(index, lambda: net(x)):      # first pass: runs the prefix, stores the input of net[2]
    ...     first = net(x)
    >>> cache.new_pass()
    >>> with cache.batch(index, lambda: net(x)):      # checks the store once per pass ...
    ...     _ = net(x)
    >>> with cache.batch(index, lambda: net(x)):      # ... then net[0] and net[1] are skipped
    ...     again = net(x)
    >>> torch.equal(first, again), cache.cut, cache.nbytes, cache.hits
    (True, '2', 2048, 1)
    >>> cache.end_task()
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .batchnorm import frozen_batchnorm_forward

__all__ = ["DEFAULT_BUDGET_BYTES", "DEFAULT_MIN_FLOPS", "CachePrecision", "PrefixCache", "PrefixCacheConfig",
           "PrefixCacheSetting", "PrefixStore", "validate_min_flops", "validate_prefix_cache", "validate_precision"]

log = logging.getLogger(__name__)

CachePrecision = Literal["float32", "float16", "int8"]
PrefixCacheSetting = Union[Literal["off", "on"], bool, int]
PRECISIONS: tuple[str, ...] = ("float32", "float16", "int8")

#: the budget of ``prefix_cache="on"``: 2 GiB holds the SmallCNN bench's largest task in float32 (12,000
#: Fashion-MNIST images, 1.2 GB) and leaves most of a 23 GB machine to the rest of the run
DEFAULT_BUDGET_BYTES = 2 * 2**30

#: the least FLOPs the prefix must spend per value it stores for the cache to be used. Measured on this project's
#: CPU (one thread, batch 64): recomputing a 3×3 conv + BatchNorm + ReLU block of 18 FLOPs per output value takes
#: 1.6 ns per value, writing it into the store 2 ns and reading it back 0.8 ns, so over a 4-epoch task its cache
#: saves nothing (the SmallCNN's measured task time: 0.95×); at 54 FLOPs per value (a 3→64 stem at 32×32) the
#: recompute takes 3.8 ns and the same task saves about 3× what the writes cost
DEFAULT_MIN_FLOPS = 32.0

# the largest difference between a sample's recomputed prefix output and its stored value that still counts as
# "the same sample", relative to the largest magnitude of its channel: float32 keeps the values exactly (the CPU
# kernels give a sample the same result whatever batch it is in; 1e-5 leaves room for GPU reductions), float16
# rounds each value by at most 2^-11 of itself, 8-bit by half a step of its stored scale (about amax/127)
_STALE_TOLERANCE = {"float32": 1e-5, "float16": 2.0**-10, "int8": 0.6 / 127}
# outputs of the skipping forward and the plain one, relative to the plain output's largest magnitude
_CUT_TOLERANCE = 1e-5


def validate_prefix_cache(value: Any) -> Optional[int]:
    """The budget in bytes that ``prefix_cache`` asks for (None: off).

    Example:
        >>> validate_prefix_cache("on") == DEFAULT_BUDGET_BYTES, validate_prefix_cache("off")
        (True, None)
        >>> validate_prefix_cache(10**9)
        1000000000
    """
    if value is None or value is False or value == "off":  # `is`: 0 and 1 are budgets, refused or taken as such
        return None
    if value is True or value == "on":
        return DEFAULT_BUDGET_BYTES
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(f"prefix_cache={value!r} is not allowed: use 'on' (a budget of {DEFAULT_BUDGET_BYTES} bytes), "
                     "'off', or a budget in bytes (an int > 0)")


def validate_min_flops(value: Any) -> float:
    """``prefix_cache_min_flops``: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"prefix_cache_min_flops={value!r} is not allowed: use a number >= 0 (FLOPs the prefix "
                         "must spend per value it stores; 0 stores any prefix)")
    return float(value)


def validate_precision(value: Any) -> CachePrecision:
    """``prefix_cache_precision``: one of ``float32``, ``float16``, ``int8``."""
    if value not in PRECISIONS:
        raise ValueError(f"prefix_cache_precision={value!r} is not allowed: use one of {', '.join(PRECISIONS)}")
    return value


@dataclass
class PrefixCacheConfig:
    """The prefix cache's options (:class:`~lightning_cskl.avalanche.CSKLStrategy`,
    :class:`~lightning_cskl.avalanche.CSKLPlugin`, ``cskl run``'s ``strategy:`` section).

    Args:
        prefix_cache: compute the frozen prefix (every module before the lowest trained layer) once per
            incremental task and train later epochs, and run the end-of-task pass, from its stored output: ``"on"``
            (default, a budget of :data:`DEFAULT_BUDGET_BYTES`), ``"off"``, or a budget in bytes. Over budget, with
            a sample that changes between epochs (random augmentation) or a prefix that trains, the task runs
            uncached with a one-line notice.
        prefix_cache_precision: storage of the prefix: ``"float32"`` (default; the results are the uncached
            run's), ``"float16"`` or ``"int8"`` (a scale per sample and channel).
        prefix_cache_min_flops: the cost rule: the prefix must spend at least this many FLOPs per value it would
            store (default :data:`DEFAULT_MIN_FLOPS`), else storing and reading it costs as much as recomputing it
            and the task runs uncached (one INFO line). 0 caches any frozen prefix.

    Example:
        >>> PrefixCacheConfig(prefix_cache=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: prefix_cache=0 is not allowed: use 'on' (a budget of 2147483648 bytes), 'off', or a budget ...
    """

    prefix_cache: PrefixCacheSetting = "on"
    prefix_cache_precision: CachePrecision = "float32"
    prefix_cache_min_flops: float = DEFAULT_MIN_FLOPS

    def __post_init__(self) -> None:
        validate_prefix_cache(self.prefix_cache)
        validate_precision(self.prefix_cache_precision)
        validate_min_flops(self.prefix_cache_min_flops)

    def build(self) -> "PrefixCache":
        """The cache these options describe."""
        return PrefixCache(self.prefix_cache, self.prefix_cache_precision, self.prefix_cache_min_flops)


class PrefixStore:
    """``size`` samples of one shape at a storage precision, written and read by sample index.

    ``int8`` keeps, per sample and channel (the first axis after the batch), a bfloat16 scale of about ``amax / 127``
    and the values rounded to multiples of it: 1 byte per value plus 2 per channel.

    Example:
        >>> store = PrefixStore(4, (2, 3), "int8", torch.device("cpu"), torch.float32)
        >>> store.write(torch.tensor([1, 3]), torch.tensor([[[0.0, 1.0, 2.0], [4.0, -4.0, 1.0]]] * 2))
        >>> store.filled.tolist(), [round(v, 2) for v in store.read(torch.tensor([3]))[0, 1].tolist()], store.nbytes
        ([False, True, False, True], [4.0, -4.0, 1.02], 40)
    """

    def __init__(self, size: int, sample_shape: Sequence[int], precision: CachePrecision, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.precision, self.dtype, self.sample_shape = precision, dtype, tuple(sample_shape)
        storage = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}[precision]
        self.values = torch.empty((size, *self.sample_shape), dtype=storage, device=device)
        channels = self.sample_shape[:1] if precision == "int8" else None
        self.scales = (torch.empty((size, *channels), dtype=torch.bfloat16, device=device)
                       if channels is not None else None)
        self.filled = torch.zeros(size, dtype=torch.bool)

    @staticmethod
    def bytes_needed(size: int, sample_shape: Sequence[int], precision: CachePrecision) -> int:
        values = size * int(torch.Size(sample_shape).numel())
        if precision == "int8":
            return values + 2 * size * (int(sample_shape[0]) if sample_shape else 1)
        return values * (2 if precision == "float16" else 4)

    @property
    def nbytes(self) -> int:
        tensors = [self.values] + ([self.scales] if self.scales is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def _channel_amax(self, x: Tensor) -> Tensor:
        """Per sample and channel ``max |x|``, shaped to broadcast against ``x``."""
        flat = x.detach().abs().reshape(x.shape[0], *x.shape[1:2], -1) if x.dim() > 1 else x.detach().abs()[:, None]
        amax = flat.amax(-1)
        return amax.reshape(amax.shape + (1,) * (x.dim() - amax.dim()))

    def write(self, index: Tensor, x: Tensor) -> None:
        index = index.to(self.values.device)
        with torch.no_grad():
            if self.precision == "int8":
                # bfloat16: float32's range (no subnormal scale for a channel near zero); enlarged by 2^-8 before its
                # rounding (at most 2^-9) so that amax / scale never exceeds 127 and nothing is clipped
                scale = (self._channel_amax(x.float()) / 127 * (1 + 2.0**-8)).clamp_min(1e-30).to(torch.bfloat16)
                self.values[index] = (x.float() / scale.float()).round_().clamp_(-127, 127).to(torch.int8)
                self.scales[index] = scale.reshape(self.scales[index].shape)
            else:
                self.values[index] = x.detach().to(self.values.dtype)
        self.filled[index.cpu()] = True

    def read(self, index: Tensor) -> Tensor:
        index = index.to(self.values.device)
        values = self.values[index]
        if self.precision == "int8":
            scale = self.scales[index].float()
            return (values.float() * scale.reshape(scale.shape + (1,) * (values.dim() - scale.dim()))).to(self.dtype)
        return values.to(self.dtype)

    def differs(self, index: Tensor, x: Tensor) -> bool:
        """Whether ``x`` (freshly computed for samples ``index``) is not what the store holds for them, beyond the
        storage precision's rounding."""
        with torch.no_grad():
            fresh = x.detach().float()
            stored = self.read(index).float()
            amax = self._channel_amax(fresh)
            if self.precision == "int8":  # half a step of the scale actually stored
                scale = self.scales[index.to(self.values.device)].float()
                amax = scale.reshape(scale.shape + (1,) * (fresh.dim() - scale.dim())) * 127
            bound = _STALE_TOLERANCE[self.precision] * amax + 1e-6 * float(amax.max()) + 1e-30
            return bool(((fresh - stored).abs() > bound).any())


class _Probe:
    """One forward pass's order of module calls, and the first input of each candidate cut."""

    def __init__(self, model: nn.Module, candidates: Sequence[str]) -> None:
        self.model, self.candidates = model, list(candidates)
        self.calls: dict[str, list[tuple[int, int]]] = {}  # name -> (enter, exit) per call
        self.outputs: dict[str, Any] = {}  # name -> the output of its first call
        self.inputs: dict[str, Any] = {}  # candidate -> the first positional input of its first call
        self._clock = 0
        self._open: dict[str, list[int]] = {}

    @contextlib.contextmanager
    def hooked(self) -> Iterator["_Probe"]:
        handles = []
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(functools.partial(self._enter, name)))
            handles.append(module.register_forward_hook(functools.partial(self._exit, name)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _enter(self, name: str, module: nn.Module, args: tuple) -> None:
        self._open.setdefault(name, []).append(self._tick())
        if name in self.candidates and name not in self.inputs and args and isinstance(args[0], Tensor):
            self.inputs[name] = args[0].detach()

    def _exit(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        self.calls.setdefault(name, []).append((self._open[name].pop(), self._tick()))
        self.outputs.setdefault(name, output)


def _tensors(value: Any) -> list[Tensor]:
    """The tensors of a model output (a tensor, or nested tuples / lists / dicts of them)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _same_output(plain: Any, skipped: Any) -> bool:
    a, b = _tensors(plain), _tensors(skipped)
    if not a or len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return False
    if not any(x.numel() for x in a):  # an empty output (a head with no class yet) cannot tell two cuts apart
        return False
    for x, y in zip(a, b):
        x, y = x.detach().float(), y.detach().float()
        scale = float(x.abs().max()) if x.numel() else 0.0
        if not bool(((x - y).abs() <= _CUT_TOLERANCE * scale + 1e-12).all()):
            return False
    return True


@contextlib.contextmanager
def _quiet_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (each module's flag restored after), no gradient, random state restored: a pass that changes
    nothing a training run would see (no BatchNorm statistics move, no random draw is used up)."""
    flags = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def _flop_counter() -> Any:
    """A quiet FLOP counter (no table printed, no module hierarchy kept)."""
    return FlopCounterMode(display=False, depth=None)


def _is_frozen_batchnorm(module: nn.Module) -> bool:
    forward = vars(module).get("forward")
    return isinstance(forward, functools.partial) and forward.func is frozen_batchnorm_forward


class _Plan:
    """Where the model is cut: the cut module, the outermost modules that run before it (skipped when reading),
    their outputs' shapes (for the placeholders), and every module that runs before it."""

    def __init__(self, cut: str, skipped: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]],
                 before: frozenset = frozenset()) -> None:
        self.cut, self.skipped, self.before = cut, skipped, before


class PrefixCache:
    """The prefix of one task, stored per sample (see the module's docstring).

    Args:
        setting: ``"on"`` (a budget of :data:`DEFAULT_BUDGET_BYTES`), ``"off"``, or a budget in bytes.
        precision: ``"float32"`` (the results are those of an uncached run), ``"float16"`` or ``"int8"``.
        min_flops: the least FLOPs the prefix must spend per value it stores (:data:`DEFAULT_MIN_FLOPS`).

    Per task: :meth:`begin_task` once the model is frozen for it, :meth:`new_pass` at the start of every epoch
    and of the task-end pass, :meth:`batch` around every forward of a batch (with the batch's sample indices), and
    :meth:`end_task` (frees the store). Why the cache is off, if it is, is in :attr:`reason`.
    """

    def __init__(self, setting: PrefixCacheSetting = "on", precision: CachePrecision = "float32",
                 min_flops: float = DEFAULT_MIN_FLOPS) -> None:
        self.budget = validate_prefix_cache(setting)
        self.precision = validate_precision(precision)
        self.min_flops = validate_min_flops(min_flops)
        #: FLOPs the prefix spends per value it stores (measured on the task's probe batch; None before)
        self.flops_per_value: Optional[float] = None
        self.model: Optional[nn.Module] = None
        self.size = 0
        self.reason = ""  # why the cache is off for this task ("" while it may be used)
        self._layers: list[str] = []
        self._plan: Optional[_Plan] = None
        self._store: Optional[PrefixStore] = None
        self._checked = False  # this pass's first fully stored batch was compared with the store
        self.hits = self.misses = 0  # batches read from the store / run through the prefix, in this task
        #: the last finished task's cut, store bytes, hits, misses and reason for being off ({} before any)
        self.last_task: dict[str, Any] = {}
        self._open = contextlib.ExitStack()  # the hooks of the batch opened by open_batch

    @property
    def enabled(self) -> bool:
        return self.budget is not None

    @property
    def active(self) -> bool:
        """The cache may be used for the rest of this task."""
        return self.model is not None and not self.reason

    @property
    def cut(self) -> Optional[str]:
        """The module whose input is stored (None before the first batch, or when off)."""
        return self._plan.cut if self._plan is not None else None

    @property
    def nbytes(self) -> int:
        """Bytes the store holds now."""
        return self._store.nbytes if self._store is not None else 0

    # ------------------------------------------------------------------ task
    def begin_task(self, model: nn.Module, trained: Sequence[str], size: Optional[int]) -> bool:
        """Start a task whose trained layers are ``trained`` (qualified module names) and whose dataset holds
        ``size`` samples (None: its samples have no stable index). Call it after the model is frozen for the task.
        Returns whether the cache may be used."""
        self.end_task()
        if not self.enabled:
            return False
        self.model, self._layers, self.size = model, list(trained), int(size or 0)
        if size is None:
            self._off("the task's dataset gives no stable sample index")
        elif not self._layers:
            self._off("no layer is trained")
        return self.active

    def end_task(self) -> None:
        """Close an open batch, free the store and forget the task (what it did stays in :attr:`last_task`); also
        what a front door calls when training raises."""
        self.close_batch()
        if self.model is not None:
            self.last_task = {"cut": self.cut, "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                              "reason": self.reason, "flops_per_value": self.flops_per_value}
        self.model, self._plan, self._store, self.reason = None, None, None, ""
        self.flops_per_value = None
        self._layers, self.size, self._checked = [], 0, False
        self.hits = self.misses = 0

    def new_pass(self) -> None:
        """A new pass over the task's data begins (an epoch, the task-end pass): its first fully stored batch is
        checked against the store."""
        self._checked = False

    def _off(self, why: str, level: int = logging.WARNING) -> None:
        if not self.reason:
            self.reason = why
            log.log(level, "prefix cache off for this task: %s; it runs uncached (same results, no saving)", why)
        self._store = None

    # ------------------------------------------------------------------ batches
    def open_batch(self, index: Optional[Tensor], run: Optional[Callable[[], Any]]) -> None:
        """:meth:`batch` entered for a framework's training forward, which runs between two hooks: close it with
        :meth:`close_batch` (or :meth:`end_task`). A batch still open is closed first."""
        self.close_batch()
        self._open.enter_context(self.batch(index, run))

    def close_batch(self) -> None:
        """Leave the batch :meth:`open_batch` entered (nothing if none is open)."""
        self._open.close()

    @contextlib.contextmanager
    def batch(self, index: Optional[Tensor], run: Optional[Callable[[], Any]]) -> Iterator[None]:
        """Around the forward pass(es) of one batch whose samples are ``index`` (their positions in the task's
        dataset; None: unknown, the batch runs plainly). ``run`` runs the model's forward on this batch: the
        first batch of a task calls it to find and check the cut (without gradient, in eval mode; None: a batch
        before the cut is known runs plainly).

        Inside the block the model stores the cut's input (samples not all stored yet), compares it with the
        store (the pass's first fully stored batch), or skips the prefix and reads the store.
        """
        if index is None or not self.active:
            yield
            return
        index = index.detach().cpu().long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            self._off(f"a sample index ({int(index.max())}) lies outside the task's dataset of {self.size} samples")
            yield
            return
        if self._plan is None:
            if run is None:
                yield
                return
            self._plan = self._find_cut(run)
            if self._plan is None:
                yield
                return
        cut = self.model.get_submodule(self._plan.cut)
        stored = self._store is not None and bool(self._store.filled[index].all())
        if stored and self._checked:
            self.hits += 1
            with self._reading(cut, self._store.read(index)):
                yield
            return
        self.misses += 1
        compare = stored and not self._checked
        handle = cut.register_forward_pre_hook(functools.partial(self._capture, index, compare, [False]))
        try:
            yield
        finally:
            handle.remove()
        if compare and self.active:
            self._checked = True

    def _capture(self, index: Tensor, compare: bool, done: list, module: nn.Module, args: tuple) -> None:
        if done[0] or not self.active or not args or not isinstance(args[0], Tensor):
            return
        done[0] = True  # the first call of the batch's first forward: later ones (the task-start weights) are the same
        x = args[0]
        if x.shape[0] != index.numel():
            self._off(f"the input of {self._plan.cut!r} has {x.shape[0]} samples for a batch of {index.numel()}")
            return
        if compare:
            if self._store.differs(index, x):
                self._off(f"the input of {self._plan.cut!r} changed between passes over the same samples (random "
                          "augmentation, or a transform that is not the same every epoch)")
            return
        if self._store is None:
            shape = tuple(x.shape[1:])
            needed = PrefixStore.bytes_needed(self.size, shape, self.precision)
            if needed > self.budget:
                self._off(f"it needs {needed} bytes ({self.size} samples × {shape} in {self.precision}), over the "
                          f"budget prefix_cache={self.budget}")
                return
            self._store = PrefixStore(self.size, shape, self.precision, x.device, x.dtype)
        self._store.write(index, x)

    @contextlib.contextmanager
    def _reading(self, cut: nn.Module, stored: Tensor) -> Iterator[None]:
        """Inside: the modules before the cut answer placeholders and the cut reads ``stored`` (every forward of
        the block: the task-start weights' pass of a batch runs the model twice)."""
        batch = stored.shape[0]
        modules = {name: self.model.get_submodule(name) for name in self._plan.skipped}
        saved = {name: vars(m).get("forward") for name, m in modules.items()}

        def substitute(module: nn.Module, args: tuple) -> tuple:
            return (stored, *args[1:])

        def placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *args: Any,
                        **kwargs: Any) -> Tensor:
            # never read by what follows the cut (checked when the cut was chosen); expanded, so it costs no memory
            return torch.zeros((), dtype=dtype, device=device).expand(batch, *shape)

        handle = cut.register_forward_pre_hook(substitute)
        for name, module in modules.items():
            module.forward = functools.partial(placeholder, *self._plan.skipped[name])
        try:
            yield
        finally:
            handle.remove()
            for name, module in modules.items():
                if saved[name] is None:
                    vars(module).pop("forward", None)
                else:
                    module.forward = saved[name]

    # ------------------------------------------------------------------ the cut
    def _candidates(self, probe_calls: dict[str, list[tuple[int, int]]]) -> list[str]:
        """The lowest trained layer (the first one called) and the modules around it, innermost first."""
        called = [n for n in self._layers if n in probe_calls]
        if not called:
            return []
        lowest = min(called, key=lambda n: probe_calls[n][0][0])
        parts = lowest.split(".")
        return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]

    def _find_cut(self, run: Callable[[], Any]) -> Optional[_Plan]:
        model = self.model
        names = [n for n, _ in model.named_modules() if n]
        probe = _Probe(model, names)
        with _quiet_eval(model), probe.hooked(), _flop_counter() as counted:
            plain = run()
        plain_flops = counted.get_total_flops()
        candidates = self._candidates(probe.calls)
        if not candidates:
            self._off(f"none of the trained layers {self._layers} ran in the forward pass")
            return None
        modules = dict(model.named_modules())
        why = ""
        for cut in candidates:
            plan, why = self._plan_for(cut, probe, modules)
            if plan is None:
                continue
            self._plan = plan
            after = _Probe(model, [])
            try:
                # with the input the plain pass computed: the cut is checked apart from the storage precision. Every
                # module that runs from the cut on must answer as in the plain pass, not just the model's output
                # (which a head masking unseen classes, or one not trained yet, can make blind to its input)
                with _quiet_eval(model), self._reading(modules[cut], probe.inputs[cut]), after.hooked(), \
                        _flop_counter() as counted:
                    skipped = run()
                same = _same_output(plain, skipped) and all(
                    _same_output(output, after.outputs.get(name)) for name, output in probe.outputs.items()
                    if name not in plan.before and any(t.numel() for t in _tensors(output)))
            except Exception as error:  # glue code between the skipped modules that needs their real output
                same, why = False, f"skipping the modules before {cut!r} fails ({type(error).__name__}: {error})"
            finally:
                self._plan = None
            if same:
                self.flops_per_value = (plain_flops - counted.get_total_flops()) / max(probe.inputs[cut].numel(), 1)
                if self.flops_per_value < self.min_flops:
                    self._off(f"its prefix (every module before {cut!r}) spends {self.flops_per_value:.0f} FLOPs per "
                              f"value it would store, under prefix_cache_min_flops={self.min_flops:g}: storing and "
                              "reading it costs about what recomputing it does", level=logging.INFO)
                    return None
                return plan
            why = why or f"the output differs when the model starts at {cut!r} (something around it reads the prefix)"
        self._off(why)
        return None

    def _plan_for(self, cut: str, probe: _Probe, modules: dict[str, nn.Module]) -> tuple[Optional[_Plan], str]:
        calls = probe.calls
        if len(calls.get(cut, [])) != 1 or cut not in probe.inputs:
            return None, f"{cut!r} is called more than once per forward pass, or not with a tensor"
        start = calls[cut][0][0]
        ancestors = {".".join(cut.split(".")[:i]) for i in range(1, cut.count(".") + 1)} | {""}
        before = {n for n, c in calls.items() if n and n not in ancestors and n != cut
                  and not n.startswith(cut + ".") and all(exit < start for _, exit in c)}
        if not before:
            return None, f"the lowest trained layer {cut!r} takes the model's input: there is no prefix to store"
        top = sorted(n for n in before if n.rpartition(".")[0] not in before)
        for name in before:
            module = modules[name]
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                return None, f"the prefix is not frozen: {name!r} trains (a first task trained in full, `layers` or " \
                             "`train_also` reaching below the lowest trained layer)"
            unfrozen_bn = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and not \
                _is_frozen_batchnorm(module) and module.track_running_stats
            if unfrozen_bn or (isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0):
                return None, f"the prefix is not frozen: {name!r} ({type(module).__name__}) is in training mode"
        skipped = {}
        batch = probe.inputs[cut].shape[0]
        for name in top:
            output = probe.outputs.get(name)
            if not isinstance(output, Tensor) or output.dim() == 0 or output.shape[0] != batch:
                return None, f"{name!r} before the cut does not return one batched tensor"
            skipped[name] = (tuple(output.shape[1:]), output.dtype, output.device)
        return _Plan(cut, skipped, frozenset(before)), ""
