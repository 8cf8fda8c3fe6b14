"""Where a carried statistics head goes wrong: after each experience of a class-incremental run, the method's
carried class statistics are compared with the same statistics re-measured on the old classes' training data
under the current backbone (which needs the old data: a diagnosis, not a method).

For every experience after the base it prints the accuracy on all seen test data of the head whose old classes
hold (stale) the statistics as stored before the experience, (carried) what the carry made of them, (true) the
re-measured ones, and the two halves: true means with the carried covariances, carried means with the true
covariances; and how much of the old classes' mean drift the carry explained, ``1 − ‖μ_carried − μ_true‖ /
‖μ_stale − μ_true‖`` (1: all of it; 0: no better than not carrying; negative: worse).

    python benchmarks/carry_diagnosis.py --method cskl --options '{"carry": "affine", "project": false, "distill_weight": 1.0}'
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any, Optional

import torch
from avalanche.core import SupervisedPlugin

from lightning_cskl.avalanche.job import build_model
from lightning_cskl.avalanche.strategy import find_head
from lightning_cskl.core.head import StatisticsHead
from lightning_cskl.data.build import build_benchmark
from lightning_cskl.experiments.baselines import build_method
from lightning_cskl.experiments.statistics import head_features
from lightning_cskl.options import DataOptions, ModelOptions


def _hybrid(carried: StatisticsHead, true: StatisticsHead, old: torch.Tensor, means: str, covariances: str) -> StatisticsHead:
    """``carried`` with the old classes' means and/or per-class covariances taken from ``true``."""
    state = copy.deepcopy(carried.state_dict())
    index = torch.isin(carried.classes, old)
    true_index = torch.isin(true.classes, old)
    if means == "true":
        state["means"][index] = true.means[true_index]
    if covariances == "true" and carried.rule == "qda":
        state["class_scatter"][index] = true.class_scatter[true_index] * (
            carried.counts[index] / true.counts[true_index])[:, None, None]
    if carried.rule == "qda":
        state["scatter"] = state["class_scatter"].sum(0)
    elif covariances == "true":
        state["scatter"] = true.scatter * float(carried.counts.sum() / true.counts.sum())
    head = StatisticsHead(carried.rule, carried.shrinkage, carried.power)
    head.load_state_dict(state)
    return head


def _accuracy(head: StatisticsHead, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((head.logits(features.double()).argmax(1) == labels).double().mean())


class CarryDiagnosis(SupervisedPlugin):
    """Put it after the method's plugin (its carry and merge have run by this plugin's ``after_training_exp``)."""

    def __init__(self, test_stream: Any) -> None:
        super().__init__()
        self.test = list(test_stream)
        self.train_sets: list[Any] = []
        self.classes: list[int] = []
        self.stale: Optional[StatisticsHead] = None
        self.rows: list[dict[str, Any]] = []

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        stats = strategy.baseline.statistics
        self.stale = copy.deepcopy(stats) if len(stats) else None

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        index = strategy.experience.current_experience
        stats: StatisticsHead = strategy.baseline.statistics
        head = find_head(strategy.model, strategy.baseline.head)
        self.train_sets.append(strategy.experience.dataset)
        if self.stale is None:
            self.classes = stats.classes.tolist()
            return
        old = torch.tensor(self.classes)
        true = StatisticsHead(stats.rule, stats.shrinkage, stats.power)
        for dataset in self.train_sets:
            true.update(*head_features(strategy, head, dataset))
        tests = [head_features(strategy, head, e.dataset) for e in self.test[: index + 1]]
        features, labels = torch.cat([t[0] for t in tests]), torch.cat([t[1] for t in tests])
        stale = _hybrid(stats, self.stale, old, "true", "true")  # the stored statistics, before the carry
        variants = {"stale": stale, "carried": stats, "true": true,
                    "true means": _hybrid(stats, true, old, "true", "carried"),
                    "true covariances": _hybrid(stats, true, old, "carried", "true")}
        row: dict[str, Any] = {"experience": index}
        for name, variant in variants.items():
            row[name] = round(100 * _accuracy(variant, features, labels), 2)
        at = lambda h: h.means[torch.isin(h.classes, old)]  # noqa: E731
        explained = 1 - (at(stats) - at(true)).norm(dim=1) / (at(self.stale) - at(true)).norm(dim=1).clamp_min(1e-12)
        row["mean drift explained"] = round(float(explained.mean()), 3)
        row["relative drift"] = round(float(((at(self.stale) - at(true)).norm(dim=1) / at(true).norm(dim=1)).mean()), 3)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.classes = stats.classes.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="cskl")
    parser.add_argument("--options", default='{"carry": "affine", "project": false, "distill_weight": 1.0}')
    parser.add_argument("--root", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    bench = build_benchmark(DataOptions(benchmark="fashion_mnist", root=args.root, train_per_class=1000,
                                        test_per_class=300, seed=args.seed))
    net = build_model(ModelOptions(name="small_cnn", width=16), 1, task_incremental=False)
    diagnosis = CarryDiagnosis(bench.test_stream)
    strategy = build_method(args.method, model=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3),
                            evaluator=None, train_epochs=args.epochs, train_mb_size=64, plugins=[diagnosis],
                            **json.loads(args.options))
    for experience in bench.train_stream:
        strategy.train(experience)


if __name__ == "__main__":
    main()
