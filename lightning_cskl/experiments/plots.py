"""Plots of a comparison (:func:`lightning_cskl.experiments.bench.run_bench`): where people would rather look than read."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..report import draw_matrix

__all__ = ["pareto_front", "plot_bench"]

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points that no other point beats on both (lower cost and higher accuracy),
    sorted by cost.

    Example:
        >>> pareto_front([(1, 10), (2, 5), (3, 30), (4, 20), (0.5, 1)])
        [(0.5, 1), (1, 10), (3, 30)]
    """
    front: list[tuple[float, float]] = []
    for cost, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((cost, accuracy))
    return front


def plot_bench(table: Any, out_dir: Path) -> list[Path]:
    """Write, per scenario, accuracy against training memory (the Pareto picture) and against FLOPs per step,
    and the accuracy matrix of every method (first seed). Returns the PNG paths.

    Args:
        table: a :class:`~lightning_cskl.experiments.bench.BenchTable`.
        out_dir: folder for the PNGs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    summary = table.summary()
    for scenario in sorted({row["scenario"] for row in summary}):
        rows = [r for r in summary if r["scenario"] == scenario]
        for column, label, scale, name in (("training_memory_bytes", "training memory per step (KiB)", 1 / 1024,
                                            "memory"), ("flops", "training FLOPs per step (MFLOP)", 1e-6, "flops")):
            points = [r for r in rows if not math.isnan(r[f"{column}_mean"])]
            if not points:
                continue
            figure, axes = plt.subplots(figsize=(8.5, 4.8))
            colors = plt.get_cmap("tab20").colors
            for i, row in enumerate(points):  # a color and marker per method, named in the legend (labels collide)
                x, y = row[f"{column}_mean"] * scale, row["acc_mean"] * 100
                axes.errorbar(x, y, yerr=row["acc_std"] * 100, fmt=MARKERS[i % len(MARKERS)], capsize=3,
                              color=colors[i % len(colors)], label=row["method"], markersize=7)
            frontier = pareto_front([(r[f"{column}_mean"] * scale, r["acc_mean"] * 100) for r in points])
            if len(frontier) > 1:
                xs, ys = zip(*frontier)
                axes.step(xs, ys, where="post", color="grey", alpha=0.5, linewidth=1, zorder=0,
                          label="Pareto front")
            axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
            axes.set_xscale("log")
            axes.set_xlabel(label + " (log scale)")
            axes.set_ylabel("ACC after the last experience (%)")
            axes.set_title(f"{scenario}-incremental: accuracy against {name}", fontsize=10)
            axes.grid(alpha=0.3)
            figure.tight_layout()
            path = out_dir / f"acc_vs_{name}_{scenario}.png"
            figure.savefig(path, dpi=120)
            plt.close(figure)
            paths.append(path)
        runs = {}
        for run in table.runs:
            if run["scenario"] == scenario and run["method"] not in runs:
                runs[run["method"]] = run["accuracy"]
        if runs:
            columns = min(4, len(runs))
            lines = math.ceil(len(runs) / columns)
            figure, grid = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.0 * lines), squeeze=False)
            for axes, (method, accuracy) in zip(grid.flat, runs.items()):
                draw_matrix(axes, accuracy, annotate=False)
                axes.set_title(method, fontsize=9)
                axes.set_xticks([])
                axes.set_yticks([])
            for axes in list(grid.flat)[len(runs):]:
                axes.axis("off")
            figure.suptitle(f"{scenario}-incremental accuracy matrices (row: after experience i)", fontsize=10)
            figure.tight_layout()
            path = out_dir / f"accuracy_matrices_{scenario}.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            paths.append(path)
    return paths
