"""The ``cskl`` command: whole continual-learning runs from a YAML config, every key overridable.

    cskl run                                       # the embedded default: Split Digits, class-incremental, CsKO
    cskl run --config configs/fmnist_class.yaml    # a shipped config
    cskl run --engine.channel_ratio 0.5 --method naive --train.epochs 3
    cskl run --config configs/digits.yaml --print_config

A subcommand is one function taking one config dataclass, registered in :data:`SUBCOMMANDS`; jsonargparse
turns the dataclass into ``--group.key`` options, ``--config FILE.yaml`` and ``--print_config`` (LightningCLI
conventions). Bad input ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from torch import nn

from .core import CenterKernelConfig
from .report import format_matrix, save_heatmap
from .experiments.study import StudyConfig, run_study

__all__ = ["BenchConfig", "DataOptions", "ModelOptions", "RunConfig", "StrategyOptions", "TrainOptions",
           "WandbOptions", "bench", "main", "run"]  # `cskl study`: lightning_cskl.experiments.study

_BUILTIN_BENCHMARKS = ("digits", "fashion_mnist", "fashion_digits", "cifar100")
_DOWNLOAD_TIMEOUT_S = 30.0


class UsageError(ValueError):
    """The command's input is wrong; the message says what is allowed."""


# ---------------------------------------------------------------------------------------------- options
@dataclass
class DataOptions:
    """The benchmark.

    Args:
        benchmark: ``digits`` (scikit-learn's bundled 8×8 digits, always there), ``fashion_mnist`` (local files,
            see ``root``), ``fashion_digits`` (cross-dataset: the 10 Fashion-MNIST classes as the base session,
            then the digits resized to 28×28 as classes 10-19), ``cifar100`` (Avalanche's SplitCIFAR100), or
            ``"module:function"`` returning any Avalanche benchmark (called with no arguments).
        scenario: ``class`` (one expanding head, no task id at test; experience 0 is the base session),
            ``task`` (task labels, one head per task) or ``domain`` (digits, fashion_mnist: every class in every
            experience, each experience under a new input condition from ``domains``; one head, no domain id at
            test; experience 0 is the base session).
        base_classes: classes of experience 0; None: 4 for digits/fashion_mnist class-incremental, else
            ``classes_per_exp``. CIFAR-100 allows 50 (its half-classes base session) or None.
        classes_per_exp: classes of each later experience.
        root: data root (fashion_mnist: prepared from Debian's dataset-fashion-mnist files; cifar100:
            ``ROOT/cifar-100-python``).
        download: let torchvision download missing data (needs a network; fails within a timeout).
        train_per_class: fashion_mnist, fashion_digits: keep the first N training images of each class.
        test_per_class: fashion_mnist, fashion_digits: keep the first N test images of each class (None: all).
        source: fashion_mnist only: folder of the gzipped IDX files (None: Debian's
            /usr/share/datasets/fashion-mnist).
        domains: ``scenario: domain``: the input condition of each experience, in order (``clean``,
            ``invert``, ``rotate``, ``blur``, ``noise``, ``occlude``).
        seed: seed of the train/test split (digits), of the class order (cifar100) and of the domain shifts.
    """

    benchmark: str = "digits"
    scenario: Literal["class", "task", "domain"] = "class"
    base_classes: Optional[int] = None
    classes_per_exp: int = 2
    root: str = "data"
    download: bool = False
    train_per_class: Optional[int] = None
    test_per_class: Optional[int] = None
    source: Optional[str] = None
    domains: list[str] = field(default_factory=lambda: ["clean", "invert", "rotate", "noise"])
    seed: int = 0


@dataclass
class ModelOptions:
    """The backbone; the head is Avalanche's IncrementalClassifier (class) or MultiHeadClassifier (task).

    Args:
        name: ``small_cnn`` (3 conv blocks), ``resnet18`` (CIFAR-style) or ``mobilenet_v2`` (32×32 inputs).
        width: small_cnn: channels of the first block (default 32); resnet18: ``nf`` (default 64; 20 is
            GPM's slim variant); mobilenet_v2: width multiplier (default 1.0). None: those defaults.
    """

    name: Literal["small_cnn", "resnet18", "mobilenet_v2"] = "small_cnn"
    width: Optional[float] = None


