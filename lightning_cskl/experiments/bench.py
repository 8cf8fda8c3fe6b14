"""The comparison runner: methods × scenarios × seeds on one benchmark, side by side, into Markdown and CSV.

Each run is :func:`~lightning_cskl.avalanche.run_continual` with a strategy from
:data:`~lightning_cskl.experiments.baselines.METHODS`, on the same data, epochs, batch size and optimizer for
every method. Experience 0 is the base session: per scenario and seed it is trained once, with every
parameter (full fine-tuning), and that checkpoint starts every method (``run_continual(base=...)``), so all
methods share ``a[0][0]`` (the ``base_acc`` column) and begin their incremental experiences from the same
weights. With ``out_dir`` set, each finished run is kept in ``out_dir/runs/`` and a rerun with the same
settings skips it: an interrupted comparison resumes where it stopped.

Cost columns come from :func:`lightning_cskl.core.accounting.measure_step` on one training batch of the last
experience, measured at the end of its last epoch in the method's real incremental state (frozen parts,
hooks, projection) and then undone (weights, optimizer state and random state are restored, so the
accuracies are those of an unmeasured run). What it does not see: LwF's extra forward of the old model, the
EWC penalty and CsKO's prototype-replay loss (small element-wise or head-only work); EWC's stored Fisher and
parameters count as its projection state.

Example:
    >>> # table = run_bench(["full_finetune", "last_layer", "csko_dces"], scenarios=("class",), seeds=(0,),
    >>> #                   epochs=5, out_dir="bench_out")
    >>> # print(table.markdown())
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
import time
from typing import Any, Callable, Literal, Optional, Union

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import is_multi_task_module
from torch import Tensor, nn

from .baselines import (
    FROZEN_METHODS, METHODS, SINGLE_HEAD_METHODS, UnknownMethodError, build_method, method_base,
)
from ..avalanche.job import build_model
from ..avalanche.run import run_continual, train_base
from ..data.build import build_benchmark, input_channels
from ..options import DataOptions, ModelOptions, UsageError
from ..core.accounting import StepCost, measure_step, storage_bytes

__all__ = [
    "ACCURACY_COLUMNS", "BenchTable", "COST_COLUMNS", "CostProbe", "ON_DEVICE_METHODS", "PROJECTION_METHODS",
    "claims_markdown", "default_benchmark", "default_model", "run_bench",
]

logger = logging.getLogger(__name__)

ACCURACY_COLUMNS = ("acc", "aia", "forgetting", "bwt", "base_acc", "adaptation_gain", "frozen_gain", "epochs")
#: the cheapest trained baseline: what a backbone update adds is measured against it (PROTOCOL.md)
GAIN_REFERENCE = "head_replay"
SCENARIOS = ("class", "task", "domain")
COST_COLUMNS = (
    "trainable_parameters", "flops", "forward_flops", "backward_flops", "saved_activation_bytes", "gradient_bytes",
    "optimizer_state_bytes", "projection_state_bytes", "training_memory_bytes", "step_time_s", "step_time_ratio",
    "carry_seconds",
)
#: per statistics rule, the frozen-base method with that head: what a backbone update adds to a statistics head
#: is measured against it (``frozen_gain``)
FROZEN_REFERENCE = {"lda": "slda", "ncm": "ncm", "qda": "slda_qda"}


def default_benchmark(scenario: str, seed: int) -> Any:
    """Split Digits (offline, seconds): ``"class"`` = 4 base classes + 3 × 2, ``"task"`` = 5 × 2 classes."""
    from ..data import split_digits_benchmark

    return split_digits_benchmark(scenario, seed=seed)


def default_model(scenario: str) -> nn.Module:
    """A SmallCNN backbone (width 16) with Avalanche's expanding head (class) or per-task heads (task)."""
    from ..avalanche import ClassIncrementalNet, TaskIncrementalNet
    from ..models import SmallCNN

    net = ClassIncrementalNet if scenario == "class" else TaskIncrementalNet
    return net(SmallCNN(10, width=16).features, 32, initial_classes=2)


