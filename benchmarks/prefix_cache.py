"""The prefix cache measured: per-step training FLOPs, wall time per epoch and per task, cache bytes and ACC,
uncached against the float32, float16 and 8-bit caches, on class-incremental Split Fashion-MNIST.

Every variant starts from one base session (trained once, all parameters) and trains the same incremental
experiences with CSKLStrategy's defaults (what ``cskl run`` runs); only ``prefix_cache`` /
``prefix_cache_precision`` differ. FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the
6th step of the first epoch (the prefix runs and fills the cache) and of the last epoch (it reads the cache) of
the last experience, against one full fine-tuning step of the same network on a batch of the same size.

    python benchmarks/prefix_cache.py --model small_cnn --width 16 --train_per_class 1000
    python benchmarks/prefix_cache.py --model resnet18 --width 20 --train_per_class 500
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.flop_counter import FlopCounterMode

from lightning_cskl.avalanche import CSKLStrategy, run_continual, train_base
from lightning_cskl.avalanche.job import build_model
from lightning_cskl.core.accounting import conv_backward_flops
from lightning_cskl.data.build import build_benchmark, input_channels
from lightning_cskl.experiments.baselines import METHODS
from lightning_cskl.options import DataOptions, ModelOptions

MEASURED_STEP = 5


def _flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


class Probe(SupervisedPlugin):
    """Wall time of every epoch and task of the incremental experiences; FLOPs of one step in the first and the
    last epoch of the last experience; what the cache did in each experience."""

    def __init__(self, last_experience: int) -> None:
        super().__init__()
        self.last = last_experience
        self.epochs: list[tuple[int, float]] = []  # (epoch index within the experience, seconds)
        self.tasks: list[float] = []
        self.flops: dict[str, int] = {}
        self.cache: list[dict[str, Any]] = []
        self._counter: Any = None

    def _incremental(self, strategy) -> bool:
        return strategy.experience.current_experience > 0

    def before_training_exp(self, strategy, *args, **kwargs):
        self._task_start = time.perf_counter()

    def before_training_epoch(self, strategy, *args, **kwargs):
        self._epoch_start = time.perf_counter()

    def after_training_epoch(self, strategy, *args, **kwargs):
        if self._incremental(strategy):
            self.epochs.append((strategy.clock.train_exp_epochs, time.perf_counter() - self._epoch_start))

    def before_training_iteration(self, strategy, *args, **kwargs):
        epoch = strategy.clock.train_exp_epochs
        if (strategy.experience.current_experience == self.last and strategy.clock.train_epoch_iterations == MEASURED_STEP
                and epoch in (0, strategy.train_epochs - 1)):
            self._counter = _flop_counter()
            self._counter.__enter__()
            self._counted = "first_epoch" if epoch == 0 else "last_epoch"

    def after_update(self, strategy, *args, **kwargs):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops[self._counted] = int(self._counter.get_total_flops())
            self._counter = None

    def after_training_exp(self, strategy, *args, **kwargs):
        if self._incremental(strategy):
            self.tasks.append(time.perf_counter() - self._task_start)
            self.cache.append(dict(strategy.cskl.prefix_cache.last_task))


def full_step_flops(model: torch.nn.Module, batch: int, shape: tuple[int, ...]) -> int:
    """FLOPs of one full fine-tuning step (every parameter trains) of ``model``."""
    model.train()
    x, y = torch.randn(batch, *shape), torch.randint(0, 2, (batch,))
    with _flop_counter() as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return int(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("small_cnn", "resnet18"), default="small_cnn")
    parser.add_argument("--width", type=float, default=None)
    parser.add_argument("--train_per_class", type=int, default=1000)
    parser.add_argument("--test_per_class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--root", default="data")
    parser.add_argument("--variants", default="off,float32,float16,int8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = DataOptions(benchmark="fashion_mnist", root=args.root, train_per_class=args.train_per_class,
                       test_per_class=args.test_per_class)
    benchmark = build_benchmark(data)
    channels = input_channels(benchmark)
    model_options = ModelOptions(name=args.model, width=args.width)

    def build(evaluator, method=None, plugins=(), **options):
        torch.manual_seed(args.seed)
        model = build_model(model_options, channels, task_incremental=False)
        common = dict(model=model, optimizer=torch.optim.Adam(model.parameters(), args.lr), evaluator=evaluator,
                      train_mb_size=args.batch_size, train_epochs=args.epochs, eval_mb_size=512, plugins=list(plugins))
        if method is not None:
            return METHODS[method](**common)
        return CSKLStrategy(**common, **options)

    began = time.perf_counter()
    base = train_base(benchmark, lambda evaluator: build(evaluator, "full_finetune"))
    print(f"base session: {time.perf_counter() - began:.0f} s")
    probe_model = build_model(model_options, channels, task_incremental=False)
    shape = tuple(benchmark.train_stream[0].dataset[0][0].shape)
    full = full_step_flops(probe_model, args.batch_size, shape)
    last = len(benchmark.train_stream) - 1

    rows = []
    for variant in args.variants.split(","):
        probe = Probe(last)
        options = {"prefix_cache": "off"} if variant == "off" else {"prefix_cache_precision": variant}
        began = time.perf_counter()
        result = run_continual(benchmark, lambda evaluator: build(evaluator, plugins=[probe], **options), base=base,
                               progress=False)
        seconds = time.perf_counter() - began
        first = [s for e, s in probe.epochs if e == 0]
        later = [s for e, s in probe.epochs if e > 0]
        rows.append({
            "variant": variant, "acc": result.summary["acc"], "forgetting": result.summary["forgetting"],
            "flops_first": probe.flops.get("first_epoch", 0) / full, "flops_later": probe.flops.get("last_epoch", 0) / full,
            "epoch1_s": sum(first) / len(first), "later_epoch_s": sum(later) / len(later),
            "task_s": sum(probe.tasks) / len(probe.tasks), "bytes": max(c.get("bytes", 0) for c in probe.cache),
            "cut": probe.cache[-1].get("cut"), "reason": probe.cache[-1].get("reason", ""), "run_s": seconds,
        })
        print(rows[-1], flush=True)

    off = next((r for r in rows if r["variant"] == "off"), rows[0])
    print(f"\n{args.model} width {args.width}, {args.train_per_class} training images per class, {args.epochs} epochs, "
          f"batch {args.batch_size}; full fine-tuning step: {full / 1e6:.1f} MFLOPs; cut: {rows[-1]['cut']}")
    print("| prefix cache | ACC | forgetting | FLOPs/step ×full, epoch 1 | later epochs | s / epoch 1 | "
          "s / later epoch | s / task | task speed-up | cache MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {100 * r['acc']:.2f} | {100 * r['forgetting']:.2f} | {r['flops_first']:.3f} | "
              f"{r['flops_later']:.3f} | {r['epoch1_s']:.2f} | {r['later_epoch_s']:.2f} | {r['task_s']:.2f} | "
              f"{off['task_s'] / r['task_s']:.2f}× | {r['bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
