"""Do the stored class statistics stay valid while the backbone trains?

The LDA statistics head keeps, per class, the mean feature measured when the class's experience ended, and one
shared covariance. If a method's backbone updates move old features, those statistics go stale. After the last
experience this script re-measures them on every experience's training data with the final network (what a
method that could keep every image would hold) and reports, per method:

* the drift of the stored class means, ``‖μ_stored − μ_now‖ / ‖μ_now‖`` averaged over classes;
* ACC with the stored statistics (what the method reports) and with the re-measured ones: the gap is the
  accuracy that staleness costs.

    python benchmarks/statistics_drift.py                    # domain-incremental Fashion-MNIST, ~5 min
    python benchmarks/statistics_drift.py --scenario class   # class-incremental (base 4 + 3×2)
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.utils.data import DataLoader

from lightning_cskl.avalanche import ClassIncrementalNet, run_continual, train_base
from lightning_cskl.experiments.baselines import build_method
from lightning_cskl.avalanche.strategy import find_head
from lightning_cskl.core.head import StatisticsHead
from lightning_cskl.data import split_fashion_mnist
from lightning_cskl.data.shifts import fashion_mnist_domains
from lightning_cskl.models import SmallCNN

METHODS = {  # name -> (registry method, options)
    "slda": ("slda", {}),
    "csko_dces_lda": ("csko_dces_lda", {}),
    "gpm_replay + LDA head": ("gpm_replay", {"statistics_head": "lda"}),
    "full_finetune_lda": ("full_finetune_lda", {}),
}


@torch.no_grad()
def _features(model: torch.nn.Module, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    head, captured, rows, labels = find_head(model), [], [], []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    model.eval()
    try:
        for x, y, *_ in DataLoader(dataset.eval(), batch_size=512):
            captured.clear()
            model(x)
            rows.append(captured[-1].flatten(1))
            labels.append(y)
    finally:
        handle.remove()
    return torch.cat(rows), torch.cat(labels)


def _accuracy(model: torch.nn.Module, statistics: StatisticsHead, stream: Any) -> float:
    accuracies = []
    for experience in stream:
        z, y = _features(model, experience.dataset)
        accuracies.append(float((statistics.logits(z).argmax(1) == y).float().mean()))
    return sum(accuracies) / len(accuracies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("domain", "class"), default="domain")
    parser.add_argument("--root", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.scenario == "domain":
        benchmark = fashion_mnist_domains(args.root, train_per_class=1000, test_per_class=300, seed=args.seed)
    else:
        benchmark = split_fashion_mnist(args.root, "class", train_per_class=1000)

    def make(method: str, evaluator: Any, **options: Any) -> Any:
        torch.manual_seed(args.seed)
        cnn = SmallCNN(10, width=16)
        net = ClassIncrementalNet(cnn.features, cnn.feature_dim, initial_classes=2)
        return build_method(method, model=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3),
                            evaluator=evaluator, train_epochs=args.epochs, train_mb_size=64, eval_mb_size=512,
                            **options)

    base = train_base(benchmark, lambda ev: make("full_finetune", ev))
    print("| method | ACC (stored statistics) | ACC (re-measured) | drift of the class means |\n|---|---|---|---|")
    for name, (method, options) in METHODS.items():
        built: list[Any] = []

        def factory(evaluator: Any, m: str = method, o: dict = options) -> Any:
            built.append(make(m, evaluator, **o))
            return built[-1]

        result = run_continual(benchmark, factory, base=base, progress=False)
        strategy = built[-1]
        stored = strategy.baseline.statistics
        now = StatisticsHead("lda", stored.shrinkage)
        for experience in benchmark.train_stream:
            now.update(*_features(strategy.model, experience.dataset))
        drift = ((stored.means - now.means).norm(dim=1) / now.means.norm(dim=1)).mean()
        remeasured = _accuracy(strategy.model, now, benchmark.test_stream)
        print(f"| {name} | {result.summary['acc'] * 100:.1f} | {remeasured * 100:.1f} | {float(drift):.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
