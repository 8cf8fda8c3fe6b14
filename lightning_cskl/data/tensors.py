"""Image and label tensors as an Avalanche benchmark: the layer every builder of this package ends in.

Two scenarios (PROTOCOL.md):

* ``"class"`` (class-incremental): experience 0 is a base session of ``base_classes`` classes, then
  experiences of ``classes_per_exp`` new classes; one label space, no task label at test time.
* ``"task"`` (task-incremental): experiences of ``classes_per_exp`` classes with task labels 0, 1, ...;
  labels restart at 0 in every experience (one head per task).

Avalanche is imported inside :func:`tensor_benchmark`, so ``lightning_cskl.data`` stays cheap to import.
"""

from __future__ import annotations

from typing import Literal, Optional

from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["LabeledTensors", "Scenario", "tensor_benchmark"]

Scenario = Literal["class", "task"]


class LabeledTensors(TensorDataset):
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
        LabeledTensors(*train),
        LabeledTensors(*test),
        n_experiences=len(sizes),
        task_labels=scenario == "task",
        shuffle=False,
        fixed_class_order=list(class_order) if class_order is not None else labels,
        per_exp_classes=per_exp_classes,
        class_ids_from_zero_in_each_exp=scenario == "task",
    )
