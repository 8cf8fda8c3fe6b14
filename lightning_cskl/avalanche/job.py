"""A whole run from a :class:`~lightning_cskl.options.RunConfig` (``cskl run``): the benchmark, the model, the
strategy, checkpoint and resume, W&B, and the results (JSON, heatmap, the printed report)."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from ..data.build import build_benchmark, input_channels
from ..options import ModelOptions, RunConfig, UsageError
from ..report import format_matrix, save_heatmap

__all__ = ["build_model", "run"]


def build_model(options: ModelOptions, in_channels: int, task_incremental: bool):
    """Backbone + Avalanche's expanding head (class-incremental) or per-task heads (task-incremental)."""
    from ..models import ResNetFeatures, SmallCNN, mobilenet_v2, resnet18
    from .models import ClassIncrementalNet, TaskIncrementalNet

    if options.width is not None and not options.width > 0:
        raise UsageError(f"model.width={options.width!r} is not allowed: it must be > 0")
    if options.name == "small_cnn":
        net = SmallCNN(2, in_channels, width=int(options.width or 32))
        backbone = net.features
    elif options.name == "resnet18":
        net = resnet18(2, in_channels, nf=int(options.width or 64))
        backbone = ResNetFeatures(net)
    else:
        net = mobilenet_v2(2, in_channels, width=float(options.width or 1.0))
        backbone = net.features
    head = TaskIncrementalNet if task_incremental else ClassIncrementalNet
    return head(backbone, net.feature_dim)




def _check(config: RunConfig, methods: Mapping[str, Callable[..., Any]]) -> None:
    positive = {"train.epochs": config.train.epochs, "train.batch_size": config.train.batch_size,
                "train.eval_batch_size": config.train.eval_batch_size, "data.classes_per_exp": config.data.classes_per_exp}
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"{name}={value!r} is not allowed: it must be an int >= 1")
    if not config.train.lr > 0:
        raise UsageError(f"train.lr={config.train.lr!r} is not allowed: it must be > 0")
    if config.train.threads is not None and config.train.threads < 1:
        raise UsageError(f"train.threads={config.train.threads!r} is not allowed: use null or an int >= 1")
    device = config.train.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"train.device={device!r} is not allowed here: this machine has no CUDA device "
                             "(use auto or cpu)")
    if config.data.train_per_class is not None and config.data.benchmark == "digits":
        raise UsageError("data.train_per_class is not allowed with data.benchmark='digits' (it has about 125 "
                         "training images per class): use it with fashion_mnist or fashion_digits")
    if config.method not in ("csko", "naive", *methods):
        raise UsageError(f"method={config.method!r} is not allowed: use csko, naive or one of {', '.join(methods)}")


def run(config: RunConfig, methods: Optional[Mapping[str, Callable[..., Any]]] = None) -> dict[str, Any]:
    """``cskl run``: a whole continual-learning run; prints the results and writes them to the run folder.

    Args:
        config: the run.
        methods: strategies besides ``csko`` and ``naive`` that ``config.method`` may name: name -> a function
            taking Avalanche's strategy keywords (``cskl run`` passes the comparison registry).

    Returns:
        The results written to ``results.json`` (accuracy matrix, ACC, AIA, forgetting, BWT, time, config).

    Example:
        >>> # run(RunConfig(method="csko"))  # what `cskl run` does, Split Digits by default
    """
    methods = dict(methods or {})
    _check(config, methods)
    name = config.name or f"{Path(config.data.benchmark.split(':')[-1]).name}-{config.data.scenario}-{config.method}"
    folder = Path(config.output_dir) / name
    _check_writable(folder)  # before the data loads
    began = time.perf_counter()
    benchmark = build_benchmark(config.data)

    import torch

    threads = torch.get_num_threads()
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    try:
        return _run(config, benchmark, name, folder, began, methods)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) keep their setting


