"""Two tasks of Split Digits under DDP (2 CPU processes, gloo); every rank saves what the callback holds.

Run by tests/test_ddp.py as ``python tests/ddp_run.py OUT_DIR``; Lightning's launcher starts rank 1 by
re-running this command.
"""

import os
import sys

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_cskl import CenterKernelCallback  # noqa: E402
from lightning_cskl.data import split_digits  # noqa: E402
from tests.lightning_helpers import make_model  # noqa: E402


def main(out_dir: str) -> None:
    L.seed_everything(0, verbose=False)
    tasks = split_digits(n_tasks=5, seed=0)
    model = make_model()
    # the statistics head reads the input of heads.0, which the end-of-task pass feeds (it calls model(x), task 0)
    # the statistics are carried across the second task's update: the map is fitted on both ranks' shards
    cb = CenterKernelCallback(score_batches=2, statistics_head="lda", head="heads.0", carry="affine")
    for t in range(2):
        model.current_task = t
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true",
                            callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(model, DataLoader(tasks[t].train, batch_size=16, shuffle=True))
    rank = trainer.global_rank
    torch.save({"learner": cb.learner.state_dict(), "model": model.state_dict(), "world_size": trainer.world_size,
                "statistics": cb.statistics.state_dict(), "samples": len(tasks[0].train) + len(tasks[1].train),
                "prefix_cache": prefix_cache_runs(tasks)}, os.path.join(out_dir, f"rank{rank}.pt"))


class Indexed(Dataset):
    """A task's items followed by their position in it (what ``index_fn`` reads)."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return (*self.data[i], i)


def prefix_cache_runs(tasks) -> dict:
    """The same two tasks (3 epochs each, DistributedSampler reshuffling the shards) without and with the prefix
    cache: this rank's final weights and, per task, what its cache did."""
    runs = {}
    for setting in ("off", "on"):
        L.seed_everything(0, verbose=False)
        model = make_model(scenario="class")
        cb = CenterKernelCallback(score_batches=2, prefix_cache=setting, prefix_cache_min_flops=0,
                                  index_fn=lambda batch: batch[-1])
        reports = []
        for t in range(2):
            model.current_task = t
            trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true",
                                callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
            trainer.fit(model, DataLoader(Indexed(tasks[t].train), batch_size=16, shuffle=True))
            reports.append(dict(cb.prefix_cache.last_task))
        runs[setting] = {"model": model.state_dict(), "reports": reports}
    return runs


if __name__ == "__main__":
    main(sys.argv[1])
