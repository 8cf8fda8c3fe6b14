"""A whole continual-learning run over an Avalanche benchmark: train each experience, evaluate on the whole
test stream, record the accuracy matrix, checkpoint after every experience, resume after an interruption.

Checkpoints hold our own state_dicts only (tensors and plain values, ``torch.load(weights_only=True)``):
the model, the optimizer, every plugin that has ``state_dict`` (the CSKL learner and prototypes), the
strategy's clock, the evaluator's scalar results, the accuracy matrix so far and the random states.
Avalanche's own ``save_checkpoint`` pickles whole objects and fails with this stack (ENV.md).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models.utils import avalanche_model_adaptation
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate

__all__ = [
    "CheckpointError",
    "ContinualResult",
    "NoDataError",
    "accuracy_summary",
    "load_checkpoint",
    "run_continual",
    "save_checkpoint",
    "train_base",
    "with_class_metadata",
]

CHECKPOINT_FORMAT = "lightning_cskl.avalanche.run/1"
_EXPERIENCE_ACCURACY = re.compile(r"^Top1_Acc_Exp/eval_phase/[^/]+/(?:Task\d+/)?Exp(\d+)$")

StrategyFactory = Callable[[EvaluationPlugin], SupervisedTemplate]


class NoDataError(ValueError):
    """The benchmark has no experiences (or no samples) to train or evaluate on."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or was written by another run."""


def with_class_metadata(benchmark: Any) -> Any:
    """``benchmark`` with ``classes_in_this_experience`` on its experiences, which expanding heads need.

    Benchmarks of Avalanche's ``benchmark_from_datasets`` lack it; they get Avalanche's own
    ``with_classes_timeline``. Others are returned unchanged.
    """
    stream = getattr(benchmark, "train_stream", None)
    try:
        if not stream or not len(stream):
            return benchmark
        stream[0].classes_in_this_experience
    except AttributeError:
        from avalanche.benchmarks.scenarios.supervised import with_classes_timeline

        return with_classes_timeline(benchmark)
    return benchmark


def accuracy_summary(accuracy: Sequence[Sequence[float]]) -> dict[str, float]:
    """PROTOCOL.md's metrics from ``accuracy[i][j]`` (accuracy on experience j after training experience i).

    Returns ``acc`` (mean of the last row), ``aia`` (mean over i of the mean over j ≤ i), ``forgetting``
    (mean over j < T of the best earlier accuracy minus the last) and ``bwt`` (mean over j < T of
    a[T][j] − a[j][j]); NaN where undefined (one row only).

    Example:
        >>> s = accuracy_summary([[1.0, 0.0], [0.5, 0.9]])
        >>> round(s["acc"], 3), round(s["aia"], 3), s["forgetting"], s["bwt"]
        (0.7, 0.85, 0.5, -0.5)
    """
    rows = [list(r) for r in accuracy]
    if not rows:
        return {"acc": math.nan, "aia": math.nan, "forgetting": math.nan, "bwt": math.nan}
    last = len(rows) - 1
    acc = sum(rows[last]) / len(rows[last])
    aia = sum(sum(r[: i + 1]) / (i + 1) for i, r in enumerate(rows)) / len(rows)
    if last == 0:
        return {"acc": acc, "aia": aia, "forgetting": math.nan, "bwt": math.nan}
    forgetting = sum(max(rows[i][j] for i in range(j, last)) - rows[last][j] for j in range(last)) / last
    bwt = sum(rows[last][j] - rows[j][j] for j in range(last)) / last
    return {"acc": acc, "aia": aia, "forgetting": forgetting, "bwt": bwt}


