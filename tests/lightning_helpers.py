"""Shared pieces of the Lightning tests (a tiny model, a quiet Trainer, a crash injector)."""

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

from lightning_cskl.lightning.module import TaskClassifier
from lightning_cskl.models import SmallCNN


def make_model(seed: int = 0, scenario: str = "task", optimizer: str = "sgd", lr: float = 0.3) -> TaskClassifier:
    torch.manual_seed(seed)
    cnn = SmallCNN(width=16)
    return TaskClassifier(cnn.features, cnn.feature_dim, n_tasks=5, classes_per_task=2, scenario=scenario, lr=lr,
                          optimizer=optimizer)


def make_trainer(epochs: int, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    defaults.update(kwargs)
    return L.Trainer(max_epochs=epochs, callbacks=callbacks, **defaults)


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch): Lightning calls set_epoch, so resumed runs see the same order."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def loader(task) -> DataLoader:
    return DataLoader(task.train, batch_size=32, sampler=EpochShuffle(len(task.train)))


class Crash(L.Callback):
    """Raise at the start of a given epoch, after the previous epoch's checkpoint was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")