# ---------------------------------------------------------------------------------------------- cost probe
class _WithTask(nn.Module):
    """Feeds a multi-task model its task labels, so that measure_step can call ``model(inputs)``."""

    def __init__(self, model: nn.Module, task_labels: Tensor) -> None:
        super().__init__()
        self.model = model
        self.task_labels = task_labels

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, self.task_labels)


class _StepHooks:
    """What measure_step needs of a ``learner``: the per-step gradient rewrite and the projection state."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        plugin = getattr(strategy, "baseline", None)
        self.learner = getattr(plugin, "learner", None)  # CSKL: masking and DCES live in before_update
        self.plugin = plugin

    def before_update(self) -> None:
        if self.learner is not None:
            self.learner.before_update()

    def trainable_parameters(self) -> list[Any]:
        """What trains beside the model's own parameters (CsKO's center branches), for measure_step's counts."""
        return self.learner.trainable_parameters() if self.learner is not None else []

    def extra_forward_passes(self) -> int:
        """No-gradient forward passes a step runs besides its own (CsKO's feature distillation: one)."""
        return 1 if getattr(self.plugin, "distill_weight", 0) > 0 else 0

    def projection_state_bytes(self) -> int:
        if self.learner is not None:
            return int(self.learner.projection_state_bytes())
        if hasattr(self.plugin, "projection_state_bytes"):
            return int(self.plugin.projection_state_bytes())
        ewc = next((p for p in self.strategy.plugins if type(p).__name__ == "EWCPlugin"), None)
        if ewc is not None:  # the stored parameters and Fisher importances of every old experience
            tables = (ewc.saved_params, ewc.importances)
            tensors = [d.data for table in tables for per_exp in table.values() for d in per_exp.values()]
            return storage_bytes(tensors)
        return 0


