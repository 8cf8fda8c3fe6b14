"""The options of a whole run (``cskl run``), as plain dataclasses: the CLI turns them into ``--group.key`` flags
and YAML keys; :func:`lightning_cskl.avalanche.job.run` and the benchmark builders read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .core import CenterKernelConfig, HeadConfig
from .core.prefix_cache import PrefixCacheConfig

__all__ = ["DataOptions", "ModelOptions", "RunConfig", "StrategyOptions", "TrainOptions", "UsageError", "WandbOptions"]


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
class StrategyOptions(PrefixCacheConfig, HeadConfig):
    """CSKLStrategy's options besides the engine's: the fields of lightning_cskl.core.HeadConfig (statistics head,
    carry, distillation, prototype replay) and of lightning_cskl.core.prefix_cache.PrefixCacheConfig (prefix_cache,
    prefix_cache_precision, prefix_cache_min_flops), which document them; written once there, shared by both doors."""

    def __post_init__(self) -> None:
        HeadConfig.__post_init__(self)
        PrefixCacheConfig.__post_init__(self)


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
        strategy: CSKLStrategy's classifier-side options (lightning_cskl.core.HeadConfig); used by ``method: csko``.
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


