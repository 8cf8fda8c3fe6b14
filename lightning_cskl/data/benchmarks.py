"""The class- and task-incremental benchmarks built offline: Split Digits (always there), Split Fashion-MNIST (local
files) and Split CIFAR-100 (Avalanche's, where its files or a network exist). Each reads its data with a loader
below it (:mod:`.digits`, :mod:`.fashion_mnist`) and ends in :func:`~lightning_cskl.data.tensors.tensor_benchmark`;
:mod:`.build` picks the builder a run's options name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from .digits import split_digits
from .download import DataNotFoundError, download_timeout
from .fashion_mnist import DEBIAN_FASHION_MNIST, load_fashion_mnist
from .tensors import Scenario, tensor_benchmark

__all__ = ["split_cifar100", "split_digits_benchmark", "split_fashion_mnist"]


def split_digits_benchmark(
    scenario: Scenario = "class",
    base_classes: Union[int, None, Literal["auto"]] = "auto",
    classes_per_exp: int = 2,
    seed: int = 0,
    test_fraction: float = 0.3,
):
    """Split Digits (scikit-learn's bundled 8×8 digits) as an Avalanche benchmark; seconds to build and train.

    Args:
        scenario: ``"class"``: base session of 4 classes + 3 experiences of 2 (default);
            ``"task"``: 5 experiences of 2 classes with task labels.
        base_classes: classes of experience 0; ``"auto"``: 4 for ``"class"``, ``classes_per_exp`` for ``"task"``.
        classes_per_exp: classes per later experience.
        seed: seed of the stratified train/test split.
        test_fraction: fraction of each class held out for testing.

    Example:
        >>> bm = split_digits_benchmark("class")
        >>> [e.classes_in_this_experience for e in bm.train_stream]
        [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
        >>> bm = split_digits_benchmark("task")
        >>> len(bm.train_stream), bm.train_stream[3].task_label, bm.test_stream[3].classes_in_this_experience
        (5, 3, [0, 1])
    """
    if base_classes == "auto":
        base_classes = 4 if scenario == "class" else None
    (data,) = split_digits(n_tasks=1, seed=seed, test_fraction=test_fraction)
    train_x, train_y, _ = data.train.tensors
    test_x, test_y, _ = data.test.tensors
    return tensor_benchmark((train_x, train_y), (test_x, test_y), scenario, base_classes, classes_per_exp)


def split_fashion_mnist(
    root: Union[str, os.PathLike] = "data",
    scenario: Scenario = "class",
    base_classes: Union[int, None, Literal["auto"]] = "auto",
    classes_per_exp: int = 2,
    download: bool = False,
    train_per_class: Optional[int] = None,
    source: Union[str, os.PathLike] = DEBIAN_FASHION_MNIST,
):
    """Split Fashion-MNIST as an Avalanche benchmark, from local files (see
    :mod:`lightning_cskl.data.fashion_mnist`).

    Args:
        root: data root; prepared from Debian's ``dataset-fashion-mnist`` files when they are installed.
        scenario: ``"class"``: base session of 4 classes + 3 experiences of 2 (default);
            ``"task"``: 5 experiences of 2 classes with task labels.
        base_classes: classes of experience 0; ``"auto"``: 4 for ``"class"``, ``classes_per_exp`` for ``"task"``.
        classes_per_exp: classes per later experience.
        download: let torchvision download the data if it is not available locally.
        train_per_class: keep only the first N training images of each class (quick runs); None keeps all.
        source: folder of the gzipped IDX files.

    Raises:
        DataNotFoundError: the data is not available; the message says how to get it.
    """
    if base_classes == "auto":
        base_classes = 4 if scenario == "class" else None
    (train_x, train_y), test = load_fashion_mnist(root, download=download, source=source)
    if train_per_class is not None:
        if not isinstance(train_per_class, int) or train_per_class < 1:
            raise ValueError(f"train_per_class={train_per_class!r} is not allowed: use None or an int >= 1")
        keep = torch.cat([(train_y == c).nonzero().squeeze(1)[:train_per_class] for c in train_y.unique()])
        keep = keep.sort().values
        train_x, train_y = train_x[keep], train_y[keep]
    return tensor_benchmark((train_x, train_y), test, scenario, base_classes, classes_per_exp)


def split_cifar100(root: Union[str, os.PathLike] = "data", scenario: Scenario = "class", base_classes: Optional[int] = 50,
                   classes_per_exp: int = 10, download: bool = False, seed: int = 0):
    """Avalanche's ``SplitCIFAR100`` from ``root/cifar-100-python`` (or downloaded, with ``download``): a base
    session of 50 classes then experiences of ``classes_per_exp`` (``base_classes=50``), or equal experiences
    (None); class order from ``seed``.

    Raises:
        ValueError: the class split is not allowed.
        DataNotFoundError: the files are not there and cannot be downloaded.
    """
    from avalanche.benchmarks.classic import SplitCIFAR100

    root = Path(root)
    if base_classes not in (None, 50):
        raise ValueError(f"base_classes={base_classes!r} is not allowed for cifar100: use 50 "
                         "(Avalanche's half-classes base session) or null (equal experiences)")
    rest = 50 if base_classes == 50 else 100
    if rest % classes_per_exp:
        raise ValueError(f"classes_per_exp={classes_per_exp} does not split the {rest} classes "
                         f"{'after the base session ' if rest == 50 else ''}of CIFAR-100")
    n_experiences = rest // classes_per_exp + (1 if base_classes == 50 else 0)
    files = root / "cifar-100-python"
    if not (files / "train").is_file() and not download:
        raise DataNotFoundError(
            f"CIFAR-100 is not in {files}: put the extracted python version of CIFAR-100 "
            f"(cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html) under {root}, or pass "
            "--data.download true where a network exists"
        )
    task = scenario == "task"
    try:
        with download_timeout():
            return SplitCIFAR100(
                n_experiences, first_exp_with_half_classes=base_classes == 50, return_task_id=task,
                seed=seed, class_ids_from_zero_in_each_exp=task, class_ids_from_zero_from_first_exp=not task,
                dataset_root=str(root),
            )
    except OSError as error:  # URLError, socket errors, a truncated archive
        raise DataNotFoundError(f"CIFAR-100 could not be downloaded into {root} ({error}); put the extracted "
                                f"cifar-100-python folder under {root} instead") from None