@dataclass
class TrainOptions:
    """Training of every experience (the same for every method).

    Args:
        epochs: epochs per experience.
        batch_size: training mini-batch size.
        eval_batch_size: evaluation mini-batch size.
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).
        lr: learning rate.
        weight_decay: L2 weight decay.
        lr_decay_epoch: multiply the learning rate by 0.1 from this epoch of each experience on (None: never).
        threads: torch CPU threads (None: torch's default, all cores). Tiny models run fastest on one.
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ...
    """

    epochs: int = 20
    batch_size: int = 32
    eval_batch_size: int = 512
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    lr_decay_epoch: Optional[int] = None
    threads: Optional[int] = 1
    device: str = "auto"


@dataclass
class StrategyOptions:
    """CSKLStrategy's options besides the engine's (see lightning_cskl.avalanche.CSKLPlugin).

    Args:
        prototype_replay: ``auto`` (on for class-incremental, off for task-incremental), true or false.
        prototype_weight: weight of the prototype loss.
        temperature: τ dividing the logits while prototypes are replayed.
        record_batches: batches per experience used for its covariance and prototypes (None: all).
        statistics_head: ``auto`` (LDA for class- and domain-incremental runs, the trained head for
            task-incremental ones), ``lda``, ``ncm`` or null (always the trained head).
    """

    prototype_replay: Union[Literal["auto"], bool] = "auto"
    prototype_weight: float = 10.0
    temperature: float = 0.1
    record_batches: Optional[int] = None
    statistics_head: Optional[Literal["auto", "lda", "ncm"]] = "auto"


@dataclass
class WandbOptions:
    """Weights & Biases tracking.

    Args:
        mode: ``offline`` (default; ``wandb sync`` later), ``online`` or ``disabled``.
        project: W&B project.
    """

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "lightning_cskl"


@dataclass
class RunConfig:
    """One continual-learning run: train every experience, evaluate on the whole test stream after each.

    Args:
        method: ``csko`` (CSKLStrategy: CsKO + DCES with the ``engine`` and ``strategy`` options), ``naive``
            (plain fine-tuning), or any method of the comparison (``lightning_cskl.experiments.baselines.METHODS``:
            ``head_replay``, ``slda``, ``gpm_replay``, ``csko_dces_lda``, ...; their own defaults).
        name: run name (outputs go to ``output_dir/name``); None: ``<benchmark>-<scenario>-<method>``.
        output_dir: parent folder of the run's outputs.
        seed: seed of the model's initialisation and of training.
        checkpoint: write ``checkpoint.pt`` into the run folder after every experience.
        resume: continue after the last experience that ``checkpoint.pt`` holds (same config required).
        progress: show a progress bar.
        data: the benchmark.
        model: the backbone.
        train: training of every experience.
        engine: CsKO's options (lightning_cskl.core.CenterKernelConfig); used by ``method: csko``.
        strategy: CSKLStrategy's prototype-replay options; used by ``method: csko``.
        wandb: W&B tracking.
    """

    method: str = "csko"
    name: Optional[str] = None
    output_dir: str = "outputs"
    seed: int = 0
    checkpoint: bool = True
    resume: bool = False
    progress: bool = True
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    engine: CenterKernelConfig = field(default_factory=CenterKernelConfig)
    strategy: StrategyOptions = field(default_factory=StrategyOptions)
    wandb: WandbOptions = field(default_factory=WandbOptions)


# ---------------------------------------------------------------------------------------------- benchmarks
def _cifar100(options: DataOptions):
    from avalanche.benchmarks.classic import SplitCIFAR100

    from .data import DataNotFoundError

    root = Path(options.root)
    if options.base_classes not in (None, 50):
        raise UsageError(f"data.base_classes={options.base_classes!r} is not allowed for cifar100: use 50 "
                         "(Avalanche's half-classes base session) or null (equal experiences)")
    rest = 50 if options.base_classes == 50 else 100
    if rest % options.classes_per_exp:
        raise UsageError(f"data.classes_per_exp={options.classes_per_exp} does not split the {rest} classes "
                         f"{'after the base session ' if rest == 50 else ''}of CIFAR-100")
    n_experiences = rest // options.classes_per_exp + (1 if options.base_classes == 50 else 0)
    files = root / "cifar-100-python"
    if not (files / "train").is_file() and not options.download:
        raise DataNotFoundError(
            f"CIFAR-100 is not in {files}: put the extracted python version of CIFAR-100 "
            f"(cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html) under {root}, or pass "
            "--data.download true where a network exists"
        )
    task = options.scenario == "task"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # a dead network must fail, not hang
    try:
        return SplitCIFAR100(
            n_experiences, first_exp_with_half_classes=options.base_classes == 50, return_task_id=task,
            seed=options.seed, class_ids_from_zero_in_each_exp=task, class_ids_from_zero_from_first_exp=not task,
            dataset_root=str(root),
        )
    except OSError as error:  # URLError, socket errors, a truncated archive
        raise DataNotFoundError(f"CIFAR-100 could not be downloaded into {root} ({error}); put the extracted "
                                f"cifar-100-python folder under {root} instead") from None
    finally:
        socket.setdefaulttimeout(previous)


