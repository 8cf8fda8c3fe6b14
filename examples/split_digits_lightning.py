"""Split Digits with Lightning and CenterKernelCallback: 5 tasks of 2 classes, task-incremental.

Task 0 is the base session (all parameters train); tasks 1-4 train only the center taps of the deepest
convolutions on DCES-selected channels, projected away from what earlier tasks use. Runs in about a minute
on 2 CPU cores, logs to Weights & Biases offline (./wandb, `wandb sync` later) and prints the accuracy matrix.

    python examples/split_digits_lightning.py [--epochs 10] [--optimizer sgd] [--lr 0.3] [--naive]
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader

from lightning_cskl import CenterKernelCallback
from lightning_cskl.data import split_digits
from lightning_cskl.lightning.module import TaskClassifier
from lightning_cskl.models import SmallCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--naive", action="store_true", help="plain fine-tuning, no callback (for comparison)")
    args = parser.parse_args()

    os.environ.setdefault("WANDB_MODE", "offline")
    L.seed_everything(args.seed, verbose=False)
    tasks = split_digits(n_tasks=5, seed=args.seed)
    cnn = SmallCNN(width=16)
    model = TaskClassifier(cnn.features, cnn.feature_dim, n_tasks=5, classes_per_task=2,
                           lr=args.lr, optimizer=args.optimizer)
    callback = CenterKernelCallback(score_batches=4)
    logger = WandbLogger(project="lightning_cskl", name=f"split-digits-{'naive' if args.naive else 'cskl'}",
                         offline=True)
    accuracy = [[float("nan")] * len(tasks) for _ in tasks]
    for t, task in enumerate(tasks):
        model.current_task = t
        trainer = L.Trainer(
            max_epochs=args.epochs, callbacks=[] if args.naive else [callback], logger=logger,
            enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
        )
        trainer.fit(model, DataLoader(task.train, batch_size=32, shuffle=True))
        for j in range(t + 1):
            accuracy[t][j] = model.evaluate(tasks[j].test, seen_tasks=t + 1)
        logger.log_metrics({f"acc/task{j}": accuracy[t][j] for j in range(t + 1)}, step=trainer.global_step)

    print("\naccuracy matrix (row: after training task i, column: test on task j)")
    for t, row in enumerate(accuracy):
        print(f"task {t}: " + " ".join("  -  " if j > t else f"{row[j]:.3f}" for j in range(len(row))))
    final = accuracy[-1]
    forgetting = sum(max(accuracy[i][j] for i in range(j, len(tasks) - 1)) - final[j]
                     for j in range(len(tasks) - 1)) / (len(tasks) - 1)
    print(f"ACC {sum(final) / len(final):.3f}   forgetting {forgetting:.3f}")
    logger.experiment.summary.update({"ACC": sum(final) / len(final), "forgetting": forgetting})
    logger.experiment.finish()


if __name__ == "__main__":
    main()
