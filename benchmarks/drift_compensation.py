"""Semantic drift compensation of the LDA head's stored class means (Yu et al., "Semantic Drift Compensation
for Class-Incremental Learning", CVPR 2020), with backbone methods that do move features (an exploration;
the measured answer in BENCHMARKS.md is that it does not rescue them here).

For each incremental experience the features of its training data are taken before and after it trains; each
stored class mean then moves by the Gaussian-weighted mean of those features' displacements (weights from the
distance of each sample's feature before training to the class mean, σ² = the median squared distance), before
the experience's own statistics are merged.

    python benchmarks/drift_compensation.py            # domain-incremental Fashion-MNIST, seed 0, ~15 min
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader

from lightning_cskl.avalanche import ClassIncrementalNet, run_continual, train_base
from lightning_cskl.experiments.baselines import build_method
from lightning_cskl.avalanche.strategy import find_head
from lightning_cskl.data.shifts import fashion_mnist_domains
from lightning_cskl.models import SmallCNN


@torch.no_grad()
def _features(model: torch.nn.Module, dataset: Any) -> torch.Tensor:
    head, captured, rows = find_head(model), [], []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    was_training = model.training
    model.eval()
    try:
        for x, *_ in DataLoader(dataset.eval(), batch_size=512):
            captured.clear()
            model(x)
            rows.append(captured[-1].flatten(1).double())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(rows)


class DriftCompensation(SupervisedPlugin):
    """Moves the method's stored class means by the estimated drift; put it before the method's plugin."""

    def __init__(self) -> None:
        super().__init__()
        self.before: Optional[torch.Tensor] = None

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        statistics = strategy.baseline.statistics
        self.before = _features(strategy.model, strategy.experience.dataset) if len(statistics) else None

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.before is None:
            return
        statistics = strategy.baseline.statistics
        displacement = _features(strategy.model, strategy.experience.dataset) - self.before
        distances = torch.cdist(statistics.means, self.before) ** 2  # classes × samples
        weights = torch.exp(-distances / (2 * distances.median()))
        drift = (weights @ displacement) / weights.sum(1, keepdim=True).clamp_min(1e-12)
        statistics.load_state_dict({**statistics.state_dict(), "means": statistics.means + drift})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    benchmark = fashion_mnist_domains(args.root, train_per_class=1000, test_per_class=300, seed=args.seed)

    def make(method: str, evaluator: Any, plugins: tuple = (), **options: Any) -> Any:
        torch.manual_seed(args.seed)
        cnn = SmallCNN(10, width=16)
        net = ClassIncrementalNet(cnn.features, cnn.feature_dim, initial_classes=2)
        return build_method(method, model=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3),
                            evaluator=evaluator, train_epochs=4, train_mb_size=64, eval_mb_size=512,
                            plugins=list(plugins), **options)

    base = train_base(benchmark, lambda ev: make("full_finetune", ev))
    print("| method | ACC | ACC with drift compensation |\n|---|---|---|")
    rows = {"`full_finetune_lda`": ("full_finetune_lda", {}),
            "`csko_dces_lda`, no projection": ("csko_dces_lda", {"project": False}),
            "`csko_dces_lda`, scaled α = 10": ("csko_dces_lda", {"projection_criterion": "scaled",
                                                                 "importance_scale": 10.0}),
            "`csko_dces_lda`": ("csko_dces_lda", {})}
    for name, (method, options) in rows.items():
        plain = run_continual(benchmark, lambda ev: make(method, ev, **options), base=base, progress=False)
        compensated = run_continual(benchmark, lambda ev: make(method, ev, (DriftCompensation(),), **options),
                                    base=base, progress=False)
        print(f"| {name} | {plain.summary['acc'] * 100:.1f} | {compensated.summary['acc'] * 100:.1f} |", flush=True)


if __name__ == "__main__":
    main()