def _custom_benchmark(spec: str):
    module_name, _, function_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"data.benchmark={spec!r}: cannot load {function_name!r} from module {module_name!r} "
                         f"({error})") from None
    benchmark = factory()
    if not all(hasattr(benchmark, stream) for stream in ("train_stream", "test_stream")):
        raise UsageError(f"data.benchmark={spec!r} returned a {type(benchmark).__name__}, not an Avalanche benchmark "
                         "(an object with train_stream and test_stream)")
    return benchmark


def build_benchmark(options: DataOptions):
    """The Avalanche benchmark that ``options`` describe.

    Raises:
        DataNotFoundError: the data is not on disk (the message says how to get it).
        UsageError: an option is not allowed.
    """
    from .data import DEBIAN_FASHION_MNIST, split_digits_benchmark, split_fashion_mnist
    from .data.shifts import fashion_digits_benchmark, fashion_mnist_domains, split_digits_domains

    base: Any = "auto" if options.base_classes is None else options.base_classes
    source = options.source or DEBIAN_FASHION_MNIST
    try:
        if options.scenario == "domain":
            if options.benchmark == "digits":
                return split_digits_domains(options.domains, seed=options.seed)
            if options.benchmark == "fashion_mnist":
                return fashion_mnist_domains(options.root, options.domains, train_per_class=options.train_per_class,
                                             test_per_class=options.test_per_class, seed=options.seed,
                                             download=options.download, source=source)
            if options.benchmark in _BUILTIN_BENCHMARKS:
                raise UsageError(f"data.scenario='domain' is not allowed with data.benchmark="
                                 f"{options.benchmark!r}: use digits or fashion_mnist")
        if options.benchmark == "fashion_digits":
            if options.scenario != "class":
                raise UsageError(f"data.scenario={options.scenario!r} is not allowed with data.benchmark="
                                 "'fashion_digits': it is class-incremental (scenario: class)")
            return fashion_digits_benchmark(options.root, options.classes_per_exp,
                                            train_per_class=options.train_per_class,
                                            test_per_class=options.test_per_class, seed=options.seed,
                                            download=options.download, source=source)
        if options.benchmark == "digits":
            return split_digits_benchmark(options.scenario, base, options.classes_per_exp, seed=options.seed)
        if options.benchmark == "fashion_mnist":
            return split_fashion_mnist(options.root, options.scenario, base, options.classes_per_exp,
                                       download=options.download, train_per_class=options.train_per_class,
                                       source=source)
        if options.benchmark == "cifar100":
            return _cifar100(options)
    except ValueError as error:  # a class split or option the builder refused; DataNotFoundError is no ValueError
        raise UsageError(f"data: {error}") from None
    if ":" in options.benchmark:
        return _custom_benchmark(options.benchmark)
    raise UsageError(f"data.benchmark={options.benchmark!r} is not allowed: use one of "
                     f"{', '.join(_BUILTIN_BENCHMARKS)} or 'module:function' returning an Avalanche benchmark")


def _input_channels(benchmark: Any) -> int:
    for stream in (benchmark.train_stream, benchmark.test_stream):
        for experience in stream:
            if len(experience.dataset):
                return int(experience.dataset[0][0].shape[0])
    return 1


# ---------------------------------------------------------------------------------------------- model
def build_model(options: ModelOptions, in_channels: int, task_incremental: bool):
    """Backbone + Avalanche's expanding head (class-incremental) or per-task heads (task-incremental)."""
    from .avalanche import ClassIncrementalNet, TaskIncrementalNet
    from .models import ResNetFeatures, SmallCNN, mobilenet_v2, resnet18

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


# ---------------------------------------------------------------------------------------------- outputs
# ---------------------------------------------------------------------------------------------- run
def _check(config: RunConfig) -> None:
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
    from .experiments.baselines import METHODS

    if config.method not in ("csko", "naive", *METHODS):
        raise UsageError(f"method={config.method!r} is not allowed: use csko, naive or one of {', '.join(METHODS)}")


def run(config: RunConfig) -> dict[str, Any]:
    """``cskl run``: a whole continual-learning run; prints the results and writes them to the run folder.

    Returns:
        The results written to ``results.json`` (accuracy matrix, ACC, AIA, forgetting, BWT, time, config).
    """
    _check(config)
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
        return _run(config, benchmark, name, folder, began)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) keep their setting