class CostProbe(SupervisedPlugin):
    """An Avalanche plugin that measures one training step (:func:`~lightning_cskl.core.accounting.measure_step`)
    at the end of the last epoch of experience ``experience``, in the method's real state, then restores the
    weights, buffers, optimizer state and random state, so the run goes on as if unmeasured.

    Args:
        experience: index of the training experience to measure in.
        time_steps: also time the step (median of ``repeats``).
        repeats: timed steps.

    Attributes:
        cost: the :class:`~lightning_cskl.core.accounting.StepCost`, None until measured.
    """

    def __init__(self, experience: int, time_steps: bool, repeats: int, first_epoch: bool = False) -> None:
        super().__init__()
        self.experience = experience
        self.time_steps = time_steps
        self.repeats = repeats
        self.first_epoch = first_epoch
        self.cost: Optional[StepCost] = None
        self._epochs = 0

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._epochs = 0

    def after_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._epochs += 1
        last = 1 if self.first_epoch else strategy.train_epochs
        if strategy.experience.current_experience != self.experience or self._epochs != last:
            return
        self.measure(strategy)
        if self.first_epoch:
            strategy.stop_training()

    def measure(self, strategy: Any) -> None:
        """Measure one step now, in the strategy's current state, and restore everything it touched."""
        import numpy as np

        model, optimizer = strategy.model, strategy.optimizer
        # saved first: a new DataLoader iterator draws its seed from the global generator
        saved_rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        saved_model = copy.deepcopy(model.state_dict())
        saved_optimizer = copy.deepcopy(optimizer.state_dict())
        was_training = model.training
        x, y, *rest = [t.to(strategy.device) for t in next(iter(strategy.dataloader))]
        measured = _WithTask(model, rest[0]) if is_multi_task_module(model) and rest else model
        try:
            self.cost = measure_step(measured, optimizer, strategy._criterion, (x, y), _StepHooks(strategy),
                                     warmup=1, repeats=self.repeats, time_steps=self.time_steps)
        finally:
            model.load_state_dict(saved_model)
            optimizer.load_state_dict(saved_optimizer)
            torch.set_rng_state(saved_rng[0])
            random.setstate(saved_rng[1])
            np.random.set_state(saved_rng[2])
            model.train(was_training)
            optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- table
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass
class BenchTable:
    """Rows of a :func:`run_bench`: one per (method, scenario, seed), and their mean ± std per (method,
    scenario).

    Attributes:
        runs: one dict per run: ``method``, ``scenario``, ``seed``, the accuracy columns (fractions) and the
            cost columns (bytes, FLOPs, seconds); ``accuracy`` holds the accuracy matrix.
    """

    runs: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> list[dict[str, Any]]:
        """Per (method, scenario), in run order: ``seeds`` and ``<column>_mean`` / ``<column>_std``."""
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for run in self.runs:
            groups.setdefault((run["method"], run["scenario"]), []).append(run)
        rows = []
        for (method, scenario), runs in groups.items():
            row: dict[str, Any] = {"method": method, "scenario": scenario, "seeds": len(runs)}
            for column in ACCURACY_COLUMNS + COST_COLUMNS:
                row[f"{column}_mean"], row[f"{column}_std"] = _mean_std([r.get(column) for r in runs])
            rows.append(row)
        return rows

    def markdown(self) -> str:
        """The summary as a Markdown table; accuracies in points, memory in KiB, FLOPs in MFLOP, mean ± std."""
        header = ["method", "scenario", "seeds", "ACC", "adaptation gain", "gain over frozen head", "AIA", "forgetting",
                  "BWT", "base ACC", "epochs", "trainable params",
                  "train memory KiB", "grad KiB", "opt state KiB", "activations KiB", "projection KiB",
                  "MFLOP/step", "backward MFLOP/step", "step time ×full", "task-end carry s"]
        columns = [("acc", 100), ("adaptation_gain", 100), ("frozen_gain", 100), ("aia", 100), ("forgetting", 100), ("bwt", 100),
                   ("base_acc", 100), ("epochs", 1), ("trainable_parameters", 1), ("training_memory_bytes", 1 / 1024), ("gradient_bytes", 1 / 1024),
                   ("optimizer_state_bytes", 1 / 1024), ("saved_activation_bytes", 1 / 1024),
                   ("projection_state_bytes", 1 / 1024), ("flops", 1e-6), ("backward_flops", 1e-6),
                   ("step_time_ratio", 1), ("carry_seconds", 1)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.summary():
            cells = [row["method"], row["scenario"], str(row["seeds"])]
            for column, scale in columns:
                mean, std = row[f"{column}_mean"], row[f"{column}_std"]
                if math.isnan(mean):
                    cells.append("–")
                elif column in ("trainable_parameters", "epochs"):
                    cells.append(f"{mean:,.0f}")
                else:
                    digits = 2 if column in ("step_time_ratio", "carry_seconds") else 1
                    cells.append(f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def effect_markdown(self) -> str:
        """Where the CsKO runs' center updates act (the learner's ``update_effect``), as a Markdown table: per
        method, scenario and trained layer, the relative change of the center output on each experience's own
        inputs and on the old experiences' inputs, averaged over incremental experiences and seeds ("" when no
        run recorded one)."""
        cells: dict[tuple[str, str, str], dict[str, list[float]]] = {}
        for run in self.runs:
            for experience in run.get("update_effect") or []:
                for layer, effect in experience.items():
                    cell = cells.setdefault((run["method"], run["scenario"], layer), {"new": [], "old": []})
                    for data in ("new", "old"):
                        if effect.get(data) is not None and not math.isnan(effect[data]):
                            cell[data].append(effect[data])
        if not cells:
            return ""
        lines = ["| method | scenario | layer | change on new inputs | change on old inputs | old / new |",
                 "|---|---|---|---|---|---|"]
        for (method, scenario, layer), cell in cells.items():
            new, old = _mean_std(cell["new"])[0], _mean_std(cell["old"])[0]
            ratio = old / new if new and not math.isnan(new) else math.nan
            lines.append(f"| {method} | {scenario} | {layer} | {new:.4f} | {old:.4f} | {ratio:.2f} |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Union[str, os.PathLike], name: str = "bench") -> dict[str, Path]:
        """Write ``<name>.md`` (summary), ``<name>.csv`` (summary, mean and std columns) and
        ``<name>_runs.csv`` (one row per run); return their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / f"{name}.md", "csv": out / f"{name}.csv", "runs_csv": out / f"{name}_runs.csv"}
        effect = self.effect_markdown()
        paths["markdown"].write_text(self.markdown() + (f"\nWhere the center updates act:\n\n{effect}" if effect else ""))
        summary = self.summary()
        _write_csv(paths["csv"], summary, list(summary[0]) if summary else ["method"])
        run_columns = ["method", "scenario", "seed", *ACCURACY_COLUMNS, *COST_COLUMNS]
        _write_csv(paths["runs_csv"], self.runs, run_columns)
        return paths


ON_DEVICE_METHODS = ("full_finetune", "last_layer", "bias_only", "sparse_update")
PROJECTION_METHODS = ("gpm", "adam_nscl", "gpm_all", "adam_nscl_all", "gpm_replay", "adam_nscl_replay")


def claims_markdown(table: BenchTable, ours: str = "csko_dces") -> str:
    """The paper's claims checked against a comparison, one section per scenario (Markdown).

    For method ``ours``: its ACC against the best on-device method (:data:`ON_DEVICE_METHODS`: the claim is
    +20 points or more); and against every projection method (:data:`PROJECTION_METHODS`) present, its ACC gap
    (claim: within 2 points) and its ratios of training memory (claim ≤ 0.08), backward FLOPs (≤ 0.10) and
    training FLOPs per step (≤ 0.40; its forward pass alone is the floor shown beside it); and its forgetting
    (claim ≤ 5 points). Means over seeds; a method that did not run is left out.

    Example:
        >>> # print(claims_markdown(run_bench(["last_layer", "gpm", "csko_dces"], seeds=(0,))))
    """
    def value(row: dict[str, Any], column: str) -> float:
        return row[f"{column}_mean"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines: list[str] = []
    summary = table.summary()
    for scenario in dict.fromkeys(row["scenario"] for row in summary):
        rows = {r["method"]: r for r in summary if r["scenario"] == scenario}
        mine = rows.get(ours)
        if mine is None:
            continue
        lines += [f"### {scenario}-incremental: {ours}", "", "| claim | measured | |", "|---|---|---|"]
        acc = value(mine, "acc") * 100
        on_device = [(value(r, "acc") * 100, m) for m, r in rows.items() if m in ON_DEVICE_METHODS]
        if on_device:
            best, name = max(on_device)
            lines.append(f"| ACC ≥ best on-device method + 20 points | {acc:.1f} vs {best:.1f} ({name}): "
                         f"{acc - best:+.1f} points | {verdict(acc - best >= 20)} |")
        forgetting = value(mine, "forgetting") * 100
        if not math.isnan(forgetting):
            lines.append(f"| forgetting ≤ 5 points | {forgetting:.1f} points | {verdict(forgetting <= 5)} |")
        floor = mine.get("forward_flops_mean", math.nan) / value(mine, "flops")
        for method in PROJECTION_METHODS:
            if method not in rows:
                continue
            other = rows[method]
            gap = acc - value(other, "acc") * 100
            memory = value(mine, "training_memory_bytes") / value(other, "training_memory_bytes")
            backward = value(mine, "backward_flops") / value(other, "backward_flops")
            total = value(mine, "flops") / value(other, "flops")
            lines += [
                f"| ACC within 2 points of {method} | {acc:.1f} vs {value(other, 'acc') * 100:.1f}: {gap:+.1f} "
                f"points | {verdict(gap >= -2)} |",
                f"| training memory ≤ 8% of {method}'s | {memory:.1%} | {verdict(memory <= 0.08)} |",
                f"| backward FLOPs ≤ 10% of {method}'s | {backward:.1%} | {verdict(backward <= 0.10)} |",
                f"| training FLOPs ≤ 40% of {method}'s | {total:.1%} (floor: our forward pass is "
                f"{floor * total:.1%} of {method}'s step) | {verdict(total <= 0.40)} |",
            ]
        lines.append("")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------- runner
def run_bench(
    methods: Sequence[str],
    *,
    scenarios: Sequence[str] = ("class", "task"),
    seeds: Sequence[int] = (0, 1, 2),
    benchmark: Callable[[str, int], Any] = default_benchmark,
    model: Callable[[str], nn.Module] = default_model,
    epochs: int = 1,
    batch_size: int = 32,
    eval_batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    method_options: Optional[dict[str, dict[str, Any]]] = None,
    time_steps: bool = True,
    time_repeats: int = 5,
    out_dir: Union[str, os.PathLike, None] = None,
    progress: bool = True,
    resume: bool = True,
    identity: Optional[dict[str, Any]] = None,
    equal_compute: bool = False,
) -> BenchTable:
    """Run every method on every scenario and seed; measure accuracy and per-step cost side by side.

    Args:
        methods: names from :data:`~lightning_cskl.experiments.baselines.METHODS`.
        scenarios: ``"class"`` and/or ``"task"`` (passed to ``benchmark`` and ``model``).
        seeds: one run per seed: seeds the benchmark split, the initial weights and the data order.
        benchmark: ``benchmark(scenario, seed)`` -> an Avalanche benchmark (default: Split Digits).
        model: ``model(scenario)`` -> a fresh network (default: SmallCNN with Avalanche heads).
        epochs, batch_size, eval_batch_size: training epochs per experience and mini-batch sizes.
        lr, weight_decay: Adam's, the same for every method.
        method_options: per method name, extra options for its factory (e.g. ``{"ewc": {"ewc_lambda": 10}}``);
            ``train_epochs`` there overrides ``epochs`` for that method. A name ``"<method>@<tag>"`` in
            ``methods`` runs ``<method>`` with the options given under the whole name (an ablation row).
        time_steps: measure the median step time (and its ratio to ``full_finetune`` when that runs too).
        time_repeats: timed steps per measurement.
        out_dir: if given, the tables are written there (see :meth:`BenchTable.write`), the base-session
            checkpoints to ``out_dir/base/`` and each finished run to ``out_dir/runs/``.
        progress: a tqdm bar over runs.
        resume: reuse the runs kept in ``out_dir/runs/`` whose settings match (False: rerun everything).
        identity: what else identifies a run (data and model options, JSON values): a kept run is reused
            only if it was made with the same ``identity``, training settings and method options.
        equal_compute: give every method the training FLOPs that full fine-tuning spends in ``epochs`` epochs
            per experience, instead of the same epochs: a method's epochs are ``epochs × full fine-tuning's
            FLOPs per step / its own`` (rounded, at least 1), each measured on one step of the first incremental
            experience (:class:`CostProbe`). The ``epochs`` column says what each got. Methods that do not
            train after the base session (``slda``, ``ncm``) are unaffected.

    Methods of :data:`~lightning_cskl.experiments.baselines.SINGLE_HEAD_METHODS` are skipped in the ``"task"``
    scenario (their statistics head needs one label space). Each row's ``adaptation_gain`` is its ACC minus
    that of ``head_replay`` in the same scenario and seed (when ``head_replay`` runs too).

    Returns:
        The :class:`BenchTable`.

    Raises:
        UnknownMethodError: a method name is not in METHODS (the message lists the allowed names).
        ValueError: no methods, no seeds, or a scenario other than "class", "task" or "domain".
    """
    from tqdm.auto import tqdm

    methods, scenarios, seeds = list(methods), list(scenarios), list(seeds)
    unknown = [m for m in methods if m.split("@", 1)[0] not in METHODS]
    if unknown:
        raise UnknownMethodError(f"methods {unknown} are not known: use some of {', '.join(METHODS)}")
    if not methods or not seeds or not scenarios:
        raise ValueError(f"nothing to run: methods={methods}, scenarios={scenarios}, seeds={seeds}")
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        raise ValueError(f"scenarios {bad} are not allowed: use some of {', '.join(SCENARIOS)}")
    options = method_options or {}
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                **({"equal_compute": True} if equal_compute else {}), **(identity or {})}
    out = Path(out_dir) if out_dir is not None else None
    table = BenchTable()

    def build(method: str, scenario: str, seed: int, evaluator: Any, plugins: list[Any],
              train_epochs: int = epochs) -> Any:
        torch.manual_seed(seed)
        random.seed(seed)
        net = model(scenario)
        optimizer = torch.optim.Adam(net.parameters(), lr, weight_decay=weight_decay)
        own = {k: v for k, v in options.get(method, {}).items() if k != "train_epochs"}
        return build_method(method, model=net, optimizer=optimizer, evaluator=evaluator,
                            train_epochs=train_epochs, train_mb_size=batch_size, eval_mb_size=eval_batch_size,
                            plugins=plugins, **own)

    def step_flops(method: str, scenario: str, seed: int, bench: Any, base: dict[str, Tensor]) -> Optional[float]:
        """Training FLOPs of one step of ``method`` in its first incremental experience (None: it does not train)."""
        if len(bench.train_stream) < 2:
            return None
        probe = CostProbe(1, time_steps=False, repeats=1, first_epoch=True)
        run_continual(bench, lambda ev: build(method, scenario, seed, ev, [probe]), base=base, stop_after=1,
                      progress=False)
        return float(probe.cost.flops) if probe.cost is not None and probe.cost.flops else None

    with tqdm(total=len(methods) * len(scenarios) * len(seeds), disable=not progress, unit="run", desc="bench") as bar:
        for scenario in scenarios:
            for seed in seeds:
                bench = benchmark(scenario, seed)
                last = len(bench.train_stream) - 1
                group: list[dict[str, Any]] = []
                base: Optional[dict[str, Tensor]] = None
                reference_flops: Optional[float] = None
                for method in methods:
                    bar.set_postfix(method=method, scenario=scenario, seed=seed)
                    if scenario == "task" and method_base(method) in SINGLE_HEAD_METHODS:
                        logger.info("%s skipped in the task scenario: its statistics head needs one label space",
                                    method)
                        bar.update(1)
                        continue
                    record = out / "runs" / f"{scenario}-seed{seed}-{method}.json" if out is not None else None
                    row = _finished_run(record, {**settings, **options.get(method, {})}) if resume else None
                    if row is None:
                        if base is None:
                            bar.set_postfix(method="base session", scenario=scenario, seed=seed)
                            base_file = out / "base" / f"{scenario}-seed{seed}.pt" if out is not None else None
                            base = train_base(bench, lambda ev: build("full_finetune", scenario, seed, ev, []),
                                              base_file)
                        method_epochs = int(options.get(method, {}).get("train_epochs", epochs))
                        if method_base(method) in FROZEN_METHODS:
                            method_epochs = 0  # nothing trains after the base session
                        if equal_compute:
                            if reference_flops is None:
                                reference_flops = step_flops("full_finetune", scenario, seed, bench, base)
                            flops = step_flops(method, scenario, seed, bench, base)
                            if flops and reference_flops:
                                method_epochs = max(1, round(method_epochs * reference_flops / flops))
                        probe = CostProbe(last, time_steps, time_repeats)
                        effects = _EffectRecorder()
                        result = run_continual(
                            bench, lambda ev, m=method, p=probe, e=effects, n=method_epochs: build(
                                m, scenario, seed, ev, [p, e], n), base=base, progress=False,
                        )
                        row = {"method": method, "scenario": scenario, "seed": seed, **result.summary,
                               "base_acc": result.accuracy[0][0], "accuracy": result.accuracy,
                               "epochs": method_epochs, "update_effect": effects.effects,
                               "statistics_rule": effects.rule, "carry_seconds": effects.carry_seconds}
                        if probe.cost is not None:
                            row.update({k: v for k, v in probe.cost.as_dict().items() if k in COST_COLUMNS})
                        if record is not None:
                            record.parent.mkdir(parents=True, exist_ok=True)
                            payload = {"settings": {**settings, **options.get(method, {})}, "row": row}
                            record.write_text(json.dumps(payload, indent=1) + "\n")
                    group.append(row)
                    bar.update(1)
                _relate(group)
                table.runs.extend(group)
    if out is not None:
        table.write(out)
    return table


def _finished_run(record: Optional[Path], settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The row kept in ``record`` by an earlier run with the same settings, else None."""
    if record is None or not record.is_file():
        return None
    try:
        payload = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if payload.get("settings") != json.loads(json.dumps(settings)):
        return None
    return payload["row"]


class _EffectRecorder(SupervisedPlugin):
    """Keeps, after every experience, the CsKO learner's per-layer update effect on new and old inputs, and what
    the method's statistics head is (its rule; the time its carries took)."""

    def __init__(self) -> None:
        super().__init__()
        self.effects: list[dict[str, dict[str, float]]] = []
        self.rule: Optional[str] = None
        self.carry_seconds: Optional[float] = None

    def after_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        # after every plugin's after_training_exp, the method's end-of-experience work included
        plugin = getattr(strategy, "baseline", None)
        learner = getattr(plugin, "learner", None)
        if learner is not None and learner.update_effect:
            self.effects.append({n: dict(e) for n, e in learner.update_effect.items()})
        statistics = getattr(plugin, "statistics", None)
        self.rule = statistics.rule if statistics is not None else None
        drift = getattr(plugin, "_drift", None)
        if drift is not None:
            self.carry_seconds = drift.seconds


def _relate(group: list[dict[str, Any]]) -> None:
    """Step-time ratios to full fine-tuning, adaptation gains over ``head_replay``, and a warning when methods did
    not share the base model."""
    full = next((r for r in group if r["method"] == "full_finetune"), None)
    reference = next((r for r in group if r["method"] == GAIN_REFERENCE), None)
    frozen = {rule: next((r for r in group if r["method"] == name), None) for rule, name in FROZEN_REFERENCE.items()}
    for row in group:
        full_time = full.get("step_time_s") if full else None
        row["step_time_ratio"] = row["step_time_s"] / full_time if row.get("step_time_s") and full_time else None
        row["adaptation_gain"] = row["acc"] - reference["acc"] if reference is not None else None
        same_head = frozen.get(row.get("statistics_rule"))
        row["frozen_gain"] = row["acc"] - same_head["acc"] if same_head is not None else None
    # a statistics head scores the same base model differently: compare trained heads only
    base = {round(r["base_acc"], 6) for r in group if r["method"] not in SINGLE_HEAD_METHODS}
    if len(base) > 1:
        logger.warning("methods reached different base-session accuracies %s (%s, seed %s): their base models "
                       "differ", sorted(base), group[0]["scenario"], group[0]["seed"])


# ---------------------------------------------------------------------------------------------- cskl bench
def _all_methods() -> list[str]:
    from .baselines import METHODS

    return list(METHODS)


@dataclass
class BenchConfig:
    """Every method side by side on one benchmark: accuracy and per-step cost, mean ± std over seeds.

    Args:
        methods: names from ``lightning_cskl.experiments.baselines.METHODS`` (default: all of them), or
            ``<method>@<tag>`` variants that run ``<method>`` with their own ``method_options``.
        scenarios: ``class`` (base session + expanding head), ``task`` (one head per task) and/or ``domain``
            (the same classes under new input conditions); each replaces ``data.scenario`` in turn.
        seeds: one run per seed and method (also the seed of ``data``).
        data: the benchmark, with the options of ``cskl run`` (``--data.benchmark fashion_mnist``,
            ``--data.train_per_class 500``, ``module:function``, ...).
        model: the backbone (as for ``cskl run``; default: SmallCNN of width 16).
        epochs, batch_size, lr, weight_decay: training of every experience (Adam), the same for every method.
        equal_compute: give every method the training FLOPs of full fine-tuning at ``epochs`` epochs instead
            of the same epochs (see ``lightning_cskl.experiments.bench.run_bench``); the ``epochs`` column says what each got.
        method_options: per method (or variant), extra factory options (e.g. ``{ewc: {ewc_lambda: 10}}``;
            ``train_epochs`` overrides ``epochs``).
        time_steps: also time the steps (median, and the ratio to full fine-tuning).
        threads: torch CPU threads (None: torch's default).
        name, output_dir: outputs go to ``output_dir/name``.
        progress: show a progress bar.
        resume: reuse the runs an interrupted bench with the same settings kept in ``output_dir/name/runs``
            (False: rerun everything).
    """

    methods: list[str] = field(default_factory=_all_methods)
    scenarios: list[Literal["class", "task", "domain"]] = field(default_factory=lambda: ["class", "task"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=lambda: ModelOptions("small_cnn", 16))
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    equal_compute: bool = False
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    time_steps: bool = True
    threads: Optional[int] = None
    name: str = "bench"
    output_dir: str = "outputs"
    progress: bool = True
    resume: bool = True


_BENCH_IDENTITY = ("data", "model")  # what changes a run besides training


def bench(config: BenchConfig) -> dict[str, Any]:
    """``cskl bench``: :func:`run_bench` from a config; writes tables, plots, ``claims.md`` and a JSON."""
    import torch

    from .baselines import METHODS
    from .plots import plot_bench

    unknown = [m for m in config.methods if m.split("@", 1)[0] not in METHODS]
    if unknown:
        raise UsageError(f"methods {unknown} are not known: use some of {', '.join(METHODS)}")
    if not config.methods or not config.seeds or not config.scenarios:
        raise UsageError("methods, scenarios and seeds must each name at least one")
    for name, value in (("epochs", config.epochs), ("batch_size", config.batch_size)):
        if value < 1:
            raise UsageError(f"{name}={value!r} is not allowed: it must be an int >= 1")
    if not config.lr > 0:
        raise UsageError(f"lr={config.lr!r} is not allowed: it must be > 0")
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    def benchmark(scenario: str, seed: int) -> Any:
        return build_benchmark(replace(config.data, scenario=scenario, seed=seed))

    # bad data or model options fail now, with their one-line message
    in_channels = input_channels(benchmark(config.scenarios[0], config.seeds[0]))
    build_model(config.model, in_channels, False)

    def model(scenario: str) -> nn.Module:
        return build_model(config.model, in_channels, scenario == "task")

    folder = Path(config.output_dir) / config.name
    began = time.time()
    table = run_bench(config.methods, scenarios=config.scenarios, seeds=config.seeds, benchmark=benchmark,
                      model=model, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                      weight_decay=config.weight_decay, method_options=config.method_options,
                      time_steps=config.time_steps, out_dir=folder, progress=config.progress,
                      resume=config.resume, identity={k: v for k, v in asdict(config).items() if k in _BENCH_IDENTITY},
                      equal_compute=config.equal_compute)
    plots = plot_bench(table, folder)
    results = {"config": asdict(config), "summary": table.summary(), "runs": table.runs,
               "seconds": time.time() - began}
    (folder / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    claims = claims_markdown(table)
    (folder / "claims.md").write_text(claims + "\n")
    print(table.markdown())
    print(claims)
    print(f"tables in {folder}/bench.md, bench.csv, bench_runs.csv, claims.md; plots: "
          f"{', '.join(p.name for p in plots)}")
    return results

