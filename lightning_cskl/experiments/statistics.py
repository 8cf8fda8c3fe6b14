"""The statistics-head ceiling of the comparison: statistics re-measured on all data seen (it needs the old data,
which the methods under test never keep).

Example:
    >>> plugin = RemeasurePlugin()
    >>> plugin.datasets
    []
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from ..avalanche.strategy import find_head
from ..core.head import StatisticsHead

__all__ = ["RemeasurePlugin", "head_features"]


@torch.no_grad()
def head_features(strategy: SupervisedTemplate, head: nn.Module, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The head-input features and labels of ``dataset`` (eval transforms, eval mode) under the current model, fed
    as training feeds it (``strategy.forward``); the strategy's mini-batch is restored afterwards."""
    model, captured, rows, labels = strategy.model, [], [], []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    saved, was_training = strategy.mbatch, model.training
    model.eval()
    try:
        batch_size = max(strategy.eval_mb_size or 1, strategy.train_mb_size or 1, 256)
        for batch in DataLoader(dataset.eval(), batch_size=batch_size, collate_fn=getattr(dataset, "collate_fn", None)):
            strategy.mbatch = [t.to(strategy.device) for t in batch]
            captured.clear()
            strategy.forward()
            rows.append(captured[-1].flatten(1).cpu())
            labels.append(strategy.mbatch[1].cpu())
    finally:
        handle.remove()
        strategy.mbatch = saved
        model.train(was_training)
    return torch.cat(rows), torch.cat(labels)


class RemeasurePlugin(SupervisedPlugin):
    """The room a carried statistics head leaves (needs old data): after every experience the method's statistics
    head is measured anew, with the current backbone, on the training data of every experience seen so far.

    Put it after the method's plugin; ``strategy.baseline`` must hold a ``statistics`` head.
    """

    def __init__(self) -> None:
        super().__init__()
        self.datasets: list[Any] = []

    @override
    def after_training_exp(self, strategy: SupervisedTemplate, *args: Any, **kwargs: Any) -> None:
        self.datasets.append(strategy.experience.dataset)
        plugin = strategy.baseline
        stats: StatisticsHead = plugin.statistics
        fresh = StatisticsHead(stats.rule, stats.shrinkage, stats.power)
        head = find_head(strategy.model, plugin.head)
        for dataset in self.datasets:
            fresh.update(*head_features(strategy, head, dataset))
        stats.load_state_dict(fresh.state_dict())
