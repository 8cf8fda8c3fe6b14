"""Per-step training cost of CsKO against full fine-tuning of the same net, in the same run.

For a slim CIFAR-style ResNet-18 and a MobileNetV2 on 32×32 inputs, with the default layers (``"auto"``) and
Adam, this measures per training step: trainable parameters, training FLOPs (FlopCounterMode: forward,
backward and the projection), saved-activation bytes (saved_tensors_hooks, each storage once, weights and
buffers excluded), gradient + optimizer-state bytes, projection-state bytes and median step time.

CsKO is measured in its steady state: a covariance of center inputs has been recorded (the pretrained-model
path, ``learner.record``), the DCES scoring steps are done, so every measured step is masked and projected.
Its projection overhead compares, on the same model and the same trainable tensors, a CsKO step (gradient
masking + the learner's optimizer hooks: snapshot, projection, write-back) with a plain Adam step on those
tensors (a second Adam over the same parameters, no hooks, no masking); a third, identical plain step gives
the noise floor of that comparison. All timings are interleaved round-robin so the step kinds see the same
machine load; only medians and ratios are reported.

Inputs and labels are synthetic (normal noise, 10 classes): costs per step do not depend on pixel values.

``--ratios 0.25,0.5,0.75,1`` adds, per net, what DCES saves at each channel ratio ρ: the
trainable tensor, its gradient and Adam state, the weight-gradient FLOPs of the center branches (each branch's
weight gradient alone, on its real input), the saved input of the lowest trained layer's branch, and the whole
step's FLOPs and saved activations. Before engine v2, unselected channels were masked, not removed: every ρ cost
what ρ = 1 costs.

    python -m lightning_cskl.experiments.step_cost [--batch-size 32] [--repeats 30] [--ratios 0.25,0.5,0.75,1] \\
        [--markdown outputs/step_cost.md]      # or: python benchmarks/step_cost.py ...
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

from ..core import CenterKernelLearner
from ..core.accounting import (
    StepCost,
    make_train_step,
    measure_step,
    median_step_times,
    saved_activation_bytes,
    training_flops,
)
from ..models import mobilenet_v2, resnet18

# aims: CsKO / full fine-tuning
AIMS = {
    "flops": 0.5,
    "saved_activation_bytes": 0.25,
    "gradient_and_optimizer_bytes": 0.05,
}
OVERHEAD_AIM = 0.05
MIN_REPEATS = 7
OPTIMIZER_REPEATS = 100

MiB = 2.0**20


def _adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    # the method's defaults (METHOD.md section 4)
    return torch.optim.Adam(params, lr=1e-4, weight_decay=5e-4)


def csko_setup(
    base: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    record_batches: list[torch.Tensor],
    score_batches: int,
    layers: str,
    channel_ratio: float = 0.75,
) -> tuple[nn.Module, CenterKernelLearner, torch.optim.Optimizer, Any]:
    """A copy of ``base`` bound to a learner in steady state: covariance recorded, DCES scoring finished."""
    model = copy.deepcopy(base)
    learner = CenterKernelLearner(layers=layers, first_task="center", score_batches=score_batches,
                                  channel_ratio=channel_ratio)
    learner.bind(model)

    def run_forward() -> None:
        for x in record_batches:
            model(x)

    learner.record(run_forward)  # the base knowledge to protect: a non-empty covariance per trained layer
    learner.begin_task()
    model.train()
    optimizer = _adam(learner.trainable_parameters())
    handle = learner.attach_optimizer(optimizer)
    step = make_train_step(model, optimizer, nn.functional.cross_entropy, batch, learner)
    for _ in range(score_batches):
        step()
    if learner.phase != "training" or set(learner.free_bases) != set(learner.layers) or not learner.covariances:
        raise RuntimeError(f"CsKO did not reach its projected steady state (phase={learner.phase!r})")
    return model, learner, optimizer, handle


def branch_costs(model: nn.Module, learner: CenterKernelLearner, x: torch.Tensor) -> tuple[int, int]:
    """``(weight-gradient FLOPs of every center branch, bytes the lowest trained layer's branch saves)``.

    Each branch runs alone on the input its convolution sees in a forward pass of ``x``; its weight gradient is
    taken with the input not requiring a gradient, so the count holds the weight gradient and nothing else.
    """
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n in learner.layers]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    flops, lowest = 0, 0
    for index, name in enumerate(learner.layers):  # registration order: the first is the lowest
        branch = learner.branch(name)
        if branch is None:  # a layer trained in place (mask mode) has no branch
            continue
        x_in = inputs[name]
        with torch.no_grad():
            out = branch.conv(x_in)

        def weight_gradient() -> None:
            contribution = branch.contribution(x_in, out)
            torch.autograd.grad(contribution, branch.param, torch.ones_like(contribution))

        with torch.no_grad():
            forward = training_flops(lambda: branch.contribution(x_in, out))
        flops += training_flops(weight_gradient) - forward
        if index == 0:
            lowest = saved_activation_bytes(lambda: branch.contribution(x_in, out), exclude=[branch.param])
    return flops, lowest


def measure_ratios(
    name: str, factory: Callable[[], nn.Module], batch_size: int, ratios: list[float], score_batches: int, seed: int,
    layers: str = "auto", device: str = "cpu",
) -> dict[str, Any]:
    """What one CsKO step holds and spends at each channel ratio (no timing: bytes and FLOPs are exact)."""
    torch.manual_seed(seed)
    base = factory().to(device)
    x = torch.randn(batch_size, 3, 32, 32).to(device)
    batch = (x, torch.randint(0, 10, (batch_size,)).to(device))
    record_batches = [torch.randn(batch_size, 3, 32, 32).to(device) for _ in range(4)]
    rows = []
    for ratio in ratios:
        print(f"[{name}] channel_ratio {ratio}: measuring ...", flush=True)
        model, learner, optimizer, handle = csko_setup(base, batch, record_batches, score_batches, layers, ratio)
        cost = measure_step(model, optimizer, nn.functional.cross_entropy, batch, learner, time_steps=False)
        weight_gradient, lowest = branch_costs(model, learner, x)
        centers = sum(learner.trained_tensor(n).numel() for n in learner.layers)
        rows.append({"ratio": ratio, "cost": cost, "centers": centers, "weight_gradient_flops": weight_gradient,
                     "lowest_saved": lowest, "grouped": [n for n, l in learner.layers.items() if l.groups not in (1, l.in_channels)]})
        handle.remove()
    return {"name": name, "layers_spec": layers, "rows": rows}


RATIO_HEADER = ["ρ", "trained centers", "gradients", "Adam state", "weight-gradient FLOPs (branches)",
                "saved input, lowest branch", "step FLOPs", "saved activations"]


def ratio_table(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    top = result["rows"][-1]
    for row in result["rows"]:
        cost: StepCost = row["cost"]

        def cell(value: float, reference: float, fmt: Callable[[float], str]) -> str:
            return f"{fmt(value)} ({value / reference:.2f})" if reference else fmt(value)

        rows.append([
            f"{row['ratio']:g}",
            cell(row["centers"], top["centers"], lambda v: f"{int(v):,}"),
            cell(cost.gradient_bytes, top["cost"].gradient_bytes, _fmt_bytes),
            cell(cost.optimizer_state_bytes, top["cost"].optimizer_state_bytes, _fmt_bytes),
            cell(row["weight_gradient_flops"], top["weight_gradient_flops"], lambda v: f"{v / 1e6:.2f} MFLOP"),
            cell(row["lowest_saved"], top["lowest_saved"], _fmt_bytes),
            cell(cost.flops, top["cost"].flops, lambda v: f"{v / 1e9:.3f} GFLOP"),
            cell(cost.saved_activation_bytes, top["cost"].saved_activation_bytes, _fmt_bytes),
        ])
    return rows


def ratio_markdown(result: dict[str, Any]) -> str:
    lines = [f"#### {result['name']}: what DCES saves (layers={result['layers_spec']!r}; in brackets: / ρ = 1)", "",
             "| " + " | ".join(RATIO_HEADER) + " |", "|" + "|".join(["---"] * len(RATIO_HEADER)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in ratio_table(result)]
    grouped = result["rows"][0]["grouped"]
    if grouped:
        lines += ["", f"Grouped (not depthwise) layers ({', '.join(f'`{n}`' for n in grouped)}) keep every "
                      "channel's center and mask the unselected ones."]
    return "\n".join(lines + [""])


def _fmt_bytes(value: float) -> str:
    if value >= MiB:
        return f"{value / MiB:.2f} MiB"
    return f"{value / 1024:.1f} KiB"


def _fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def measure_net(
    name: str,
    factory: Callable[[], nn.Module],
    batch_size: int,
    warmup: int,
    repeats: int,
    time_budget: float,
    score_batches: int,
    clock: Callable[[], float],
    seed: int,
    layers: str = "auto",
    device: str = "cpu",
) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = factory().to(device)
    x = torch.randn(batch_size, 3, 32, 32).to(device)
    y = torch.randint(0, 10, (batch_size,)).to(device)
    batch = (x, y)
    record_batches = [torch.randn(batch_size, 3, 32, 32).to(device) for _ in range(4)]

    print(f"[{name}] full fine-tuning: measuring ...", flush=True)
    full = copy.deepcopy(base).train()
    full_opt = _adam(list(full.parameters()))
    full_cost = measure_step(full, full_opt, nn.functional.cross_entropy, batch, time_steps=False)

    print(f"[{name}] CsKO: recording covariance, DCES scoring, measuring ...", flush=True)
    model, learner, optimizer, handle = csko_setup(base, batch, record_batches, score_batches, layers)
    csko_cost = measure_step(model, optimizer, nn.functional.cross_entropy, batch, learner, time_steps=False)

    # the same CsKO model and trainable tensors, stepped by a plain Adam: no masking, no projection hooks
    plain_opt = _adam(learner.trainable_parameters())
    plain_step = make_train_step(model, plain_opt, nn.functional.cross_entropy, batch)
    plain_flops = training_flops(plain_step)
    with torch.no_grad():
        forward_flops = training_flops(lambda: model(x))
    # an identical second plain step: its time difference to the first is the noise floor of the overhead
    plain_opt_again = _adam(learner.trainable_parameters())
    plain_step_again = make_train_step(model, plain_opt_again, nn.functional.cross_entropy, batch)

    steps = {
        "full": make_train_step(full, full_opt, nn.functional.cross_entropy, batch),
        "csko": make_train_step(model, optimizer, nn.functional.cross_entropy, batch, learner),
        "csko_no_projection": plain_step,
        "csko_no_projection_again": plain_step_again,
    }
    print(f"[{name}] {warmup} warm-up rounds ...", flush=True)
    start = time.perf_counter()
    for _ in range(warmup):
        for step in steps.values():
            step()
    round_s = (time.perf_counter() - start) / max(1, warmup)
    # slow nets get fewer rounds so that a run stays within minutes; never fewer than MIN_REPEATS
    repeats = min(repeats, max(MIN_REPEATS, int(time_budget / max(round_s, 1e-9))))
    print(f"[{name}] timing {repeats} interleaved rounds (~{round_s:.1f} s each) ...", flush=True)
    load_before = os.getloadavg()[0]
    times = median_step_times(steps, 0, repeats, clock)
    load_after = os.getloadavg()[0]
    full_cost.step_time_s = times["full"]
    csko_cost.step_time_s = times["csko"]
    if learner.phase != "training":
        raise RuntimeError("CsKO left its steady state while timing")

    # the learner's own per-step work, isolated: on the same gradients, mask + hooked Adam step versus a plain
    # Adam step over the same tensors; both are short, so many rounds give a steady median
    print(f"[{name}] timing the optimizer step alone ({OPTIMIZER_REPEATS} interleaved rounds) ...", flush=True)
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    step_only = median_step_times(
        {"csko": lambda: (learner.before_update(), optimizer.step()), "plain": plain_opt.step},
        warmup=5,
        repeats=OPTIMIZER_REPEATS,
        clock=clock,
    )

    trained = {n: learner.trained_tensor(n) for n in learner.layers}
    snapshot_bytes = sum(t.numel() * t.element_size() for t in trained.values())
    head_params = sum(
        p.numel() for p in model.parameters() if p.requires_grad and all(p is not t for t in trained.values())
    )
    handle.remove()
    return {
        "name": name,
        "repeats": repeats,
        "load": (load_before, load_after),
        "layers_spec": layers,
        "full": full_cost,
        "csko": csko_cost,
        "plain_time": times["csko_no_projection"],
        "plain_flops": plain_flops,
        "plain_time_again": times["csko_no_projection_again"],
        "optimizer_step": step_only,
        "forward_flops": forward_flops,
        "layers": {n: tuple(t.shape) for n, t in trained.items()},
        "in_place": [n for n, layer in learner.layers.items() if layer.in_place],
        "free_dims": dict(learner.free_dims),
        "selected": {n: int(m.sum()) for n, m in learner.selected.items()},
        "center_params": sum(t.numel() for t in trained.values()),
        "head_params": head_params,
        "total_params": sum(p.numel() for p in base.parameters()),
        "snapshot_bytes": snapshot_bytes,
    }


ROWS = [
    ("trainable parameters", "trainable_parameters", lambda v: f"{v:,}"),
    ("training FLOPs / step", "flops", lambda v: f"{v / 1e9:.3f} GFLOP"),
    ("saved activations", "saved_activation_bytes", _fmt_bytes),
    ("gradients", "gradient_bytes", _fmt_bytes),
    ("Adam state", "optimizer_state_bytes", _fmt_bytes),
    ("gradients + optimizer state", "gradient_and_optimizer_bytes", _fmt_bytes),
    ("projection state", "projection_state_bytes", _fmt_bytes),
    ("training memory (sum of the above bytes)", "training_memory_bytes", _fmt_bytes),
    ("median step time", "step_time_s", lambda v: f"{v * 1e3:.1f} ms"),
]


def table(result: dict[str, Any]) -> list[list[str]]:
    full: StepCost = result["full"]
    csko: StepCost = result["csko"]
    ratios = csko.ratios(full)
    f, c = full.as_dict(), csko.as_dict()
    rows = []
    for label, key, fmt in ROWS:
        aim = AIMS.get(key)
        ratio = ratios[key]
        verdict = "" if aim is None or ratio is None else ("met" if ratio <= aim else "missed")
        rows.append([label, fmt(f[key]), fmt(c[key]), _fmt_ratio(ratio), "" if aim is None else f"≤ {aim}", verdict])
    overhead = csko.step_time_s / result["plain_time"] - 1.0
    flop_overhead = csko.flops / result["plain_flops"] - 1.0
    rows.append([
        "projection overhead (CsKO step vs same step without masking/projection)",
        "-",
        f"{result['plain_time'] * 1e3:.1f} → {csko.step_time_s * 1e3:.1f} ms",
        f"{overhead:+.1%} time, {flop_overhead:+.2%} FLOPs",
        f"≤ {OVERHEAD_AIM:.0%}",
        "met" if overhead <= OVERHEAD_AIM else "missed",
    ])
    extra = result["optimizer_step"]["csko"] - result["optimizer_step"]["plain"]
    rows.append([
        "projection overhead, isolated (mask + hooked Adam step − plain Adam step) / CsKO step",
        "-",
        f"{result['optimizer_step']['plain'] * 1e3:.2f} → {result['optimizer_step']['csko'] * 1e3:.2f} ms",
        f"{extra / csko.step_time_s:+.1%} time",
        f"≤ {OVERHEAD_AIM:.0%}",
        "met" if extra / csko.step_time_s <= OVERHEAD_AIM else "missed",
    ])
    noise = result["plain_time_again"] / result["plain_time"] - 1.0
    rows.append([
        "timing noise floor (two identical steps without projection)",
        "-",
        f"{result['plain_time'] * 1e3:.1f} vs {result['plain_time_again'] * 1e3:.1f} ms",
        f"{noise:+.1%}",
        "",
        "",
    ])
    return rows


HEADER = ["quantity", "full fine-tuning", "CsKO (+DCES)", "ratio", "aim", ""]


def print_table(result: dict[str, Any]) -> None:
    rows = [HEADER] + table(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    print()
    print(f"== {result['name']} ==")
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(details(result))


def details(result: dict[str, Any]) -> str:
    layers = ", ".join(
        f"`{n}` {shape}{' (1×1, whole weight)' if n in result['in_place'] else ''}" for n, shape in result["layers"].items()
    )
    forward = result["forward_flops"]
    free = ", ".join(f"`{n}` {result['free_dims'][n]} of {result['selected'][n]}" for n in result["free_dims"])
    return (
        f"Median of {result['repeats']} interleaved rounds; load average "
        f"{result['load'][0]:.1f} before / {result['load'][1]:.1f} after timing. "
        f"A forward pass alone costs {forward / 1e9:.3f} GFLOP "
        f"({forward / result['full'].flops:.3f} of full fine-tuning's step): the floor of any method that runs "
        f"the whole forward. "
        f"Trained layers (layers={result['layers_spec']!r}): {layers}. "
        f"Trainable: {result['center_params']:,} center/1×1 weights + {result['head_params']:,} head parameters "
        f"of {result['total_params']:,}. Free-subspace dimension r (summed over groups) of the selected input "
        f"channels: {free}. "
        f"Per step the learner also holds a transient pre-step snapshot of the trained tensors "
        f"({_fmt_bytes(result['snapshot_bytes'])}, not in the table)."
    )


def markdown(results: list[dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    for result in results:
        lines += [f"#### {result['name']}", ""]
        lines.append("| " + " | ".join(HEADER) + " |")
        lines.append("|" + "|".join(["---"] * len(HEADER)) + "|")
        for row in table(result):
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", details(result), ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resnet-nf", type=int, default=20, help="ResNet-18 base width (64 = full)")
    parser.add_argument("--mobilenet-width", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30, help="at most this many timed interleaved rounds per net")
    parser.add_argument("--time-budget", type=float, default=120.0,
                        help="seconds of timed rounds per net; fewer rounds (at least 7) for slow nets")
    parser.add_argument("--resnet-layers", default="auto", help="CsKO `layers` for the ResNet (default: 'auto')")
    parser.add_argument("--mobilenet-layers", default="auto", help="CsKO `layers` for the MobileNetV2 (default: 'auto')")
    parser.add_argument("--score-batches", type=int, default=2, help="DCES scoring steps before the measured steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="step time: wall time (default) or this process's CPU time (robust on a machine "
                             "shared with other jobs; use with --threads 1)")
    parser.add_argument("--markdown", default="outputs/step_cost.md", help="where to write the Markdown tables")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (timings synchronize it)")
    parser.add_argument("--ratios", default=None,
                        help="comma-separated channel ratios for the DCES table, e.g. 0.25,0.5,0.75,1 (ascending)")
    parser.add_argument("--skip-timing", action="store_true", help="only the DCES table (needs --ratios)")
    args = parser.parse_args(argv)
    ratios = None
    if args.ratios is not None:
        try:
            ratios = sorted(float(r) for r in args.ratios.split(","))
        except ValueError:
            parser.error(f"--ratios {args.ratios!r}: give numbers in (0, 1] separated by commas")
        if not ratios or not all(0 < r <= 1 for r in ratios):
            parser.error(f"--ratios {args.ratios!r}: every ratio must lie in (0, 1]")
    if args.skip_timing and ratios is None:
        parser.error("--skip-timing needs --ratios")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.device != "cpu" and args.clock == "cpu":
        parser.error("--clock cpu times this process's CPU work, not the device's: use --clock wall with --device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    nets = {
        f"ResNet-18 (nf={args.resnet_nf}), 32×32": (lambda: resnet18(10, 3, args.resnet_nf), args.resnet_layers),
        f"MobileNetV2 (width {args.mobilenet_width}), 32×32": (
            lambda: mobilenet_v2(10, 3, args.mobilenet_width), args.mobilenet_layers
        ),
    }
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )
    if args.device != "cpu":
        machine += f", device {args.device} ({torch.cuda.get_device_name(torch.device(args.device))})"
    print(f"machine: {machine}; batch size {args.batch_size}; Adam (lr 1e-4, weight decay 5e-4)", flush=True)
    results = [] if args.skip_timing else [
        measure_net(
            name, factory, args.batch_size, args.warmup, args.repeats, args.time_budget, args.score_batches,
            time.perf_counter if args.clock == "wall" else time.process_time, args.seed, layers, args.device,
        )
        for name, (factory, layers) in nets.items()
    ]
    for result in results:
        print_table(result)
    sweeps = [] if ratios is None else [
        measure_ratios(name, factory, args.batch_size, ratios, args.score_batches, args.seed, layers, args.device)
        for name, (factory, layers) in nets.items()
    ]
    for sweep in sweeps:
        print()
        print(ratio_markdown(sweep))
    header = (
        f"Batch size {args.batch_size}, 32×32×3 synthetic inputs, 10 classes, Adam (lr 1e-4, wd 5e-4), "
        f"CsKO channel_ratio 0.75, null-space θ=5, measured after {args.score_batches} DCES scoring steps; step "
        f"times ({args.clock} clock) are medians of interleaved rounds (full, CsKO, CsKO without projection). "
        f"Machine: {machine}.\n"
        f"Command: `python {shlex.join(['benchmarks/step_cost.py', *(argv if argv is not None else sys.argv[1:])])}`"
    )
    if args.markdown:
        os.makedirs(os.path.dirname(args.markdown) or ".", exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(markdown(results, header) + "\n" + "\n".join(ratio_markdown(s) for s in sweeps))
        print(f"\nMarkdown written to {args.markdown}")


if __name__ == "__main__":
    main()