def _run(config: RunConfig, benchmark: Any, name: str, folder: Path, began: float) -> dict[str, Any]:
    import torch
    from avalanche.training import Naive

    from .avalanche import CSKLStrategy, WandbLogger, run_continual
    from .core import NoEligibleLayerError

    device = config.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    task_incremental = config.data.scenario == "task"
    in_channels = _input_channels(benchmark)

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
            from .experiments.baselines import build_method

            return build_method(config.method, **common)
        s = config.strategy
        return CSKLStrategy(**common, config=config.engine, prototype_replay=s.prototype_replay,
                            prototype_weight=s.prototype_weight, temperature=s.temperature,
                            record_batches=s.record_batches, statistics_head=s.statistics_head)

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


# ---------------------------------------------------------------------------------------------- cskl bench
def _all_methods() -> list[str]:
    from .experiments.baselines import METHODS

    return list(METHODS)


@dataclass
class BenchConfig:
    """Every method side by side on one benchmark (issue 4): accuracy and per-step cost, mean ± std over seeds.

    Args:
        methods: names from ``lightning_cskl.experiments.baselines.METHODS`` (default: all of them), or
            ``<method>@<tag>`` variants that run ``<method>`` with their own ``method_options``.
        scenarios: ``class`` (base session + expanding head), ``task`` (one head per task) and/or ``domain``
            (the same classes under new input conditions); each replaces ``data.scenario`` in turn.
        seeds: one run per seed and method (also the seed of ``data``).
        data: the benchmark, with the options of ``cskl run`` (``--data.benchmark fashion_mnist``,
            ``--data.train_per_class 500``, ``module:function``, ...).
        model: the backbone (as for ``cskl run``; default: SmallCNN of width 16).
        epochs, batch_size, lr, weight_decay: training of every experience (Adam), the same for every method.
        equal_compute: give every method the training FLOPs of full fine-tuning at ``epochs`` epochs instead
            of the same epochs (see ``lightning_cskl.experiments.bench.run_bench``); the ``epochs`` column says what each got.
        method_options: per method (or variant), extra factory options (e.g. ``{ewc: {ewc_lambda: 10}}``;
            ``train_epochs`` overrides ``epochs``).
        time_steps: also time the steps (median, and the ratio to full fine-tuning).
        threads: torch CPU threads (None: torch's default).
        name, output_dir: outputs go to ``output_dir/name``.
        progress: show a progress bar.
        resume: reuse the runs an interrupted bench with the same settings kept in ``output_dir/name/runs``
            (False: rerun everything).
    """

    methods: list[str] = field(default_factory=_all_methods)
    scenarios: list[Literal["class", "task", "domain"]] = field(default_factory=lambda: ["class", "task"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=lambda: ModelOptions("small_cnn", 16))
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    equal_compute: bool = False
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    time_steps: bool = True
    threads: Optional[int] = None
    name: str = "bench"
    output_dir: str = "outputs"
    progress: bool = True
    resume: bool = True


_BENCH_IDENTITY = ("data", "model")  # what changes a run besides training


def bench(config: BenchConfig) -> dict[str, Any]:
    """Run :func:`lightning_cskl.experiments.bench.run_bench` from a config; write tables, plots and a JSON."""
    import torch

    from .experiments.baselines import METHODS
    from .experiments.bench import claims_markdown, run_bench
    from .experiments.plots import plot_bench

    unknown = [m for m in config.methods if m.split("@", 1)[0] not in METHODS]
    if unknown:
        raise UsageError(f"methods {unknown} are not known: use some of {', '.join(METHODS)}")
    if not config.methods or not config.seeds or not config.scenarios:
        raise UsageError("methods, scenarios and seeds must each name at least one")
    for name, value in (("epochs", config.epochs), ("batch_size", config.batch_size)):
        if value < 1:
            raise UsageError(f"{name}={value!r} is not allowed: it must be an int >= 1")
    if not config.lr > 0:
        raise UsageError(f"lr={config.lr!r} is not allowed: it must be > 0")
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    def benchmark(scenario: str, seed: int) -> Any:
        return build_benchmark(replace(config.data, scenario=scenario, seed=seed))

    # bad data or model options fail now, with their one-line message
    in_channels = _input_channels(benchmark(config.scenarios[0], config.seeds[0]))
    build_model(config.model, in_channels, False)

    def model(scenario: str) -> nn.Module:
        return build_model(config.model, in_channels, scenario == "task")

    folder = Path(config.output_dir) / config.name
    began = time.time()
    table = run_bench(config.methods, scenarios=config.scenarios, seeds=config.seeds, benchmark=benchmark,
                      model=model, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                      weight_decay=config.weight_decay, method_options=config.method_options,
                      time_steps=config.time_steps, out_dir=folder, progress=config.progress,
                      resume=config.resume, identity={k: v for k, v in asdict(config).items() if k in _BENCH_IDENTITY},
                      equal_compute=config.equal_compute)
    plots = plot_bench(table, folder)
    results = {"config": asdict(config), "summary": table.summary(), "runs": table.runs,
               "seconds": time.time() - began}
    (folder / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    claims = claims_markdown(table)
    (folder / "claims.md").write_text(claims + "\n")
    print(table.markdown())
    print(claims)
    print(f"tables in {folder}/bench.md, bench.csv, bench_runs.csv, claims.md; plots: "
          f"{', '.join(p.name for p in plots)}")
    return results


# ---------------------------------------------------------------------------------------------- the command
SUBCOMMANDS: dict[str, tuple[type, Callable[[Any], Any], str]] = {
    "run": (RunConfig, run, "a continual-learning run (default: Split Digits, class-incremental, CsKO)"),
    "bench": (BenchConfig, bench, "every method side by side: accuracy, memory, FLOPs, step time (tables + plots)"),
    "study": (StudyConfig, run_study, "knowledge intensity of each kernel tap per depth (issue 5): table, heatmaps"),
}


def build_parser():
    """The ``cskl`` parser: one subcommand per entry of :data:`SUBCOMMANDS`."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="cskl", description="Center-Sensitive Kernel Optimization: continual learning runs",
                            exit_on_error=False)
    commands = parser.add_subcommands(required=True, dest="subcommand")
    for command, (config_type, _, help_text) in SUBCOMMANDS.items():
        sub = ArgumentParser(prog=f"cskl {command}", description=help_text, exit_on_error=False)
        sub.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML config (configs/*.yaml)")
        sub.add_class_arguments(config_type, nested_key=None, fail_untyped=True)
        commands.add_subcommand(command, sub, help=help_text)
    return parser


def _without_empty_configs(args: list[str]) -> list[str]:
    """Drop ``--config FILE`` arguments whose file is empty or holds only comments: an empty config sets nothing
    (jsonargparse would answer ``Unexpected config:``)."""
    def empty(path: str) -> bool:
        try:
            return not any(line.strip() and not line.lstrip().startswith("#") for line in Path(path).read_text().splitlines())
        except (OSError, UnicodeDecodeError):
            return False  # missing or unreadable: jsonargparse says so itself

    kept: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in ("-c", "--config") and index + 1 < len(args) and empty(args[index + 1]):
            index += 2
            continue
        if arg.startswith("--config=") and empty(arg.split("=", 1)[1]):
            index += 1
            continue
        kept.append(arg)
        index += 1
    return kept


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``cskl`` console script (``argv`` for in-process use, e.g. tests)."""
    from jsonargparse import ArgumentError

    os.environ.setdefault("WANDB_SILENT", "true")
    parser = build_parser()
    args = _without_empty_configs(list(sys.argv[1:] if argv is None else argv))
    try:
        parsed = parser.parse_args(args)
        command = parsed.subcommand
        config_type, function, _ = SUBCOMMANDS[command]
    except ArgumentError as error:
        _fail("cskl", str(error))
    try:
        instantiated = parser.instantiate(parsed)[command]
    except ValueError as error:  # a config dataclass refused a value in __post_init__ (e.g. channel_ratio)
        _fail(f"cskl {command}", str(error))
    values = {k: v for k, v in instantiated.items() if k in config_type.__dataclass_fields__}
    try:
        config = config_type(**values)
    except ValueError as error:  # __post_init__ checks of the config dataclass
        _fail(f"cskl {command}", str(error))
    _execute(f"cskl {command}", function, config)


def _execute(prog: str, function: Callable[[Any], Any], config: Any) -> None:
    from .avalanche import CheckpointError, EmptyExperienceError, NoDataError
    from .core import NoEligibleLayerError
    from .data import DataNotFoundError

    try:
        function(config)
    except (DataNotFoundError, NoDataError, EmptyExperienceError, NoEligibleLayerError, UsageError,
            CheckpointError) as error:
        _fail(prog, str(error))
    except OSError as error:  # a file could not be written (a full disk, a read-only folder)
        _fail(prog, error.strerror if error.strerror and "could not write" in error.strerror else str(error))


if __name__ == "__main__":
    main()
