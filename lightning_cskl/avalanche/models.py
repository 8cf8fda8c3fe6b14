"""Avalanche-ready networks: a backbone with one expanding head (class-incremental) or one head per task
(task-incremental), built on Avalanche's dynamic modules so that the strategies grow them per experience."""

from __future__ import annotations

from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule
from torch import Tensor, nn

__all__ = ["ClassIncrementalNet", "TaskIncrementalNet"]


class ClassIncrementalNet(nn.Module):
    """``backbone`` followed by an ``IncrementalClassifier`` that adds units as new classes arrive.

    Args:
        backbone: maps an input batch to ``(N, feature_dim)`` features.
        feature_dim: size of the features.
        initial_classes: units of the head before the first experience.

    Example:
        >>> import torch
        >>> from lightning_cskl.models import SmallCNN
        >>> net = ClassIncrementalNet(SmallCNN(10).features, 32)
        >>> net(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 2])
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, initial_classes: int = 2) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalClassifier(feature_dim, initial_out_features=initial_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class TaskIncrementalNet(MultiTaskModule):
    """``backbone`` shared by all tasks, with a ``MultiHeadClassifier`` that adds one head per task label.

    Example:
        >>> import torch
        >>> from lightning_cskl.models import SmallCNN
        >>> net = TaskIncrementalNet(SmallCNN(10).features, 32)
        >>> net(torch.randn(2, 1, 8, 8), 0).shape   # task 0; heads for new tasks appear as experiences arrive
        torch.Size([2, 2])
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, initial_classes: int = 2) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = MultiHeadClassifier(feature_dim, initial_out_features=initial_classes)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.head(self.backbone(x), task_label)
