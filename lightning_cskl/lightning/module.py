"""A small LightningModule for task sequences, used by the examples and tests."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

__all__ = ["TaskClassifier"]


class TaskClassifier(L.LightningModule):
    """Classifier over batches ``(x, global_label, task_id)``.

    ``scenario="task"``: one head per task (``classes_per_task`` outputs each), labels local to the task.
    ``scenario="class"``: one shared head over all classes; logits of classes not seen yet are masked.

    Args:
        backbone: maps images to ``feature_dim`` features.
        feature_dim: backbone output size.
        n_tasks, classes_per_task: task layout (classes of task t are ``t*k ... t*k+k-1``).
        scenario: ``"task"`` or ``"class"``.
        lr, weight_decay: Adam settings.

    Example:
        >>> from lightning_cskl.models import SmallCNN
        >>> cnn = SmallCNN(); model = TaskClassifier(cnn.features, cnn.feature_dim, n_tasks=5, classes_per_task=2)
        >>> model(torch.randn(3, 1, 8, 8), task=1).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        n_tasks: int,
        classes_per_task: int,
        scenario: str = "task",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
    ) -> None:
        super().__init__()
        if scenario not in ("task", "class"):
            raise ValueError(f"scenario={scenario!r} is not allowed: use 'task' or 'class'")
        self.backbone = backbone
        self.scenario, self.n_tasks, self.k = scenario, n_tasks, classes_per_task
        n_heads, n_out = (n_tasks, classes_per_task) if scenario == "task" else (1, n_tasks * classes_per_task)
        self.heads = nn.ModuleList(nn.Linear(feature_dim, n_out) for _ in range(n_heads))
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.current_task = 0
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=n_out, average="micro")

    def forward(self, x: Tensor, task: int | Tensor = 0) -> Tensor:
        features = self.backbone(x)
        if self.scenario == "task":
            if isinstance(task, Tensor):
                task = int(task.reshape(-1)[0])
            return self.heads[task](features)
        return self.heads[0](features)

    def _logits_and_targets(self, batch: Any, seen_tasks: int) -> tuple[Tensor, Tensor]:
        x, y, t = batch[0], batch[1], batch[2]  # later elements (a sample index) are not the model's
        if self.scenario == "task":
            return self(x, t), y - self.k * t
        logits = self(x).clone()
        logits[:, seen_tasks * self.k:] = float("-inf")
        return logits, y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits, targets = self._logits_and_targets(batch, self.current_task + 1)
        loss = F.cross_entropy(logits, targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    @torch.no_grad()
    def evaluate(self, dataset: torch.utils.data.Dataset, seen_tasks: int, batch_size: int = 256) -> float:
        """Accuracy on ``dataset`` (task-IL: within the task's head; class-IL: over ``seen_tasks`` tasks)."""
        was_training = self.training
        self.eval()
        self.accuracy.reset()
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        for batch in loader:
            batch = [b.to(self.device) for b in batch]
            logits, targets = self._logits_and_targets(batch, seen_tasks)
            self.accuracy.update(logits.argmax(1), targets)
        self.train(was_training)
        return float(self.accuracy.compute())
