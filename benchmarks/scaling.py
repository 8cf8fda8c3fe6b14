"""Scaling of CsKO's cost against width and of its projection state against the number of tasks.

Table 1 (width): per-step cost, batch 32, of full fine-tuning, GPM (whole k×k kernels of the layers CsKO
trains, energy criterion, Avalanche's ``FullKernelProjectionPlugin`` driven directly) and CsKO + DCES (engine
defaults, ``layers="auto"``, built by ``benchmarks/step_cost.py``'s steady-state setup) for CIFAR-style
ResNet-18s of several base widths ``nf``, on 32×32×3 synthetic inputs. Bytes and FLOPs only (exact; no
times). GPM and CsKO are measured in steady state: one old task's representations (``--record-batches``
batches of noise) recorded, free bases built.

Table 2 (number of tasks): projection state after T = 1..N tasks of different synthetic input distributions
(per-task mean image and low-rank structure), for CsKO + DCES (``CenterKernelLearner.projection_state_bytes``),
GPM as implemented here (the plugin's ``projection_state_bytes``: summed full-kernel covariances + free
bases) and GPM as published (the basis M of old representations, grown after each task; see
``lightning_cskl.experiments.scaling.PublishedGpmMemory``).

    python benchmarks/scaling.py --threads 1 [--widths 10 20 40] [--tasks 10] [--markdown outputs/scaling.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import sys
from typing import Any, Optional

import torch
from tqdm import tqdm

from lightning_cskl.core import resolve_layers
from lightning_cskl.core.accounting import StepCost
from lightning_cskl.experiments.baselines import FullKernelProjectionPlugin
from lightning_cskl.experiments.step_cost import csko_setup
from lightning_cskl.models import resnet18
from lightning_cskl.experiments.scaling import (
    TaskState,
    csko_state_over_tasks,
    full_finetune_setup,
    full_kernel_setup,
    full_kernel_state_over_tasks,
    measure_setups,
    synthetic_tasks,
)

MiB = 2.0**20
METHODS = ("full fine-tuning", "GPM (full k×k)", "CsKO + DCES")


def fmt_bytes(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= MiB:
        return f"{value / MiB:.2f} MiB"
    return f"{value / 1024:.1f} KiB"


def fmt_ratio(a: float, b: float) -> str:
    return "-" if not b else f"{a / b:.3f}"


def measure_width(nf: int, batch_size: int, record_batches: int, score_batches: int, seed: int,
                  progress: tqdm) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = resnet18(10, 3, nf)
    x = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (batch_size,))
    records = [torch.randn(batch_size, 3, 32, 32) for _ in range(record_batches)]

    def csko():
        model, learner, optimizer, _ = csko_setup(base, (x, y), records, score_batches, "auto")
        return model, optimizer, learner

    setups = {
        METHODS[0]: lambda: full_finetune_setup(base),
        METHODS[1]: lambda: full_kernel_setup(base, FullKernelProjectionPlugin("energy"), records),
        METHODS[2]: csko,
    }
    costs = {}
    for name, setup in setups.items():
        progress.set_description(f"width nf={nf}: {name}")
        costs.update(measure_setups({name: setup}, (x, y)))
        progress.update(1)
    layers = resolve_layers(base, "auto")
    shapes = {n: tuple(base.get_submodule(n).weight.shape) for n in layers}
    return {"nf": nf, "costs": costs, "layers": shapes, "total_params": sum(p.numel() for p in base.parameters())}


COLUMNS = [
    ("trainable params", lambda c: f"{c.trainable_parameters:,}"),
    ("training FLOPs / step", lambda c: f"{c.flops / 1e9:.3f} G"),
    ("saved activations", lambda c: fmt_bytes(c.saved_activation_bytes)),
    ("gradients + optimizer state", lambda c: fmt_bytes(c.gradient_and_optimizer_bytes)),
    ("projection state", lambda c: fmt_bytes(c.projection_state_bytes)),
    ("training memory", lambda c: fmt_bytes(c.training_memory_bytes)),
]
RATIO_KEYS = [
    ("trainable params", "trainable_parameters"),
    ("FLOPs", "flops"),
    ("saved act.", "saved_activation_bytes"),
    ("grad + opt", "gradient_and_optimizer_bytes"),
    ("projection state", "projection_state_bytes"),
    ("training memory", "training_memory_bytes"),
]


def width_tables(results: list[dict[str, Any]]) -> tuple[list[list[str]], list[list[str]]]:
    costs_rows = [["nf (params)", "method", *[c for c, _ in COLUMNS]]]
    for r in results:
        for i, (method, cost) in enumerate(r["costs"].items()):
            label = f"{r['nf']} ({r['total_params'] / 1e6:.2f} M)" if i == 0 else ""
            costs_rows.append([label, method, *[fmt(cost) for _, fmt in COLUMNS]])
    ratio_rows = [["nf", "CsKO ÷", *[c for c, _ in RATIO_KEYS]]]
    for r in results:
        full: StepCost = r["costs"][METHODS[0]]
        gpm: StepCost = r["costs"][METHODS[1]]
        csko: StepCost = r["costs"][METHODS[2]]
        c = csko.as_dict()
        for i, (other, name) in enumerate(((full, "full"), (gpm, "GPM"))):
            o = other.as_dict()
            ratio_rows.append([str(r["nf"]) if i == 0 else "", name, *[fmt_ratio(c[k], o[k]) for _, k in RATIO_KEYS]])
    return costs_rows, ratio_rows


def tasks_table(csko: list[TaskState], gpm: list[TaskState], n: int) -> list[list[str]]:
    rows = [[
        "T", "CsKO between tasks", "CsKO during task T+1 (free dims)", "GPM here: between tasks",
        "GPM here: during task T+1 (free dims)", "GPM published: M (rank)", "GPM published: M + M Mᵀ",
    ]]
    for c, g in zip(csko[:n], gpm[:n]):
        rows.append([
            str(c.tasks),
            fmt_bytes(c.between_bytes),
            f"{fmt_bytes(c.during_bytes)} ({'+'.join(str(v) for v in c.free_dims.values())})",
            fmt_bytes(g.between_bytes),
            f"{fmt_bytes(g.during_bytes)} ({'+'.join(str(v) for v in g.free_dims.values())})",
            f"{fmt_bytes(g.published_bytes)} ({'+'.join(str(v) for v in g.published_ranks.values())})",
            fmt_bytes(g.published_during_bytes),
        ])
    return rows


def render(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] * len(rows[0])) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[10, 20, 40], help="ResNet-18 base widths nf")
    parser.add_argument("--tasks", type=int, default=10, help="number of tasks N of table 2")
    parser.add_argument("--tasks-nf", type=int, default=20, help="ResNet-18 base width of table 2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--record-batches", type=int, default=4,
                        help="batches per (old) task whose representations are recorded")
    parser.add_argument("--train-steps", type=int, default=2, help="projected steps per task in table 2")
    parser.add_argument("--score-batches", type=int, default=2, help="DCES scoring steps per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--markdown", default="outputs/scaling.md", help="where to write the Markdown tables")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    command = shlex.join(["python", "benchmarks/scaling.py", *(argv if argv is not None else sys.argv[1:])])
    machine = (f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}")
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"command: {command}\nmachine: {machine}\ndate: {date}", flush=True)

    progress = tqdm(total=3 * len(args.widths) + 2, unit="measurement")
    widths = [measure_width(nf, args.batch_size, args.record_batches, args.score_batches, args.seed, progress)
              for nf in args.widths]

    # table 2: N + 1 tasks, so that the state of task N+1's start ("during") exists for T = N
    tasks = synthetic_tasks(args.tasks + 1, (3, 32, 32), args.batch_size, args.record_batches, seed=args.seed)
    torch.manual_seed(args.seed)
    base = resnet18(10, 3, args.tasks_nf)
    progress.set_description(f"tasks: CsKO + DCES over {args.tasks + 1} tasks")
    csko_states = csko_state_over_tasks(copy.deepcopy(base), tasks, args.train_steps,
                                        score_batches=args.score_batches)
    progress.update(1)
    progress.set_description(f"tasks: GPM over {args.tasks + 1} tasks")
    gpm_states = full_kernel_state_over_tasks(copy.deepcopy(base), tasks, FullKernelProjectionPlugin("energy"),
                                              args.train_steps)
    progress.update(1)
    progress.close()

    costs_rows, ratio_rows = width_tables(widths)
    t_rows = tasks_table(csko_states, gpm_states, args.tasks)
    layers = "; ".join(f"nf={r['nf']}: " + ", ".join(f"`{n}` {s}" for n, s in r["layers"].items()) for r in widths)
    notes_width = (
        f"Batch {args.batch_size}, 32×32×3 synthetic inputs, 10 classes, Adam (lr 1e-4, wd 5e-4) for every method. "
        f"GPM and CsKO train the same layers (`layers=\"auto\"`): {layers}; GPM trains their whole kernels + the "
        f"head, CsKO their centers (75% of input channels, DCES) + the head. Both protect one old task recorded "
        f"from {args.record_batches} batches of noise (GPM: energy ε = 0.97; CsKO: null space θ = 5). Projection "
        f"state = what each holds during a task (GPM: float32 (C·k²)² covariances + float32 bases, the smaller of the free and the used ones; CsKO: "
        f"float32 C² covariances + float32 C×r bases + C boolean masks; per layer GPM's covariance takes "
        f"k⁴ = 81× CsKO's elements and bytes). "
        f"Training memory = saved activations + gradients + optimizer state + projection state (frozen weights "
        f"excluded)."
    )
    notes_tasks = (
        f"ResNet-18 nf={args.tasks_nf}, {args.tasks + 1} synthetic tasks (per-task mean image + rank-4 structure + "
        f"noise 0.1, 32×32×3), each recorded from {args.record_batches} batches of {args.batch_size}; "
        f"{args.train_steps} projected Adam steps per task (CsKO: after {args.score_batches} DCES scoring steps). "
        f"Between tasks = after the T-th end_task / end of experience; during = once task T+1 has built its free "
        f"bases (free dims per layer in parentheses). GPM here = `FullKernelProjectionPlugin.projection_state_bytes()` "
        f"(summed float32 full-kernel covariances, + during a task the float32 free or used bases, whichever is smaller; "
        f"free dims in parentheses either way); CsKO = "
        f"`CenterKernelLearner.projection_state_bytes()` (summed float32 center covariances + boolean channel masks, "
        f"+ float32 free bases during a task); its task 1 is the base "
        f"session (recorded, not trained). GPM published = the float32 basis M of the old tasks' representations "
        f"grown by Saha et al.'s energy rule (ε_t = 0.97 + 0.003·t) from the same per-task covariances (rank per "
        f"layer in parentheses), and during a task also the dense float32 free_bases M Mᵀ its code builds."
    )
    print()
    print("== Width: per-step cost ==")
    print(render(costs_rows, False))
    print()
    print("== Width: CsKO + DCES ratios ==")
    print(render(ratio_rows, False))
    print()
    print("== Number of tasks: projection state ==")
    print(render(t_rows, False))

    if args.markdown:
        text = "\n".join([
            f"Command: `{command}`  ", f"Machine: {machine}  ", f"Date: {date}", "",
            "#### Per-step cost against width (ResNet-18, base width nf)", "",
            render(costs_rows, True), "", "CsKO + DCES divided by full fine-tuning and by GPM:", "",
            render(ratio_rows, True), "", notes_width, "",
            "#### Projection state against the number of tasks", "",
            render(t_rows, True), "", notes_tasks, "",
        ])
        os.makedirs(os.path.dirname(args.markdown) or ".", exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text)
        print(f"\nMarkdown written to {args.markdown}")


if __name__ == "__main__":
    main()
