"""The comparison's methods (lightning_cskl.experiments.baselines) on tiny real Split Digits runs: every method
of the registry runs end to end, what an on-device baseline freezes stays bit-identical, the full-kernel
GPM / Adam-NSCL projection bounds the change of old outputs, and bad names and options give clear errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_cskl.avalanche import ClassIncrementalNet, TaskIncrementalNet, run_continual
from lightning_cskl.experiments.baselines import (
    METHODS,
    FullKernelProjectionPlugin,
    SparseUpdatePlugin,
    UnknownMethodError,
    build_method,
    find_classifier,
)
from lightning_cskl.experiments.full_kernel import (
    FullKernelCovariance,
    change_bound,
    conv_output_change,
    full_kernel_projector,
    project_kernel_update,
    protected_basis,
    unfold_patches,
)
from lightning_cskl.core.projection import NULL_SPACE_RTOL
from lightning_cskl.data import split_digits
from lightning_cskl.data.tensors import tensor_benchmark
from lightning_cskl.models import SmallCNN

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")


def _tiny_benchmark(scenario: str, train: int = 300, test: int = 150):
    (data,) = split_digits(n_tasks=1)
    train_x, train_y, _ = data.train.tensors
    test_x, test_y, _ = data.test.tensors
    g = torch.Generator().manual_seed(0)
    i = torch.randperm(len(train_y), generator=g)[:train].sort().values
    j = torch.randperm(len(test_y), generator=g)[:test].sort().values
    base = 4 if scenario == "class" else None
    return tensor_benchmark((train_x[i], train_y[i]), (test_x[j], test_y[j]), scenario, base, 2)


@pytest.fixture(scope="module")
def class_benchmark():
    return _tiny_benchmark("class")


@pytest.fixture(scope="module")
def task_benchmark():
    return _tiny_benchmark("task")


def _build(name: str, scenario: str, evaluator=None, epochs: int = 1, **options):
    torch.manual_seed(0)
    net = ClassIncrementalNet if scenario == "class" else TaskIncrementalNet
    model = net(SmallCNN(10, width=8).features, 16, initial_classes=2)
    if name.startswith("csko") or name == "center_only":
        options.setdefault("score_batches", 1)  # a few steps per task here
    return build_method(name, model=model, optimizer=torch.optim.Adam(model.parameters(), 1e-2, weight_decay=1e-3),
                        evaluator=evaluator, train_epochs=epochs, train_mb_size=32, eval_mb_size=256, **options)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_class_incremental_from_the_same_base_session(name, class_benchmark, plain_base):
    built = []

    def factory(evaluator):
        built.append(_build(name, "class", evaluator))
        return built[-1]

    run_continual(class_benchmark, factory, stop_after=0, progress=False)
    # whatever the method, the base session is plain training (Adam with weight decay here): same weights (the
    # head's units of classes not seen yet are initialised when the test stream is evaluated, from the global
    # random state that a method's end-of-experience pass draws from: only the 4 base classes' units compare)
    base = built[-1].model.state_dict()
    for key, value in plain_base.items():
        mine, plain = (t[:4] if key.startswith("head.classifier") else t for t in (base[key], value))
        assert torch.allclose(mine.float(), plain.float(), atol=1e-5), f"{name}: {key}"
    result = run_continual(class_benchmark, factory, progress=False)
    assert result.completed == result.total == 4 and all(len(row) == 4 for row in result.accuracy)
    assert set(result.summary) == {"acc", "aia", "forgetting", "bwt"}


@pytest.fixture(scope="module")
def plain_base(class_benchmark):
    built = []
    run_continual(class_benchmark, lambda ev: built.append(_build("full_finetune", "class", ev)) or built[-1],
                  stop_after=0, progress=False)
    return {k: v.clone() for k, v in built[-1].model.state_dict().items()}


@pytest.mark.parametrize("name", ["last_layer", "bias_only", "sparse_update", "gpm", "adam_nscl", "gpm_replay"])
def test_plugin_methods_run_task_incremental(name, task_benchmark):
    result = run_continual(task_benchmark, lambda evaluator: _build(name, "task", evaluator), progress=False)
    assert result.completed == 5


def test_unknown_method_lists_the_allowed_ones():
    model = ClassIncrementalNet(SmallCNN(10, width=8).features, 16)
    allowed = ", ".join(METHODS)
    assert "gpm_replay" in allowed and "csko_dces" in allowed
    with pytest.raises(UnknownMethodError, match=re.escape(f"method 'gmp' is not known: use one of {allowed}")):
        build_method("gmp", model=model, optimizer=torch.optim.SGD(model.parameters(), 0.1))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"projection_criterion='gpm' is not allowed: use 'energy' or 'null_space'"):
        FullKernelProjectionPlugin(projection_criterion="gpm")
    with pytest.raises(ValueError, match=r"channel_ratio=0 is not allowed"):
        SparseUpdatePlugin(channel_ratio=0)
    with pytest.raises(ValueError, match=r"prototype_replay='yes' is not allowed: use True, False or 'auto'"):
        SparseUpdatePlugin(prototype_replay="yes")
    with pytest.raises(ValueError, match=r"record_batches=0 is not allowed"):
        FullKernelProjectionPlugin(record_batches=0)
    with pytest.raises(ValueError, match=r"energy=1.5 is not allowed"):
        FullKernelProjectionPlugin(energy=1.5)
    model = ClassIncrementalNet(SmallCNN(10, width=8).features, 16)
    with pytest.raises(ValueError, match=r"head='classifier' is not a module of ClassIncrementalNet"):
        find_classifier(model, "classifier")
    with pytest.raises(ValueError, match=r"layers lists \['backbone.2.1'\] which are not convolutions"):
        _build("gpm", "class", layers=["backbone.2.1"])  # checked when the strategy is built
    with pytest.raises(ValueError, match=r"head='classifier' is not a module"):
        _build("last_layer", "class", head="classifier")
    with pytest.raises(ValueError, match=r"prototype_replay=True needs a single-head .* TaskIncrementalNet is a multi"):
        _build("gpm", "task", prototype_replay=True)


# ---------------------------------------------------------------------------------------------- frozen parts
def _allowed(name: str, key: str) -> bool:
    """What each method may change outside the head, written independently of the plugins."""
    if name == "bias_only":
        return key.endswith(".bias") and "running" not in key
    if name in ("sparse_update", "gpm", "adam_nscl"):  # the kernels CsKO's layers="auto" picks in SmallCNN
        return key in ("backbone.1.0.weight", "backbone.2.0.weight")
    return False


@pytest.mark.parametrize("name", ["last_layer", "bias_only", "sparse_update", "gpm", "adam_nscl"])
def test_frozen_parts_stay_bit_identical(name, class_benchmark):
    strategy = _build(name, "class", epochs=2)
    plugin, model = strategy.baseline, strategy.model
    stream = class_benchmark.train_stream
    strategy.train(stream[0])
    for experience in stream[1:3]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        strategy.train(experience)
        after = model.state_dict()
        moved = [k for k in before if not k.startswith("head.") and not torch.equal(before[k], after[k])]
        illegal = [k for k in moved if not _allowed(name, k)]
        assert not illegal, f"{name} changed frozen {illegal}"
        if name != "last_layer":
            assert moved, f"{name} trained nothing outside the head"
        if isinstance(plugin, SparseUpdatePlugin):
            assert plugin.selected and all(0 < int(m.sum()) < len(m) for m in plugin.selected.values())
            for layer, mask in plugin.selected.items():
                key = f"{layer}.weight"
                # unselected input channels of the trained kernels never move (Adam weight decay included)
                assert torch.equal(before[key][:, ~mask], after[key][:, ~mask])
                assert not torch.equal(before[key][:, mask], after[key][:, mask])


# ---------------------------------------------------------------------------------------------- projection
def _low_rank_inputs(n: int = 64, channels: int = 4, size: int = 6) -> torch.Tensor:
    """Old inputs whose patches span few directions: one channel direction, constant in space (the zero
    padding adds the border patterns), plus a little noise so that no eigenvalue is exactly 0."""
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(channels, generator=g)
    amplitude = torch.randn(n, generator=g)
    x = amplitude[:, None, None, None] * direction[None, :, None, None] * torch.ones(1, 1, size, size)
    return x + 1e-3 * torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("criterion", ["energy", "null_space"])
def test_full_kernel_projection_bounds_the_output_change(criterion):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    old = _low_rank_inputs()
    collector = FullKernelCovariance({"conv": conv})
    with collector.hooked():
        conv(old)
    cov = collector.covariances()["conv"]
    assert cov.shape == (1, 36, 36)
    # the patches reproduce the convolution (the order matches weight.reshape(D, -1))
    patches = unfold_patches(old, conv)
    out = conv(old).permute(0, 2, 3, 1).reshape(-1, 6)
    torch.testing.assert_close(patches[:, 0] @ conv.weight.reshape(6, -1).T, out, rtol=1e-4, atol=1e-4)

    basis, eigenvalues = full_kernel_projector(cov, criterion, null_space_factor=5.0, energy=0.97)
    assert 0 < basis.shape[2] < 36
    update = torch.randn_like(conv.weight)
    projected = project_kernel_update(update, basis.to(update.dtype))
    bound = change_bound(cov, basis, projected)
    assert conv_output_change(old, conv, projected) <= bound * (1 + 1e-5) + 1e-9
    lam = torch.linalg.eigvalsh(cov[0]).clamp_min(0)
    if criterion == "null_space":
        assert bound <= max(5.0 * lam.min().item(), NULL_SPACE_RTOL * lam.max().item()) * projected.pow(2).sum() * 1.01
    else:
        assert bound <= (1 - 0.97) * lam.sum().item() * projected.pow(2).sum() * 1.01
    # without the projection the same bound fails: the test can see a missing projection
    assert conv_output_change(old, conv, update) > change_bound(cov, basis, update)


@pytest.mark.parametrize("groups", [1, 2])
def test_removing_the_used_directions_is_the_same_projection(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False, groups=groups)
    collector = FullKernelCovariance({"conv": conv})
    with collector.hooked():
        conv(_low_rank_inputs())
    free, _ = full_kernel_projector(collector.covariances()["conv"], "energy", energy=0.97)
    used = protected_basis(free)
    m = 36 // groups
    assert used.shape[:2] == (groups, m)
    for g in range(groups):  # an orthonormal complement: together the two span the whole patch space
        r = int((free[g].norm(dim=0) > 0).sum())
        both = torch.cat([free[g, :, :r], used[g, :, : m - r]], dim=1).double()
        torch.testing.assert_close(both.T @ both, torch.eye(m, dtype=torch.float64), atol=1e-5, rtol=0)
    update = torch.randn_like(conv.weight)
    torch.testing.assert_close(project_kernel_update(update, used, protected=True), project_kernel_update(update, free),
                               atol=1e-5, rtol=1e-4)


def test_gpm_keeps_the_smaller_basis(class_benchmark):
    stream = class_benchmark.train_stream
    strategy = _build("gpm", "class")
    plugin = strategy.baseline
    strategy.train(stream[0])
    first = next(iter(plugin.covariances))
    free, _ = full_kernel_projector(plugin.covariances[first], "energy", energy=plugin.current_energy())
    seen = {}

    def record(*args):
        seen.update({n: (b.shape, plugin.protected[n]) for n, b in plugin.bases.items()})

    handle = strategy.optimizer.register_step_post_hook(record)
    try:
        strategy.train(stream[1])
    finally:
        handle.remove()
    assert seen and all(shape[2] <= shape[1] / 2 for shape, _ in seen.values())  # never more than half of m
    shape, protected = seen[first]
    assert protected == (free.shape[2] > free.shape[1] / 2)
    assert shape[2] == (free.shape[1] - free.shape[2] if protected else free.shape[2])


def _lowest_layer_inputs(strategy, layer: str, experience) -> torch.Tensor:
    model = strategy.model
    captured = []
    handle = model.get_submodule(layer).register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    model.eval()
    try:
        with torch.no_grad():
            for x, *_ in DataLoader(experience.dataset.eval(), batch_size=512):
                model(x)
    finally:
        handle.remove()
    return torch.cat(captured)


@pytest.mark.parametrize("name", ["gpm", "adam_nscl"])
def test_strategy_projection_keeps_old_outputs_within_the_bound(name, class_benchmark):
    stream = class_benchmark.train_stream
    strategy = _build(name, "class", epochs=3)
    plugin = strategy.baseline
    strategy.train(stream[0])
    layer = next(iter(plugin.covariances))  # the lowest projected layer: its input does not change
    cov = plugin.covariances[layer].clone()
    basis, _ = full_kernel_projector(cov, plugin.projection_criterion, plugin.null_space_factor, plugin.current_energy())
    old_inputs = _lowest_layer_inputs(strategy, layer, stream[0])
    conv = strategy.model.get_submodule(layer)
    weight = conv.weight.detach().clone()
    strategy.train(stream[1])
    delta = conv.weight.detach() - weight
    assert delta.abs().max() > 0
    assert conv_output_change(old_inputs, conv, delta) <= change_bound(cov, basis, delta) * (1 + 1e-4) + 1e-9

    # the same training without projection (every input channel of the same kernels) breaks the bound
    free = _build("sparse_update", "class", epochs=3, channel_ratio=1.0)
    free.train(stream[0])
    free_conv = free.model.get_submodule(layer)
    free_weight = free_conv.weight.detach().clone()
    free.train(stream[1])
    free_delta = free_conv.weight.detach() - free_weight
    assert conv_output_change(old_inputs, free_conv, free_delta) > change_bound(cov, basis, free_delta)


@pytest.mark.parametrize("name", ["last_layer", "gpm"])
def test_prototype_replay_option(name, class_benchmark):
    stream = class_benchmark.train_stream
    on, off = _build(name, "class", prototype_replay=True), _build(name, "class")
    for strategy in (on, off):
        torch.manual_seed(1)  # the same data order for both
        strategy.train(stream[0])
    assert all(torch.equal(a, b) for a, b in zip(on.model.state_dict().values(), off.model.state_dict().values()))
    assert on.baseline.memory.classes.tolist() == [0, 1, 2, 3] and len(off.baseline.memory) == 0
    for strategy in (on, off):
        torch.manual_seed(2)
        strategy.train(stream[1])
    # the replay loss (and the scaled logits) changed what the head learned; the backbone's frozen parts did not
    assert not torch.equal(on.model.head.classifier.weight, off.model.head.classifier.weight)
    assert torch.equal(on.model.backbone[0][0].weight, off.model.backbone[0][0].weight)
    assert on.baseline.state_dict()["prototypes"]["prototypes"].shape == (6, 16)


@pytest.mark.parametrize("name", ["gpm_replay", "adam_nscl_replay"])
def test_replay_variants_replay_only_with_a_single_head(name, class_benchmark, task_benchmark):
    single, multi = _build(name, "class"), _build(name, "task")
    assert single.baseline.replays_prototypes(single.model) and not multi.baseline.replays_prototypes(multi.model)
    torch.manual_seed(1)
    single.train(class_benchmark.train_stream[0])
    multi.train(task_benchmark.train_stream[0])
    assert single.baseline.memory.classes.tolist() == [0, 1, 2, 3]
    assert len(multi.baseline.memory) == 0  # task-incremental: the plain baseline (no prototypes, no error)
    assert single.baseline.projection_criterion == ("energy" if name == "gpm_replay" else "null_space")


# ---------------------------------------------------------------------------------------------- statistics heads
def test_frozen_backbone_methods_change_nothing_and_never_step(class_benchmark):
    from avalanche.core import SupervisedPlugin

    class CountSteps(SupervisedPlugin):
        steps = 0

        def after_training_iteration(self, strategy, *args, **kwargs):
            CountSteps.steps += 1

    strategy = _build("slda", "class", epochs=2, plugins=[CountSteps()])
    strategy.train(class_benchmark.train_stream[0])
    base_steps = CountSteps.steps
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    for experience in class_benchmark.train_stream[1:]:
        strategy.train(experience)
    after = strategy.model.state_dict()
    assert base_steps > 0 and CountSteps.steps == base_steps  # the base session trains, nothing after it
    assert all(torch.equal(before[k], after[k]) for k in before if k in after and before[k].shape == after[k].shape)
    assert strategy.baseline.statistics.classes.tolist() == list(range(10))


def test_statistics_heads_need_one_label_space_and_head_replay_replays():
    with pytest.raises(ValueError, match=r"statistics_head='lda' needs a single-head .* TaskIncrementalNet is a"):
        _build("slda", "task")
    with pytest.raises(ValueError, match=r"statistics_head='ncm' needs a single-head"):
        _build("csko_dces", "task", statistics_head="ncm")
    strategy = _build("head_replay", "class")
    assert strategy.baseline.replays_prototypes(strategy.model)
    assert _build("last_layer", "class").baseline.replays_prototypes(strategy.model) is False


def test_statistics_head_survives_an_interrupted_run(class_benchmark, tmp_path):
    def factory(evaluator):
        return _build("csko_dces_lda", "class", evaluator, epochs=2)

    whole = run_continual(class_benchmark, factory, progress=False)
    run_continual(class_benchmark, factory, checkpoint=tmp_path / "run.pt", stop_after=1, progress=False)
    resumed = run_continual(class_benchmark, factory, checkpoint=tmp_path / "run.pt", progress=False)
    assert resumed.accuracy == whole.accuracy


def test_variants_run_their_base_method_with_their_own_options():
    from lightning_cskl.experiments.baselines import method_base

    strategy = _build("csko_dces_lda@energy", "class", projection_criterion="energy")
    assert strategy.cskl.config.projection_criterion == "energy" and strategy.cskl.statistics.rule == "lda"
    with pytest.raises(UnknownMethodError, match=r"method 'slad@x' is not known"):
        method_base("slad@x")
