"""Prototype replay under SGD with momentum: is the default strategy stable, and what do the cheapest baselines get
with the same optimizer? Split Digits, class-incremental, SmallCNN width 16, SGD lr 0.05 momentum 0.9, 4 epochs.

    python benchmarks/sgd_replay.py      # about 1 minute on 2 cores; prints the mean accuracy after the last task
"""

import warnings

import torch
from avalanche.training import Naive

from lightning_cskl.avalanche import ClassIncrementalNet, CSKLStrategy, run_continual
from lightning_cskl.data import split_digits_benchmark
from lightning_cskl.experiments.baselines import build_method
from lightning_cskl.models import SmallCNN


def factory(method: str):
    def build(evaluator):
        torch.manual_seed(0)
        model = ClassIncrementalNet(SmallCNN(10, width=16).features, 32, initial_classes=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        common = dict(model=model, optimizer=optimizer, train_mb_size=32, train_epochs=4, eval_mb_size=512,
                      evaluator=evaluator)
        if method == "naive":
            return Naive(**common)
        if method == "csko":  # the default strategy: CsKO + DCES, prototype replay, LDA statistics head
            return CSKLStrategy(**common)
        return build_method(method, **common)

    return build


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print("| method | ACC after the last task |\n|---|---|")
    for method in ("naive", "head_replay", "slda", "csko_dces", "csko"):
        result = run_continual(split_digits_benchmark("class"), factory(method), progress=False)
        last = result.accuracy[-1]
        print(f"| {method} | {sum(last) / len(last):.3f} |", flush=True)