@dataclass
class ContinualResult:
    """The outcome of :func:`run_continual`.

    Attributes:
        accuracy: ``accuracy[i][j]``: accuracy on test experience j after training experience i (every
            experience of the test stream, unseen ones included).
        completed: experiences trained so far (``len(accuracy)``); fewer than the stream when stopped early.
        total: experiences in the training stream.
        metrics: the evaluator's last values after the final evaluation.
    """

    accuracy: list[list[float]]
    completed: int
    total: int
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, float]:
        """``acc``, ``aia``, ``forgetting`` and ``bwt`` (see :func:`accuracy_summary`)."""
        return accuracy_summary(self.accuracy)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON files and loggers."""
        return {"accuracy": self.accuracy, "completed": self.completed, "total": self.total, **self.summary}


# ---------------------------------------------------------------------------------------------- state
def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return None


def _stateful_plugins(strategy: SupervisedTemplate) -> dict[str, Any]:
    # keyed by class name (and rank among plugins of that class), so plugins without state may come and go
    found: dict[str, Any] = {}
    for plugin in strategy.plugins:
        if callable(getattr(plugin, "state_dict", None)) and callable(getattr(plugin, "load_state_dict", None)):
            name = type(plugin).__name__
            rank = sum(1 for key in found if key.split("#")[0] == name)
            found[name if rank == 0 else f"{name}#{rank}"] = plugin
    return found


def _rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))


def save_checkpoint(
    path: Union[str, os.PathLike], strategy: SupervisedTemplate, next_experience: int, accuracy: list[list[float]],
    identity: Optional[Mapping[str, Any]] = None,
) -> None:
    """Write the state of a run between experiences (atomically: a crash never leaves half a file); ``identity``
    (JSON values, e.g. the method and config) is stored with it and checked on resume."""
    evaluator = strategy.evaluator
    results = {}
    for name, (xs, ys) in evaluator.get_all_metrics().items():
        values = [_plain(y) for y in ys]
        if all(v is not None for v in values):
            results[name] = {"x": [int(x) for x in xs], "y": values}
    state = {
        "format": CHECKPOINT_FORMAT,
        "next_experience": int(next_experience),
        "accuracy": [list(map(float, row)) for row in accuracy],
        "model": strategy.model.state_dict(),
        "optimizer": strategy.optimizer.state_dict(),
        "plugins": {name: plugin.state_dict() for name, plugin in _stateful_plugins(strategy).items()},
        "clock": {k: v for k, v in vars(strategy.clock).items() if isinstance(v, int)},
        "evaluator": results,
        "rng": _rng_state(),
        "identity": json.loads(json.dumps(dict(identity))) if identity is not None else None,
    }
    _save_atomically(state, path)


def _save_atomically(value: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` through a partial file and a rename: a crash never leaves half a file, and a failed write
    (a full disk) leaves no partial file and says why."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(value, partial)
    except (OSError, RuntimeError) as error:  # torch reports a failed write as RuntimeError
        partial.unlink(missing_ok=True)
        full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)
        reason = "the disk is full" if full else str(error)
        raise OSError(errno.ENOSPC if full else getattr(error, "errno", None) or errno.EIO,
                      f"could not write {path}: {reason} (the previous file, if any, is unchanged)") from error
    os.replace(partial, path)


def load_checkpoint(path: Union[str, os.PathLike], identity: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is empty, truncated or foreign, or (with ``identity``) it was written by a
            run with another identity (e.g. another method or config).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an empty, truncated or random file: pickle, zip and torch raise all kinds
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(error).__name__}); delete it or start "
                              "afresh without resuming") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of lightning_cskl.avalanche.run_continual")
    if identity is not None and state.get("identity") != json.loads(json.dumps(dict(identity))):
        saved = state.get("identity") or {}
        changed = sorted(k for k in {*saved, *identity} if saved.get(k) != json.loads(json.dumps(identity.get(k))))
        raise CheckpointError(f"{path} was written by another run ({', '.join(changed) or 'identity'} differ): resume "
                              "with the same settings, or start afresh")
    return state


def _load_model(model: torch.nn.Module, weights: Mapping[str, Any], experiences: int, train_stream: Sequence[Any],
                eval_stream: Sequence[Any]) -> None:
    # Dynamic modules (expanding heads, per-task heads) take their shapes from the experiences they saw:
    # replay those adaptations, in the order a run makes them, before loading the weights.
    was_training = model.training
    for j in range(experiences):
        model.train()
        avalanche_model_adaptation(model, train_stream[j])
        model.eval()
        for experience in eval_stream:
            avalanche_model_adaptation(model, experience)
    model.train(was_training)
    model.load_state_dict(weights)


def _restore(strategy: SupervisedTemplate, state: dict[str, Any], train_stream: Sequence[Any], eval_stream: Sequence[Any]) -> None:
    _load_model(strategy.model, state["model"], state["next_experience"], train_stream, eval_stream)
    # per-parameter optimizer state is reset at every experience by design; keep the groups' hyper-parameters
    saved_groups = state["optimizer"]["param_groups"]
    if len(saved_groups) == len(strategy.optimizer.param_groups):
        for group, saved in zip(strategy.optimizer.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
    plugins = _stateful_plugins(strategy)
    for name, plugin_state in state["plugins"].items():
        if name not in plugins:
            raise ValueError(f"the checkpoint holds state for plugin {name!r}, which this strategy does not have "
                             f"(it has {sorted(plugins)}): build the strategy as for the interrupted run")
        plugins[name].load_state_dict(plugin_state)
    for key, value in state["clock"].items():
        setattr(strategy.clock, key, value)
    evaluator = strategy.evaluator
    for name, values in state["evaluator"].items():
        evaluator.all_metric_results[name] = (list(values["x"]), list(values["y"]))
        if values["y"]:
            evaluator.last_metric_results[name] = values["y"][-1]
    _set_rng_state(state["rng"])


# ---------------------------------------------------------------------------------------------- the run
def _accuracy_row(metrics: dict[str, Any], n_eval: int) -> list[float]:
    row: list[Optional[float]] = [None] * n_eval
    for name, value in metrics.items():
        match = _EXPERIENCE_ACCURACY.match(name)
        if match and int(match.group(1)) < n_eval:
            row[int(match.group(1))] = float(value)
    if any(v is None for v in row):
        raise ValueError(
            "the strategy's evaluator reported no per-experience accuracy: build the strategy with the "
            "`evaluator` that run_continual passes to the factory (or one with accuracy_metrics(experience=True))"
        )
    return row  # type: ignore[return-value]


def run_continual(
    benchmark: Any,
    strategy_factory: StrategyFactory,
    *,
    checkpoint: Union[str, os.PathLike, None] = None,
    resume: bool = True,
    stop_after: Optional[int] = None,
    progress: bool = True,
    loggers: Sequence[Any] = (),
    eval_stream: Optional[Sequence[Any]] = None,
    base: Union[str, os.PathLike, Mapping[str, Any], None] = None,
    identity: Optional[Mapping[str, Any]] = None,
) -> ContinualResult:
    """Train on every experience of ``benchmark.train_stream``; after each, evaluate on the whole test stream.

    Args:
        benchmark: an Avalanche benchmark (``train_stream`` and ``test_stream``).
        strategy_factory: ``factory(evaluator) -> strategy``; build model, optimizer and strategy inside, and
            pass ``evaluator`` to the strategy (it records the per-experience accuracy). A resumed run calls
            it again, so it must build the same thing every time.
        checkpoint: file written after every experience; if it exists and ``resume`` is True, the run
            continues after the last experience it holds.
        resume: False starts from scratch even if ``checkpoint`` exists (it is then overwritten).
        stop_after: stop after training this experience index (for staged runs; resume later).
        progress: show a tqdm bar over experiences.
        loggers: Avalanche loggers for the evaluator (e.g. :class:`~lightning_cskl.avalanche.WandbLogger`);
            loggers with ``log_summary`` also get the final accuracy matrix and metrics.
        eval_stream: stream to evaluate on (default ``benchmark.test_stream``).
        base: a base-session model to start from: its ``state_dict`` or a file holding one (``torch.save``),
            e.g. from :func:`train_base`. Experience 0 is then not trained: the model takes these weights, the
            strategy's end-of-experience work (covariances, prototypes, Fisher importances...) runs on them,
            and the run is evaluated and goes on as usual. Every method given the same ``base`` starts its
            incremental experiences from the same checkpoint (PROTOCOL.md).
        identity: what identifies the run (JSON values, e.g. the method and its config): written into the
            checkpoint, and a checkpoint written with another identity is refused on resume.

    Returns:
        A :class:`ContinualResult` (accuracy matrix, ACC, AIA, forgetting, BWT).

    Raises:
        NoDataError: the benchmark has no training experiences, or no evaluation experiences.

    Example:
        >>> # result = run_continual(split_digits_benchmark("class"), lambda evaluator: CSKLStrategy(
        >>> #     model=model, optimizer=opt, evaluator=evaluator, train_epochs=5), checkpoint="run.pt")
        >>> # result.accuracy, result.summary["acc"]
    """
    from tqdm.auto import tqdm

    benchmark = with_class_metadata(benchmark)
    train_stream = list(getattr(benchmark, "train_stream", None) or [])
    eval_stream = list(eval_stream if eval_stream is not None else getattr(benchmark, "test_stream", None) or [])
    if not train_stream or not eval_stream:
        raise NoDataError(
            f"the benchmark has no data: {len(train_stream)} training and {len(eval_stream)} evaluation "
            "experiences (check its data root and class split)"
        )
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), loggers=list(loggers), strict_checks=False
    )
    strategy = strategy_factory(evaluator)
    if strategy.evaluator is not evaluator:
        raise ValueError("strategy_factory must pass the evaluator it receives to the strategy (evaluator=evaluator)")

    accuracy: list[list[float]] = []
    start = 0
    if checkpoint is not None and resume and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint, identity)
        _restore(strategy, state, train_stream, eval_stream)
        accuracy = [list(row) for row in state["accuracy"]]
        start = state["next_experience"]
    elif base is not None:
        weights = base if isinstance(base, Mapping) else torch.load(base, map_location="cpu", weights_only=True)
        try:
            _load_model(strategy.model, weights, 1, train_stream, eval_stream)
        except RuntimeError as error:
            raise ValueError(f"base: the base-session weights do not fit the strategy's model ({error})") from error

    end = len(train_stream) if stop_after is None else min(len(train_stream), stop_after + 1)
    with tqdm(total=len(train_stream), initial=start, disable=not progress, unit="exp", desc="continual") as bar:
        for index in range(start, end):
            epochs = strategy.train_epochs
            if index == 0 and base is not None:
                strategy.train_epochs = 0  # the base session is loaded, not trained
            try:
                strategy.train(train_stream[index], eval_streams=[])
            finally:
                strategy.train_epochs = epochs
            metrics = strategy.eval(eval_stream)
            accuracy.append(_accuracy_row(metrics, len(eval_stream)))
            if checkpoint is not None:
                save_checkpoint(checkpoint, strategy, index + 1, accuracy, identity)
            seen = accuracy[-1][: index + 1]
            bar.set_postfix(seen_acc=f"{sum(seen) / len(seen):.3f}")
            bar.update(1)

    result = ContinualResult(accuracy, len(accuracy), len(train_stream), strategy.evaluator.get_last_metrics())
    if len(accuracy) == len(train_stream):
        summary = {f"final/{k}": v for k, v in result.summary.items()}
        summary["final/accuracy_matrix"] = accuracy
        for logger in loggers:
            if callable(getattr(logger, "log_summary", None)):
                logger.log_summary(summary)
    return result


def train_base(
    benchmark: Any,
    strategy_factory: StrategyFactory,
    path: Union[str, os.PathLike, None] = None,
) -> dict[str, Any]:
    """Train the base session (experience 0) once and return the model's ``state_dict``, for
    :func:`run_continual`'s ``base``: every method then starts from the same checkpoint (PROTOCOL.md).

    Args:
        benchmark, strategy_factory: as for :func:`run_continual`; build a strategy that trains every parameter
            (e.g. ``METHODS["full_finetune"]``) on the same network the methods will use.
        path: if given, the weights are also written there (atomically), loadable with
            ``torch.load(path, weights_only=True)``.

    Example:
        >>> # weights = train_base(bench, lambda ev: build_method("full_finetune", model=net(), ...), "base.pt")
        >>> # result = run_continual(bench, make_csko, base=weights)
    """
    built: list[SupervisedTemplate] = []

    def factory(evaluator: EvaluationPlugin) -> SupervisedTemplate:
        built.append(strategy_factory(evaluator))
        return built[-1]

    run_continual(benchmark, factory, stop_after=0, progress=False)
    weights = {k: v.detach().cpu().clone() for k, v in built[-1].model.state_dict().items()}
    if path is not None:
        _save_atomically(weights, path)
    return weights
