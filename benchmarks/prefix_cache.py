r"""The prefix cache measured: per-step training FLOPs, wall time per epoch and per task, peak memory, cache bytes
and ACC, uncached against the float32, float16 and 8-bit caches, on class-incremental Split Fashion-MNIST.

Every variant starts from one base session (trained once, all parameters) and trains the same incremental
experiences with CSKLStrategy's defaults (what ``cskl run`` runs); only ``prefix_cache`` /
``prefix_cache_precision`` differ. A variant named after a method of
:data:`~lightning_cskl.experiments.baselines.METHODS` (``slda_qda``: the same QDA head on the frozen base, no
backward; ``head_replay``: the head alone trained with prototype replay) runs that method from the same base
session: the cheapest honest baselines, in the same process. FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the 6th
step (in a shorter epoch, its last full batch) of the first epoch (the prefix runs and fills the cache) and of the
last epoch (it reads the cache) of the last experience, against one full fine-tuning step of the same network on a
batch of the same size. Peak memory is the process's peak resident set over each variant's incremental experiences
(Linux: the high-water mark is reset through ``/proc/self/clear_refs`` before each), beside the resident set at its
start; on CUDA, the peak of ``torch.cuda.max_memory_allocated`` (the cache lives on the device there).

    python benchmarks/prefix_cache.py --model resnet18 --width 20 --train_per_class 500
    python benchmarks/prefix_cache.py --model small_cnn --width 16 --train_per_class 1000 --min_flops 0
    # the 32×32 ResNet-18 (full width; Fashion-MNIST padded to 32×32 and repeated to 3 channels, CIFAR's shape)
    python benchmarks/prefix_cache.py --model resnet18 --width 64 --size 32 --channels 3 --train_per_class 300 \
        --test_per_class 100 --variants off,float32,int8
    # MobileNetV2 (width 0.5) on the same inputs
    python benchmarks/prefix_cache.py --model mobilenet_v2 --width 0.5 --size 32 --channels 3 \
        --train_per_class 300 --test_per_class 100 --variants off,float32,int8
    # on a GPU, the same in one short script
    python benchmarks/prefix_cache.py --model resnet18 --width 64 --size 32 --channels 3 --device cuda
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
from lightning_cskl.core.prefix_cache import DEFAULT_MIN_FLOPS
from lightning_cskl.data.build import build_benchmark, input_channels
from lightning_cskl.data.fashion_mnist import load_fashion_mnist
from lightning_cskl.data.tensors import tensor_benchmark
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
        step = max(0, min(MEASURED_STEP, len(strategy.dataloader) - 2))  # a short epoch: its last full batch
        if (strategy.experience.current_experience == self.last and strategy.clock.train_epoch_iterations == step
                and epoch in (0, strategy.train_epochs - 1)):
            self._counter = _flop_counter()
            self._counter.__enter__()
            self._counted = "first_epoch" if epoch == 0 else "last_epoch"

    def after_update(self, strategy, *args, **kwargs):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops[self._counted] = int(self._counter.get_total_flops())
            self._counter = None

    def after_training(self, strategy, *args, **kwargs):
        # after every plugin's after_training_exp (a method's own task-end pass included, whatever the order)
        if self._incremental(strategy):
            self.tasks.append(time.perf_counter() - self._task_start)
            cskl = getattr(strategy, "cskl", None)  # a baseline method has no prefix cache
            self.cache.append(dict(cskl.prefix_cache.last_task) if cskl is not None else {})


def _resident_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB (Linux)."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    return kib / 1024


def reset_peak(device: torch.device) -> float:
    """Start a new peak-memory window; the memory in use now, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/clear_refs", "w") as clear:  # resets VmHWM to the current resident set
        clear.write("5")
    return _resident_mib("VmRSS")


