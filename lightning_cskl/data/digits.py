"""Split Digits: scikit-learn's bundled 8×8 digits, split into tasks of disjoint classes. Always available."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

__all__ = ["TaskData", "split_digits"]


@dataclass
class TaskData:
    """One task: datasets of ``(image, global_label, task_id)`` and the task's classes in order."""

    train: TensorDataset
    test: TensorDataset
    classes: list[int]


def split_digits(n_tasks: int = 5, seed: int = 0, test_fraction: float = 0.3) -> list[TaskData]:
    """Split Digits into ``n_tasks`` tasks of ``10 // n_tasks`` classes (0-1, 2-3, ... for 5 tasks).

    Images are ``(1, 8, 8)`` floats in [0, 1]; the split into train and test is stratified and seeded.

    Example:
        >>> tasks = split_digits(5)
        >>> len(tasks), tasks[1].classes, tasks[0].train[0][0].shape
        (5, [2, 3], torch.Size([1, 8, 8]))
    """
    from sklearn.datasets import load_digits

    if not isinstance(n_tasks, int) or n_tasks < 1 or 10 % n_tasks != 0:
        raise ValueError(f"n_tasks={n_tasks!r} is not allowed: it must divide the 10 digit classes (1, 2, 5 or 10)")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is not allowed: it must lie in (0, 1)")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    per_task = 10 // n_tasks
    tasks = []
    for t in range(n_tasks):
        classes = list(range(t * per_task, (t + 1) * per_task))
        train_idx, test_idx = [], []
        for c in classes:
            idx = (labels == c).nonzero().squeeze(1)
            idx = idx[torch.randperm(len(idx), generator=generator)]
            n_test = int(round(len(idx) * test_fraction))
            test_idx.append(idx[:n_test])
            train_idx.append(idx[n_test:])
        tr, te = torch.cat(train_idx), torch.cat(test_idx)
        task_id = torch.full((len(labels),), t, dtype=torch.long)
        tasks.append(TaskData(
            TensorDataset(images[tr], labels[tr], task_id[tr]),
            TensorDataset(images[te], labels[te], task_id[te]),
            classes,
        ))
    return tasks