def _run(config: RunConfig, benchmark: Any, name: str, folder: Path, began: float,
         methods: Mapping[str, Callable[..., Any]]) -> dict[str, Any]:
    import torch
    from avalanche.training import Naive

    from ..core import NoEligibleLayerError
    from .run import run_continual
    from .strategy import CSKLStrategy
    from .wandb_logger import WandbLogger

    device = config.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    task_incremental = config.data.scenario == "task"
    in_channels = input_channels(benchmark)

    def make_strategy(evaluator):
        try:
            return build_strategy(evaluator)
        except NoEligibleLayerError:
            raise
        except ValueError as error:  # an option the strategy refused at construction
            raise UsageError(str(error)) from None

    def build_strategy(evaluator):
        torch.manual_seed(config.seed)
        model = build_model(config.model, in_channels, task_incremental)
        t = config.train
        if t.optimizer == "adam":
            optimizer = torch.optim.Adam(model.parameters(), t.lr, weight_decay=t.weight_decay)
        else:
            optimizer = torch.optim.SGD(model.parameters(), t.lr, momentum=0.9, weight_decay=t.weight_decay)
        plugins = []
        if t.lr_decay_epoch is not None:
            from avalanche.training.plugins import LRSchedulerPlugin

            plugins.append(LRSchedulerPlugin(torch.optim.lr_scheduler.MultiStepLR(optimizer, [t.lr_decay_epoch], 0.1),
                                             reset_scheduler=True, reset_lr=True))
        common = dict(model=model, optimizer=optimizer, train_mb_size=t.batch_size, train_epochs=t.epochs,
                      eval_mb_size=t.eval_batch_size, device=device, evaluator=evaluator, plugins=plugins)
        if config.method == "naive":
            return Naive(**common)
        if config.method != "csko":
            return methods[config.method](**common)
        return CSKLStrategy(**common, config=config.engine, **asdict(config.strategy))

    plain_config = asdict(config)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "checkpoint.pt" if config.checkpoint else None
    _check_resume(plain_config, folder, checkpoint, config.resume)
    logger = None
    if config.wandb.mode != "disabled":
        logger = WandbLogger(project=config.wandb.project, name=name, config=plain_config, mode=config.wandb.mode,
                             dir=folder)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "No loggers specified")  # with wandb.mode=disabled, on purpose
            identity = {k: v for k, v in plain_config.items() if k not in _RESUME_FREE}
            result = run_continual(benchmark, make_strategy, checkpoint=checkpoint, resume=config.resume,
                                   progress=config.progress, loggers=[logger] if logger else [], identity=identity)
    finally:
        if logger is not None:
            logger.finish()
    seconds = time.perf_counter() - began

    results = {**result.as_dict(), "seconds": round(seconds, 1), "name": name, "config": plain_config}
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = result.summary
    save_heatmap(result.accuracy, folder / "accuracy.png",
                 f"{name}\nACC {summary['acc']:.3f}, AIA {summary['aia']:.3f}, forgetting {summary['forgetting']:.3f}")
    _report(result, summary, folder, logger, seconds)
    return results


def _check_writable(folder: Path) -> None:
    """Refuse an output folder that cannot be created or written, naming it and the reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".cskl-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"output folder {folder} cannot be written ({error.strerror or error}): choose another "
                         "output_dir or name") from None


# what may differ between an interrupted run and its resumption
_RESUME_FREE = ("resume", "progress", "output_dir", "name", "wandb")


def _check_resume(plain_config: dict[str, Any], folder: Path, checkpoint: Optional[Path], resume: bool) -> None:
    """Refuse to resume a checkpoint written by a run with another config; record this run's config."""
    record = folder / "config.json"
    if resume and checkpoint is not None and checkpoint.is_file():
        if not record.is_file():
            raise UsageError(f"resume=true: {checkpoint} has no config.json beside it, so its config is unknown; "
                             "use another name, or resume=false to start afresh")
        saved = json.loads(record.read_text())
        changed = sorted(
            f"{group}.{key}" if isinstance(value, dict) else group
            for group, value in plain_config.items() if group not in _RESUME_FREE
            for key in (value if isinstance(value, dict) else [None])
            if (saved.get(group, {}).get(key) if isinstance(value, dict) else saved.get(group)) !=
               (value[key] if isinstance(value, dict) else value)
        )
        if changed:
            raise UsageError(f"resume=true: {checkpoint} was written with another config ({', '.join(changed)} "
                             "differ); rerun with the same config, another name, or resume=false to start afresh")
        return
    if checkpoint is not None and checkpoint.is_file():
        # a fresh run: an earlier checkpoint must never pair with this config.json, and is kept, not deleted
        kept = checkpoint.with_name("checkpoint.previous.pt")
        os.replace(checkpoint, kept)
        print(f"{checkpoint} of an earlier run was moved to {kept} (resume=false starts afresh; "
              "--resume true continues an interrupted run)", file=sys.stderr)
        previous_config = record.with_name("config.previous.json")
        if record.is_file():
            os.replace(record, previous_config)
    record.write_text(json.dumps(plain_config, indent=2) + "\n")


def _report(result: Any, summary: dict[str, float], folder: Path, logger: Any, seconds: float) -> None:
    print("\naccuracy matrix (row i: after training experience i; column j: tested on experience j)")
    print(format_matrix(result.accuracy))
    print(f"\nACC (after the last experience)  {summary['acc']:.3f}")
    print(f"average incremental accuracy     {summary['aia']:.3f}")
    print(f"forgetting                       {summary['forgetting']:.3f}")
    print(f"BWT                              {summary['bwt']:.3f}")
    print(f"\n{result.completed} experiences in {seconds:.0f} s; results in {folder / 'results.json'}, "
          f"heatmap in {folder / 'accuracy.png'}")
    run_dir = getattr(logger, "run_dir", None)
    if run_dir is not None and run_dir.name.startswith("offline-run-"):
        print(f"W&B offline run in {run_dir}; upload it with:  wandb sync {run_dir}")


