"""Does training the centers against the LDA statistics head (instead of the trained linear head) make them
earn their cost? (an exploration; the answer measured in BENCHMARKS.md is no.)

For each incremental experience the statistics of CsKO's LDA head are first updated, on a copy, with the
experience's own features from the network as it is at the experience's start; the centers then train with
cross-entropy on that copy's scores (``StatisticsHead.scores``: fixed statistics, the gradient flows into the
features), so they pull the new experience's features towards the class statistics that will classify them.
Prototype replay is off (the linear head is not used). At the end of the experience the real statistics are
updated as usual, from the trained network. Compared on the same base session with ``slda`` (frozen base + LDA),
``full_finetune_lda`` (the room to adapt) and ``csko_dces_lda`` (CsKO + DCES trained with its linear head).

    python benchmarks/statistics_loss.py --data fashion_mnist   # domain-incremental Fashion-MNIST, ~10 min
    python benchmarks/statistics_loss.py --data digits          # domain-incremental digits, ~1 min
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from lightning_cskl.avalanche import ClassIncrementalNet, run_continual, train_base
from lightning_cskl.experiments.baselines import build_method
from lightning_cskl.avalanche.strategy import find_head, record_loader
from lightning_cskl.data.shifts import fashion_mnist_domains, split_digits_domains
from lightning_cskl.models import SmallCNN


class StatisticsLoss(SupervisedPlugin):
    """Replace the training logits of incremental experiences by the scores of CsKO's statistics head, updated
    (on a copy) with the experience's features at its start; ``scale`` multiplies the scores."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.active = False
        self.features: list[torch.Tensor] = []
        self.handle: Any = None

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        plugin = strategy.cskl
        self.active = plugin.learner.tasks_seen > 0
        if not self.active:
            return
        plugin._replay_head = None  # the linear head is not trained against: no prototype replay
        statistics = copy.deepcopy(plugin.statistics)
        head, model = find_head(strategy.model), strategy.model
        captured: list[torch.Tensor] = []
        capture = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for x, y, *_ in record_loader(strategy, None):
                    captured.clear()
                    model(x.to(strategy.device))
                    statistics.update(captured[-1], y)
        finally:
            capture.remove()
            model.train(was_training)
        self.statistics = statistics
        self.handle = head.register_forward_pre_hook(lambda module, args: self.features.append(args[0]))

    def after_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if not self.active or not strategy.model.training:
            return
        scores = self.statistics.scores(self.features[-1]) * self.scale
        self.features.clear()
        out = torch.full_like(strategy.mb_output, -1e4)
        out[:, self.statistics.classes.to(out.device)] = scores.to(out.dtype)
        strategy.mb_output = out

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.active = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("digits", "fashion_mnist"), default="fashion_mnist")
    parser.add_argument("--root", default="data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.data == "digits":
        benchmark, epochs = split_digits_domains(seed=args.seed), 8
    else:
        benchmark, epochs = fashion_mnist_domains(args.root, train_per_class=1000, test_per_class=300,
                                                  seed=args.seed), 4

    def make(method: str, evaluator: Any, plugins: tuple = (), **options: Any) -> Any:
        torch.manual_seed(args.seed)
        cnn = SmallCNN(10, width=16)
        net = ClassIncrementalNet(cnn.features, cnn.feature_dim, initial_classes=2)
        return build_method(method, model=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3),
                            evaluator=evaluator, train_epochs=epochs, train_mb_size=64, eval_mb_size=512,
                            plugins=list(plugins), **options)

    base = train_base(benchmark, lambda ev: make("full_finetune", ev))
    print("| run | ACC | forgetting | last row | a[i][i] |\n|---|---|---|---|---|")

    def show(name: str, result: Any) -> None:
        last = " / ".join(f"{a * 100:.1f}" for a in result.accuracy[-1])
        diagonal = " / ".join(f"{result.accuracy[i][i] * 100:.1f}" for i in range(len(result.accuracy)))
        print(f"| {name} | {result.summary['acc'] * 100:.1f} | {result.summary['forgetting'] * 100:.1f} | {last} | "
              f"{diagonal} |", flush=True)

    for method in ("slda", "full_finetune_lda", "csko_dces_lda"):
        show(method, run_continual(benchmark, lambda ev, m=method: make(m, ev), base=base, progress=False))
    settings = {"null space": {}, "no projection": {"project": False},
                "scaled (α = 1)": {"projection_criterion": "scaled", "importance_scale": 1.0}}
    for scale in (1.0, 0.1):
        for label, options in settings.items():
            show(f"trained against LDA, scores × {scale}, {label}", run_continual(
                benchmark, lambda ev, o=options: make("csko_dces_lda", ev, (StatisticsLoss(scale),), **o),
                base=base, progress=False))


if __name__ == "__main__":
    main()