def peak_mib(device: torch.device) -> float:
    """The peak memory of the window :func:`reset_peak` opened, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _resident_mib("VmHWM")


def padded_fashion_mnist(root: str, size: int, channels: int, train_per_class: int, test_per_class: int):
    """Class-incremental Split Fashion-MNIST with images zero-padded to ``size``×``size`` and repeated to
    ``channels`` channels (3×32×32: the input of a CIFAR ResNet-18), 4 base classes + 3 × 2."""
    def shaped(data, per_class):
        images, labels = data
        keep = torch.cat([(labels == c).nonzero().squeeze(1)[:per_class] for c in labels.unique()]).sort().values
        images, labels = images[keep], labels[keep]
        pad = size - images.shape[-1]
        images = torch.nn.functional.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return images.expand(-1, channels, -1, -1).contiguous(), labels

    train, test = load_fashion_mnist(root)
    return tensor_benchmark(shaped(train, train_per_class), shaped(test, test_per_class), "class", 4, 2)


def full_step_flops(model: torch.nn.Module, batch: int, shape: tuple[int, ...]) -> int:
    """FLOPs of one full fine-tuning step (every parameter trains) of ``model``."""
    model.train()
    x, y = torch.randn(batch, *shape), torch.randint(0, 2, (batch,))
    with _flop_counter() as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return int(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("small_cnn", "resnet18", "mobilenet_v2"), default="small_cnn")
    parser.add_argument("--width", type=float, default=None)
    parser.add_argument("--train_per_class", type=int, default=1000)
    parser.add_argument("--test_per_class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--root", default="data")
    parser.add_argument("--variants", default="off,float32,float16,int8",
                        help="off, float32, float16, int8, or a method of experiments.baselines.METHODS")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_flops", type=float, default=DEFAULT_MIN_FLOPS,
                        help="prefix_cache_min_flops (0: cache any frozen prefix, e.g. to measure the SmallCNN's)")
    parser.add_argument("--size", type=int, default=28, help="pad the images to SIZE×SIZE")
    parser.add_argument("--channels", type=int, default=1, help="repeat the images to this many channels")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.size == 28 and args.channels == 1:
        data = DataOptions(benchmark="fashion_mnist", root=args.root, train_per_class=args.train_per_class,
                           test_per_class=args.test_per_class)
        benchmark = build_benchmark(data)
    else:
        benchmark = padded_fashion_mnist(args.root, args.size, args.channels, args.train_per_class,
                                         args.test_per_class)
    channels = input_channels(benchmark)
    model_options = ModelOptions(name=args.model, width=args.width)

    def build(evaluator, method=None, plugins=(), **options):
        torch.manual_seed(args.seed)
        model = build_model(model_options, channels, task_incremental=False)
        common = dict(model=model, optimizer=torch.optim.Adam(model.parameters(), args.lr), evaluator=evaluator,
                      train_mb_size=args.batch_size, train_epochs=args.epochs, eval_mb_size=512, plugins=list(plugins),
                      device=device)
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
        method = variant if variant in METHODS else None  # a baseline beside the cache: slda_qda, head_replay
        options = ({} if method else {"prefix_cache": "off"} if variant == "off" else
                   {"prefix_cache_precision": variant, "prefix_cache_min_flops": args.min_flops})
        start_mib = reset_peak(device)
        began = time.perf_counter()
        result = run_continual(benchmark, lambda evaluator: build(evaluator, method, plugins=[probe], **options),
                               base=base, progress=False)
        seconds = time.perf_counter() - began
        top_mib = peak_mib(device)
        first = [s for e, s in probe.epochs if e == 0]
        later = [s for e, s in probe.epochs if e > 0]
        rows.append({
            "variant": variant, "acc": result.summary["acc"], "forgetting": result.summary["forgetting"],
            "flops_first": probe.flops.get("first_epoch", 0) / full,
            "flops_later": probe.flops.get("last_epoch", 0) / full,
            "epoch1_s": sum(first) / max(len(first), 1), "later_epoch_s": sum(later) / max(len(later), 1),
            "task_s": sum(probe.tasks) / len(probe.tasks), "bytes": max(c.get("bytes", 0) for c in probe.cache),
            "cut": probe.cache[-1].get("cut"), "reason": probe.cache[-1].get("reason", ""), "run_s": seconds,
            "flops_per_value": probe.cache[-1].get("flops_per_value"), "start_mib": start_mib, "peak_mib": top_mib,
        })
        print(rows[-1], flush=True)

    off = next((r for r in rows if r["variant"] == "off"), rows[0])
    cached = next((r for r in rows if r["flops_per_value"] is not None), rows[-1])
    print(f"\n{args.model} width {args.width}, {args.channels}×{args.size}×{args.size} inputs, "
          f"{args.train_per_class} training images per class, {args.epochs} epochs, batch {args.batch_size}, "
          f"{device}; full fine-tuning step: {full / 1e6:.1f} MFLOPs; cut: {cached['cut']}, its prefix spends "
          f"{cached['flops_per_value']} FLOPs per stored value (prefix_cache_min_flops={args.min_flops:g})")
    memory = "GPU MiB allocated: at start / peak" if device.type == "cuda" else "process MiB resident: at start / peak"
    print("| prefix cache | ACC | forgetting | FLOPs/step ×full, epoch 1 | later epochs | s / epoch 1 | "
          f"s / later epoch | s / task | task speed-up | cache MiB | {memory} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {100 * r['acc']:.2f} | {100 * r['forgetting']:.2f} | {r['flops_first']:.3f} | "
              f"{r['flops_later']:.3f} | {r['epoch1_s']:.2f} | {r['later_epoch_s']:.2f} | {r['task_s']:.2f} | "
              f"{off['task_s'] / r['task_s']:.2f}× | {r['bytes'] / 2**20:.1f} | {r['start_mib']:.0f} / "
              f"{r['peak_mib']:.0f} |")
        if r["reason"]:
            print(f"|   {r['variant']}: off, {r['reason']} |")


if __name__ == "__main__":
    main()
