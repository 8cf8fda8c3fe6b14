"""run_bench end to end on a few hundred Split Digits samples: three methods, one seed; the tables it writes,
the cost columns, and that measuring the cost does not change what the run learns."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from lightning_cskl.avalanche import run_continual
from lightning_cskl.experiments.baselines import UnknownMethodError, build_method
from lightning_cskl.experiments.bench import ACCURACY_COLUMNS, COST_COLUMNS, CostProbe, claims_markdown, default_model, run_bench
from lightning_cskl.data import split_digits
from lightning_cskl.data.tensors import tensor_benchmark

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")

METHODS = ["full_finetune", "gpm", "csko_dces"]
OPTIONS = {"csko_dces": {"score_batches": 1}}


def _small_benchmark(scenario: str, seed: int):
    (data,) = split_digits(n_tasks=1, seed=seed)
    train_x, train_y, _ = data.train.tensors
    test_x, test_y, _ = data.test.tensors
    g = torch.Generator().manual_seed(seed)
    i = torch.randperm(len(train_y), generator=g)[:300].sort().values
    j = torch.randperm(len(test_y), generator=g)[:150].sort().values
    base = 4 if scenario == "class" else None
    return tensor_benchmark((train_x[i], train_y[i]), (test_x[j], test_y[j]), scenario, base)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    table = run_bench(METHODS, scenarios=("class",), seeds=(0,), benchmark=_small_benchmark, epochs=2,
                      method_options=OPTIONS, time_repeats=2, out_dir=out, progress=False)
    return table, out


def test_bench_writes_markdown_and_csv(bench):
    table, out = bench
    assert [r["method"] for r in table.runs] == METHODS
    text = (out / "bench.md").read_text()
    markdown = text.split("\n\n")[0].splitlines()
    assert len(markdown) == 2 + len(METHODS) and markdown[0].startswith("| method | scenario | seeds | ACC")
    # CsKO's runs say where their center updates acted, per trained layer (the base session has none)
    effect = text.split("Where the center updates act:")[1]
    assert "| csko_dces | class | backbone.2.0 |" in effect and "| gpm |" not in effect
    ours = next(r for r in table.runs if r["method"] == "csko_dces")
    assert len(ours["update_effect"]) == 3 and all(e["backbone.2.0"]["new"] > 0 for e in ours["update_effect"])
    with open(out / "bench.csv") as f:
        summary = list(csv.DictReader(f))
    assert [r["method"] for r in summary] == METHODS
    assert {f"{c}_mean" for c in ACCURACY_COLUMNS + COST_COLUMNS} <= set(summary[0])
    with open(out / "bench_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == len(METHODS) and runs[0]["seed"] == "0"


def test_bench_rows_hold_accuracy_and_cost(bench):
    table, _ = bench
    rows = {r["method"]: r for r in table.runs}
    for row in rows.values():
        assert all(0.0 <= row[c] <= 1.0 for c in ("acc", "aia", "base_acc"))
        assert not math.isnan(row["forgetting"]) and not math.isnan(row["bwt"])
        assert row["flops"] > 0 and row["training_memory_bytes"] > 0 and row["step_time_s"] > 0
    # every method started its incremental experiences from the same base model
    assert len({r["base_acc"] for r in rows.values()}) == 1
    full, gpm, ours = rows["full_finetune"], rows["gpm"], rows["csko_dces"]
    assert full["projection_state_bytes"] == 0
    assert ours["step_time_ratio"] == pytest.approx(ours["step_time_s"] / full["step_time_s"])
    assert gpm["projection_state_bytes"] > ours["projection_state_bytes"] > 0  # (C·k²)² against C² per layer
    assert ours["trainable_parameters"] < gpm["trainable_parameters"] < full["trainable_parameters"]
    # the centers held beside the model count as trainable, with their gradients: Adam keeps two moments of every
    # trainable element (and a step count per tensor), no more, no less
    trainable = ours["trainable_parameters"]
    assert ours["gradient_bytes"] == 4 * trainable
    assert 8 * trainable <= ours["optimizer_state_bytes"] <= 8 * trainable + 8 * 16
    assert ours["flops"] < full["flops"] and ours["gradient_bytes"] < gpm["gradient_bytes"]
    for row in rows.values():  # forward + backward (the optimizer step and projection included) = the step
        assert 0 < row["forward_flops"] < row["flops"]
        assert row["backward_flops"] == row["flops"] - row["forward_flops"]
    # CsKO's backward stops at its lowest trained layer and computes only center-weight gradients
    assert ours["backward_flops"] < 0.6 * full["backward_flops"]


def test_every_method_starts_from_the_one_base_checkpoint(bench):
    table, out = bench
    weights = torch.load(out / "base" / "class-seed0.pt", weights_only=True)
    assert {len(r["accuracy"][0]) for r in table.runs} == {4}  # class-IL: base + 3 experiences
    assert len({tuple(r["accuracy"][0]) for r in table.runs}) == 1  # identical first row for every method
    # the checkpoint is what the base session of a full fine-tuning run ends with
    stream = _small_benchmark("class", 0)
    torch.manual_seed(0)
    net = default_model("class")
    strategy = build_method("full_finetune", model=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3),
                            evaluator=None, train_epochs=2, train_mb_size=32, eval_mb_size=256)
    strategy.train(stream.train_stream[0])
    assert weights.keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():  # the run's evaluation grew the head to all 10 test classes
        assert torch.equal(weights[key][: len(value)] if value.dim() else weights[key], value), key


def test_an_interrupted_bench_resumes_from_its_kept_runs(bench, tmp_path, monkeypatch):
    table, out = bench
    kept = sorted(p.name for p in (out / "runs").iterdir())
    assert kept == [f"class-seed0-{m}.json" for m in sorted(METHODS)]
    import lightning_cskl.experiments.bench as bench_module

    def no_training(*args, **kwargs):
        raise AssertionError("a kept run was trained again")

    monkeypatch.setattr(bench_module, "run_continual", no_training)
    again = run_bench(METHODS, scenarios=("class",), seeds=(0,), benchmark=_small_benchmark, epochs=2,
                      method_options=OPTIONS, time_repeats=2, out_dir=out, progress=False)
    assert [(r["method"], r["acc"], r["flops"]) for r in again.runs] == \
        [(r["method"], r["acc"], r["flops"]) for r in table.runs]
    # other settings are not the kept runs' settings: those runs are made afresh
    with pytest.raises(AssertionError, match="trained again"):
        run_bench(METHODS, scenarios=("class",), seeds=(0,), benchmark=_small_benchmark, epochs=3,
                  method_options=OPTIONS, out_dir=out, progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_cost_measurement_does_not_change_the_run(method):
    stream = _small_benchmark("class", 0).train_stream

    def train(probe):
        torch.manual_seed(0)
        net = default_model("class")
        strategy = build_method(method, model=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3),
                                evaluator=None, train_epochs=2, train_mb_size=32, eval_mb_size=256,
                                plugins=[probe] if probe else [], **OPTIONS.get(method, {}))
        for experience in stream:
            strategy.train(experience)
        return net.state_dict()

    # measured in experience 1, so that later experiences see any weight, optimizer or random state it left
    probe = CostProbe(1, time_steps=True, repeats=2)
    with_probe, without = train(probe), train(None)
    assert probe.cost is not None and probe.cost.flops > 0
    for key, value in without.items():
        assert torch.equal(with_probe[key], value), f"measuring the cost changed {key}"


def test_bench_refuses_bad_arguments():
    with pytest.raises(UnknownMethodError, match=r"methods \['gmp'\] are not known: use some of full_finetune, "):
        run_bench(["full_finetune", "gmp"], progress=False)
    with pytest.raises(ValueError, match=r"scenarios \['sideways'\] are not allowed: use some of class, task, domain"):
        run_bench(["full_finetune"], scenarios=("sideways",), progress=False)
    with pytest.raises(ValueError, match=r"nothing to run"):
        run_bench(["full_finetune"], seeds=(), progress=False)


def test_base_weights_that_do_not_fit_are_refused():
    stream = _small_benchmark("class", 0)

    def factory(evaluator):
        net = default_model("class")
        return build_method("full_finetune", model=net, optimizer=torch.optim.Adam(net.parameters()),
                            evaluator=evaluator)

    with pytest.raises(ValueError, match=r"base: the base-session weights do not fit the strategy's model"):
        run_continual(stream, factory, base={"backbone.0.0.weight": torch.zeros(1)}, progress=False)


def test_claims_are_checked_from_the_measured_means(bench):
    table, _ = bench
    rows = {r["method"]: r for r in table.summary()}
    ours, gpm, full = rows["csko_dces"], rows["gpm"], rows["full_finetune"]
    text = claims_markdown(table)
    assert text.startswith("### class-incremental: csko_dces")
    gap = (ours["acc_mean"] - full["acc_mean"]) * 100  # full fine-tuning is the only on-device method here
    assert f"{gap:+.1f} points | {'met' if gap >= 20 else '**missed**'} |" in text
    memory = ours["training_memory_bytes_mean"] / gpm["training_memory_bytes_mean"]
    assert f"| training memory ≤ 8% of gpm's | {memory:.1%} | {'met' if memory <= 0.08 else '**missed**'} |" in text
    backward = ours["backward_flops_mean"] / gpm["backward_flops_mean"]
    assert f"| backward FLOPs ≤ 10% of gpm's | {backward:.1%} |" in text
    assert "adam_nscl" not in text  # methods that did not run are left out
    assert claims_markdown(table, ours="csko_no_dces") == ""


def test_equal_compute_gives_cheaper_steps_more_epochs_and_gains_are_relative_to_head_replay():
    table = run_bench(["full_finetune", "head_replay", "slda"], scenarios=("class",), seeds=(0,),
                      benchmark=_small_benchmark, epochs=2, equal_compute=True, time_steps=False, progress=False)
    rows = {r["method"]: r for r in table.runs}
    full, head = rows["full_finetune"], rows["head_replay"]
    assert full["epochs"] == 2 and rows["slda"]["epochs"] == 0  # the reference, and a method that never trains
    budget = 2 * full["flops"] / head["flops"]  # the head-only step is far cheaper, so it gets more epochs
    assert head["epochs"] > 2 and abs(head["epochs"] - budget) <= 1
    assert head["adaptation_gain"] == 0.0
    assert rows["slda"]["adaptation_gain"] == pytest.approx(rows["slda"]["acc"] - head["acc"])


def test_statistics_head_methods_are_skipped_in_the_task_scenario():
    table = run_bench(["last_layer", "slda"], scenarios=("task",), seeds=(0,), benchmark=_small_benchmark,
                      epochs=1, time_steps=False, progress=False)
    assert [r["method"] for r in table.runs] == ["last_layer"]
