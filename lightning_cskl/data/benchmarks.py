"""Avalanche benchmarks built offline: Split Digits (always there) and Split Fashion-MNIST (local files).

Two scenarios (PROTOCOL.md):

* ``"class"`` (class-incremental): experience 0 is a base session of ``base_classes`` classes, then
  experiences of ``classes_per_exp`` new classes; one label space, no task label at test time.
* ``"task"`` (task-incremental): experiences of ``classes_per_exp`` classes with task labels 0, 1, ...;
  labels restart at 0 in every experience (one head per task).

Avalanche is imported inside the builders, so ``lightning_cskl.data`` stays cheap to import.
"""

from __future__ import annotations

import os
from typing import Literal, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .digits import split_digits
from .fashion_mnist import DEBIAN_FASHION_MNIST, load_fashion_mnist

__all__ = ["Scenario", "split_digits_benchmark", "split_fashion_mnist", "tensor_benchmark"]

Scenario = Literal["class", "task"]


class _LabeledTensors(TensorDataset):
    """A TensorDataset of ``(image, label)`` with the ``targets`` list Avalanche reads."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        super().__init__(images, labels)
        self.targets = labels.tolist()


def _experience_sizes(num_classes: int, scenario: str, base_classes: Optional[int], classes_per_exp: int) -> list[int]:
    if scenario not in ("class", "task"):
        raise ValueError(f"scenario={scenario!r} is not allowed: use 'class' or 'task'")
    if not isinstance(classes_per_exp, int) or classes_per_exp < 1:
        raise ValueError(f"classes_per_exp={classes_per_exp!r} is not allowed: it must be an int >= 1")
    first = classes_per_exp if base_classes is None else base_classes
    if not isinstance(first, int) or not 1 <= first <= num_classes:
        raise ValueError(f"base_classes={base_classes!r} is not allowed: it must be an int in [1, {num_classes}]")
    rest = num_classes - first
    if rest % classes_per_exp:
        raise ValueError(
            f"base_classes={first} and classes_per_exp={classes_per_exp} do not split {num_classes} classes: "
            f"the {rest} classes after the first experience must be a multiple of classes_per_exp"
        )
    return [first] + [classes_per_exp] * (rest // classes_per_exp)


def tensor_benchmark(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    scenario: Scenario = "class",
    base_classes: Optional[int] = None,
    classes_per_exp: int = 2,
    class_order: Optional[list[int]] = None,
):
    """An Avalanche ``nc_benchmark`` from image and label tensors.

    Args:
        train: ``(images, labels)`` of the training data.
        test: ``(images, labels)`` of the test data.
        scenario: ``"class"`` or ``"task"`` (see the module docstring).
        base_classes: classes of experience 0 (None: ``classes_per_exp``).
        classes_per_exp: classes of each later experience.
        class_order: order in which classes arrive (default: ascending labels).

    Returns:
        An Avalanche NCScenario with ``train_stream`` and ``test_stream``.

    Raises:
        ValueError: the class split does not add up, or a stream has no samples.
    """
    from avalanche.benchmarks import nc_benchmark

    labels = sorted(set(train[1].tolist()))
    if not labels or len(test[1]) == 0:
        raise ValueError(
            f"the benchmark has no data: {len(train[1])} training and {len(test[1])} test samples were given"
        )
    sizes = _experience_sizes(len(labels), scenario, base_classes, classes_per_exp)
    per_exp_classes = {0: sizes[0]} if sizes[0] != classes_per_exp else None
    return nc_benchmark(
        _LabeledTensors(*train),
        _LabeledTensors(*test),
        n_experiences=len(sizes),
        task_labels=scenario == "task",
        shuffle=False,
        fixed_class_order=list(class_order) if class_order is not None else labels,
        per_exp_classes=per_exp_classes,
        class_ids_from_zero_in_each_exp=scenario == "task",
    )


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
