"""The engine (plain torch): selection, projection bounds per optimizer, freezing, modes, state."""

import io

import pytest
import torch
from torch import nn

from lightning_cskl.core import (
    CenterKernelConfig,
    CenterKernelLearner,
    NoEligibleLayerError,
    free_basis,
    layer_projector,
    project_update,
    resolve_layers,
    select_channels,
)
from lightning_cskl.core.center import attached_branch
from lightning_cskl.core.projection import NULL_SPACE_MAX_SHARE, NULL_SPACE_RTOL

from .engine_helpers import Net, low_rank_data


def train(learner, net, x, y, make_optimizer, steps, batch=16, closure=False):
    learner.bind(net)
    learner.begin_task()
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad])
    handle = learner.attach_optimizer(opt)
    for step in range(steps):
        i = (step * batch) % len(x)

        def forward_backward():
            opt.zero_grad()
            net.train()
            loss = nn.functional.cross_entropy(net(x[i:i + batch]), y[i:i + batch])
            loss.backward()
            learner.before_update()
            return loss

        if closure:  # as Lightning does: gradients are computed inside optimizer.step
            opt.step(forward_backward)
        else:
            forward_backward()
            opt.step()
    handle.remove()
    return opt


def record_old_task(learner, net, x_old):
    learner.bind(net)
    learner.record(lambda: net(x_old))


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def test_select_channels_keeps_top_ratio_deterministically():
    scores = torch.tensor([0.3, 0.1, 0.3, 0.9, 0.0, 0.5, 0.2, 0.4])
    mask = select_channels(scores, 0.75)
    assert mask.sum() == 6 and not mask[1] and not mask[4]
    assert select_channels(scores, 0.01).sum() == 1
    with pytest.raises(ValueError, match=r"channel_ratio=1.5 is not allowed: it must be a number in \(0, 1\]"):
        select_channels(scores, 1.5)


def test_free_basis_criteria():
    eigenvalues = torch.tensor([100.0, 10.0, 1.0, 0.5, 0.1])
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    cov = q @ torch.diag(eigenvalues.double()) @ q.T
    basis, _ = free_basis(cov, "null_space", null_space_factor=5.0)
    assert basis.shape[1] == 2  # 0.1 and 0.5 are ≤ 5 * 0.1
    basis, _ = free_basis(cov, "energy", energy=0.95)
    # protect 100 + 10 (=0.989 of 111.6); free 1, 0.5, 0.1
    assert basis.shape[1] == 3
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert free_basis(torch.zeros(3, 3))[0].shape[1] == 3  # nothing to protect


def test_projector_restricts_to_selected_block_before_eigendecomposition():
    cov = torch.tensor([[[2.0, 1.9, 0.0], [1.9, 2.0, 0.0], [0.0, 0.0, 0.1]]])
    selected = torch.tensor([True, True, False])
    basis, free = layer_projector(cov, selected, "null_space", null_space_factor=1.0)
    assert free.tolist() == [1]
    expected = torch.tensor([[0.5, -0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(basis[0] @ basis[0].T, expected, atol=1e-6)


def test_depthwise_layer_frees_only_low_energy_channels():
    cov = torch.tensor([4.0, 0.01, 9.0, 0.02]).reshape(4, 1, 1)  # one channel per group
    basis, free = layer_projector(cov, torch.ones(4, dtype=torch.bool), "null_space", null_space_factor=5.0)
    assert free.tolist() == [0, 1, 0, 1]
    update = torch.ones(8, 1)  # 2 output channels per group
    assert project_update(update, basis).squeeze(1).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("closure", [False, True], ids=["step", "closure"])
@pytest.mark.parametrize("rule", ["null_space", "null_space_selected", "energy"])
def test_old_task_output_change_is_bounded_for_every_optimizer(optimizer, rule, closure):
    criterion = "energy" if rule == "energy" else "null_space"
    reference = "selected" if rule == "null_space_selected" else "layer"
    torch.manual_seed(0)
    net = Net()
    x_old = low_rank_data(64, seed=1)
    x_new, y_new = torch.randn(64, 3, 6, 6), torch.randint(0, 4, (64,))
    learner = CenterKernelLearner(layers=["conv1", "conv2", "conv3"], first_task="center", score_batches=2,
                                  projection_criterion=criterion, energy=0.9, energy_step=0.0, channel_ratio=0.75,
                                  null_space_reference=reference)
    record_old_task(learner, net, x_old)
    before = {n: learner.full_center(n) for n in learner.layers}
    train(learner, net, x_new, y_new, OPTIMIZERS[optimizer], steps=12, closure=closure)
    checked = 0
    for name in learner.layers:
        delta = (learner.full_center(name) - before[name]).double()
        selected = learner.selected[name]
        assert torch.all(delta[:, ~selected] == 0), f"{name}: unselected channels moved"
        cov = learner.covariances[name][0].double()
        sub = cov[selected][:, selected]
        eig = torch.linalg.eigvalsh(sub).clamp_min(0)
        if criterion == "null_space":
            ref = eig if reference == "selected" else torch.linalg.eigvalsh(cov).clamp_min(0)
            allowed = min(max(5.0 * ref[0].item(), NULL_SPACE_RTOL * ref[-1].item()),
                          NULL_SPACE_MAX_SHARE * ref[-1].item())
        else:
            share = torch.cumsum(eig, 0) / eig.sum()
            allowed = eig[share <= 0.1 + 1e-12].max().item() if (share <= 0.1 + 1e-12).any() else 0.0
        ds = delta[:, selected]
        norm = ds.square().sum().item()
        if norm == 0:
            continue
        change = torch.trace(ds @ sub @ ds.T).item()  # mean squared output change on old center inputs
        assert change <= allowed * norm * (1 + 1e-3) + 1e-9, f"{name}: {change} > {allowed} * {norm}"
        checked += 1
    assert checked > 0


def test_without_projection_old_outputs_change_much_more():
    torch.manual_seed(0)
    changes = {}
    for project in (True, False):
        torch.manual_seed(0)
        net = Net()
        x_old = low_rank_data(64, seed=1)
        x_new, y_new = torch.randn(64, 3, 6, 6), torch.randint(0, 4, (64,))
        learner = CenterKernelLearner(layers=["conv1"], first_task="center", score_batches=1, project=project,
                                      channel_ratio=1.0)
        record_old_task(learner, net, x_old)
        before = learner.full_center("conv1")
        train(learner, net, x_new, y_new, OPTIMIZERS["adam"], steps=10)
        delta = (learner.full_center("conv1") - before).double()
        cov = learner.covariances["conv1"][0].double()
        changes[project] = torch.trace(delta @ cov @ delta.T).item()
    assert changes[False] > 1e3 * changes[True]


def test_frozen_tensors_are_bit_identical_and_batchnorm_does_not_drift():
    torch.manual_seed(0)
    net = Net()
    learner = CenterKernelLearner(layers=["conv2", "conv3"], first_task="center", score_batches=1)
    record_old_task(learner, net, torch.randn(32, 3, 6, 6))
    learner.bind(net)
    frozen = {k: v.detach().clone() for k, v in net.state_dict().items()}
    names = [n for n, _ in net.named_parameters()]
    train(learner, net, torch.randn(64, 3, 6, 6), torch.randint(0, 4, (64,)), OPTIMIZERS["adamw"], steps=6)
    # mid-task the model keeps its structure: types, parameter names, state_dict keys
    assert type(net.conv2) is nn.Conv2d and attached_branch(net.conv2) is not None
    assert [n for n, _ in net.named_parameters()] == names
    state = net.state_dict()
    assert list(state) == list(frozen)
    center = (slice(None), slice(None), 1, 1)
    for key, value in frozen.items():
        if key.startswith("head"):
            continue
        if key in ("conv2.weight", "conv3.weight"):  # every tap but the centers is untouched
            mask = torch.ones_like(value, dtype=torch.bool)
            mask[center] = False
            assert torch.equal(state[key][mask], value[mask]), f"{key} changed off center"
            continue
        assert torch.equal(state[key], value), f"{key} changed"
    changed = [n for n in ("conv2", "conv3") if not torch.equal(state[f"{n}.weight"][center], frozen[f"{n}.weight"][center])]
    assert changed, "no center moved"
    assert not torch.equal(state["head.weight"], frozen["head.weight"])


def test_end_task_folds_back_and_restores_flags():
    net = Net()
    net.conv1.bias.requires_grad_(False)
    learner = CenterKernelLearner(layers="all", first_task="center", score_batches=1)
    train(learner, net, torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,)), OPTIMIZERS["sgd"], steps=3)
    learner.end_task(lambda: net(torch.randn(8, 3, 6, 6)))
    assert all(attached_branch(m) is None for m in net.modules())
    assert not any(m._forward_hooks or m._state_dict_hooks or m._load_state_dict_pre_hooks for m in net.modules())
    assert not net.conv1.bias.requires_grad and net.conv2.weight.requires_grad
    assert all(m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert learner.tasks_seen == 1 and set(learner.covariances) == {"conv1", "conv2", "conv3"}
    assert learner.covariances["conv2"].shape == (1, 8, 8)


def test_covariance_size_is_constant_in_the_number_of_tasks():
    net = Net()
    learner = CenterKernelLearner(layers=["conv2"], first_task="center", score_batches=1)
    sizes = []
    for task in range(3):
        train(learner, net, torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,)), OPTIMIZERS["sgd"], steps=2)
        learner.end_task(lambda: net(torch.randn(8, 3, 6, 6)))
        sizes.append(learner.projection_state_bytes())
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_base_task_trains_all_parameters_and_records():
    torch.manual_seed(0)
    net = Net()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    learner = CenterKernelLearner(layers=["conv2"], first_task="full")
    train(learner, net, torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,)), OPTIMIZERS["sgd"], steps=3)
    learner.end_task(lambda: net(torch.randn(8, 3, 6, 6)))
    after = net.state_dict()
    for key in ("conv1.weight", "conv2.weight", "bn1.running_mean", "head.weight"):
        assert not torch.equal(after[key], before[key]), key
    # the non-center taps of conv2 moved too: the base task is plain full training
    assert not torch.equal(after["conv2.weight"][:, :, 0, 0], before["conv2.weight"][:, :, 0, 0])
    assert learner.tasks_seen == 1 and "conv2" in learner.covariances


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_base_task_with_decoupled_structure_equals_plain_training(weight_decay):
    torch.manual_seed(0)
    plain, wired = Net(), Net()
    wired.load_state_dict(plain.state_dict())
    x, y = torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,))
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay)
    for step in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(plain(x[step * 8:(step + 1) * 8]), y[step * 8:(step + 1) * 8]).backward()
        opt.step()
    learner = CenterKernelLearner(layers=["conv2", "conv3"], first_task="full")
    train(learner, wired, x, y, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=weight_decay),
          steps=4, batch=8)
    learner.end_task(lambda: wired(x[:4]))
    for key, value in plain.state_dict().items():
        assert torch.allclose(wired.state_dict()[key], value, atol=1e-5), key


def test_mask_mode_follows_the_decoupled_trajectory_under_sgd():
    torch.manual_seed(0)
    nets = [Net(), Net()]
    nets[1].load_state_dict(nets[0].state_dict())
    x_old = low_rank_data(32, seed=3)
    x, y = torch.randn(64, 3, 6, 6), torch.randint(0, 4, (64,))
    results = []
    for net, mode in zip(nets, ("decouple", "mask")):
        learner = CenterKernelLearner(layers=["conv2", "conv3"], first_task="center", score_batches=2, mode=mode)
        record_old_task(learner, net, x_old)
        train(learner, net, x, y, lambda p: torch.optim.SGD(p, lr=0.1), steps=8)
        assert learner.selected["conv2"].sum() == 6
        learner.end_task(lambda: net(x_old))
        results.append(({n: s.clone() for n, s in learner.selected.items()}, net.state_dict()))
    for name in results[0][0]:
        assert torch.equal(results[0][0][name], results[1][0][name])
    for key, value in results[0][1].items():
        assert torch.allclose(results[1][1][key], value, atol=1e-5), key
    assert not torch.equal(results[0][1]["conv2.weight"], Net().state_dict()["conv2.weight"])


def test_mask_mode_keeps_non_center_taps_bit_identical():
    net = Net()
    learner = CenterKernelLearner(layers=["conv2"], first_task="center", score_batches=1, mode="mask")
    before = net.conv2.weight.detach().clone()
    train(learner, net, torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,)), OPTIMIZERS["adamw"], steps=4)
    after = net.conv2.weight.detach()
    mask = torch.ones_like(after, dtype=torch.bool)
    mask[:, :, 1, 1] = False
    assert torch.equal(after[mask], before[mask])
    assert not torch.equal(after[:, :, 1, 1], before[:, :, 1, 1])


@pytest.mark.parametrize("closure", [False, True])
def test_scoring_steps_move_nothing(closure):
    net = Net()
    learner = CenterKernelLearner(layers=["conv2"], first_task="center", score_batches=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    learner.bind(net)
    train(learner, net, torch.randn(48, 3, 6, 6), torch.randint(0, 4, (48,)), OPTIMIZERS["adam"], steps=3,
          closure=closure)
    after = net.state_dict()
    assert torch.equal(after["head.weight"], before["head.weight"])
    assert torch.equal(after["conv2.weight"], before["conv2.weight"])
    assert learner.phase == "training" and learner.selected["conv2"].sum() == 6


def test_auto_prefers_deep_kxk_convolutions():
    from lightning_cskl.models import mobilenet_v2, resnet18

    assert resolve_layers(resnet18(nf=8), "auto") == ["layer4.1.conv1", "layer4.1.conv2"]  # the research choice
    chosen = resolve_layers(mobilenet_v2(width=0.25), "auto")
    assert chosen == ["features.16.block.3", "features.17.block.3"]  # the last depthwise 3×3 convs
    only_pointwise = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1, groups=2))
    assert resolve_layers(only_pointwise, "auto") == ["0", "1"]


def test_frozen_batchnorm_matches_eval_mode_and_saves_no_input():
    from lightning_cskl.core.accounting import saved_activation_bytes

    torch.manual_seed(0)
    net = Net()
    net.bn2.running_mean.uniform_(-1, 1)
    net.bn2.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 6, 6)
    expected = net.eval()(x)
    learner = CenterKernelLearner(layers=["conv3"], first_task="center")
    learner.bind(net)
    learner.begin_task()
    net.train()  # as frameworks do every epoch
    assert torch.allclose(net(x), expected, atol=1e-5)
    bn_input = torch.randn(4, 8, 6, 6, requires_grad=True)
    assert saved_activation_bytes(lambda: net.bn2(bn_input).sum().backward()) < bn_input.numel()
    learner.end_task(lambda: net(x))
    # released: in train mode BatchNorm normalises with the batch statistics again (and updates them)
    net.train()
    before = net.bn2.running_mean.clone()
    net(x)
    assert not torch.equal(net.bn2.running_mean, before)


@pytest.mark.parametrize("trained", ["weight", "bias"])
def test_a_frozen_batchnorm_still_trains_its_affine_parameters(trained):
    from lightning_cskl.core.batchnorm import FrozenBatchNorm

    bn = nn.BatchNorm2d(3).train()
    bn.requires_grad_(False)
    getattr(bn, trained).requires_grad_(True)  # TinyTL's bias-only update trains the shift alone
    frozen = FrozenBatchNorm()
    frozen.freeze(bn)
    bn(torch.randn(2, 3, 4, 4)).square().sum().backward()
    assert getattr(bn, trained).grad is not None and getattr(bn, trained).grad.abs().sum() > 0
    assert int(bn.num_batches_tracked) == 0
    frozen.release()
    assert "forward" not in vars(bn)


def test_layer_choice():
    net = Net()
    assert resolve_layers(net, "auto") == ["conv2", "conv3"]
    assert resolve_layers(net, "all") == ["conv1", "conv2", "conv3"]
    assert resolve_layers(net, ["conv3"]) == ["conv3"]
    assert resolve_layers(net, r"conv[12]") == ["conv1", "conv2"]


def test_layer_choice_errors_name_the_layer_or_pattern():
    net = Net()
    with pytest.raises(NoEligibleLayerError, match=r"layers=.conv9. matches no convolution of Net.*conv1, conv2"):
        resolve_layers(net, "conv9")
    with pytest.raises(NoEligibleLayerError, match=r"layers lists \['head'\] which are not convolutions"):
        resolve_layers(net, ["head"])
    even = nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 2))
    with pytest.raises(NoEligibleLayerError, match=r"layer '1' \(Conv2d, kernel_size=\(2, 2\)\) cannot train its center"):
        resolve_layers(even, ["1"])
    with pytest.raises(NoEligibleLayerError, match="MLP|Sequential has no convolution that can train its center"):
        resolve_layers(nn.Sequential(nn.Linear(2, 2)), "auto")
    assert resolve_layers(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), "auto") == ["0"]


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(channel_ratio=0.0), r"channel_ratio=0.0 is not allowed"),
        (dict(channel_ratio=True), r"channel_ratio=True is not allowed"),
        (dict(projection_criterion="svd"), r"projection_criterion='svd' is not allowed: use one of 'null_space', 'energy'"),
        (dict(mode="prune"), r"mode='prune' is not allowed"),
        (dict(score_batches=0), r"score_batches=0 is not allowed"),
        (dict(energy=1.2), r"energy=1.2 is not allowed"),
        (dict(layers=[]), r"layers=\[\] is not allowed"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        CenterKernelConfig(**options)


def test_state_dict_is_weights_only_loadable_and_round_trips():
    net = Net()
    learner = CenterKernelLearner(layers=["conv2"], first_task="center", score_batches=1)
    record_old_task(learner, net, torch.randn(16, 3, 6, 6))
    train(learner, net, torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,)), OPTIMIZERS["sgd"], steps=2)
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = CenterKernelLearner(layers=["conv2"], first_task="center", score_batches=1)
    other.load_state_dict(state)
    assert other.tasks_seen == 1 and other.phase == "training"
    assert torch.equal(other.covariances["conv2"], learner.covariances["conv2"])
    assert torch.equal(other.selected["conv2"], learner.selected["conv2"])
    with pytest.raises(ValueError, match="checkpoint was made with layers=\\['conv2'\\]"):
        CenterKernelLearner(layers="all").load_state_dict(state)


# ---------------------------------------------------------------------------------------------- projection rules
def test_relative_rule_bounds_the_old_output_change_by_its_threshold():
    torch.manual_seed(0)
    net = Net()
    learner = CenterKernelLearner(layers=["conv1"], first_task="center", score_batches=1, channel_ratio=1.0,
                                  projection_criterion="relative", relative_threshold=0.05)
    old = low_rank_data(64, seed=1) + 0.1 * torch.randn(64, 3, 6, 6)  # one weak direction: free below 5%
    record_old_task(learner, net, old)
    before = learner.full_center("conv1")
    train(learner, net, torch.randn(64, 3, 6, 6), torch.randint(0, 4, (64,)), OPTIMIZERS["adam"], steps=8)
    delta = (learner.full_center("conv1") - before).double()
    cov = learner.covariances["conv1"][0].double()
    top = torch.linalg.eigvalsh(cov)[-1].item()
    norm = delta.square().sum().item()
    assert norm > 0
    assert torch.trace(delta @ cov @ delta.T).item() <= 0.05 * top * norm * (1 + 1e-3)


def test_scaled_rule_scales_each_eigendirection_by_one_minus_its_importance():
    from lightning_cskl.core.projection import direction_scales

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    cov = (a @ a.T)[None]
    basis, free = layer_projector(cov, torch.ones(5, dtype=torch.bool), "scaled", importance_scale=3.0)
    values, vectors = torch.linalg.eigh(cov[0])
    expected = vectors @ torch.diag(direction_scales(values, 3.0)) @ vectors.T
    update = torch.randn(4, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(project_update(update, basis), update @ expected, atol=1e-10)
    # the most used direction never moves; a direction old inputs never excite moves freely
    assert torch.allclose(project_update(vectors[:, -1:].T, basis), torch.zeros(1, 5, dtype=torch.float64),
                          atol=1e-10)
    assert direction_scales(torch.tensor([2.0, 0.0]), 10.0).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="importance_scale=0.5 is not allowed: it must be >= 1"):
        CenterKernelConfig(importance_scale=0.5)
    with pytest.raises(ValueError, match="relative_threshold=0 is not allowed"):
        CenterKernelConfig(relative_threshold=0)


@pytest.mark.parametrize("project", [True, False])
def test_update_effect_says_where_the_update_acts(project):
    # old inputs span 2 of 3 channels: a projected update cannot reach them, an unprojected one does
    torch.manual_seed(0)
    net = Net()
    learner = CenterKernelLearner(layers=["conv1"], first_task="center", score_batches=1, channel_ratio=1.0,
                                  project=project)
    record_old_task(learner, net, low_rank_data(64, seed=1))
    assert learner.update_effect == {}  # a recorded pretrained model: no update to measure
    x_new = torch.randn(64, 3, 6, 6)
    train(learner, net, x_new, torch.randint(0, 4, (64,)), OPTIMIZERS["adam"], steps=10)
    learner.end_task(lambda: net(x_new))
    effect = learner.update_effect["conv1"]
    assert effect["new"] > 0.01
    if project:
        assert effect["old"] < 1e-3 * effect["new"]
    else:
        assert effect["old"] > 0.1 * effect["new"]
    assert learner.selection_stats()["cskl/conv1/update_effect_old"] == effect["old"]


def test_null_space_rule_never_frees_a_flat_spectrum():
    # a grayscale network's first convolution: one input channel, λ_min = λ_max, so θ·λ_min frees it all
    basis, free = layer_projector(torch.tensor([[[3.0]]]), torch.ones(1, dtype=torch.bool), "null_space")
    assert free.tolist() == [0] and basis.shape[2] == 0
    flat, _ = free_basis(torch.diag(torch.tensor([1.0, 1.5, 2.0])), "null_space")
    assert flat.shape[1] == 0


def test_a_conv_registered_twice_keeps_computing_the_same_at_both_places():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), conv, nn.ReLU(), conv)
    x = torch.randn(2, 3, 6, 6)
    before = net(x)
    learner = CenterKernelLearner(layers=["1"], first_task="center")
    learner.bind(net)
    learner.begin_task()
    assert net[1] is net[3] is conv and attached_branch(conv) is not None
    assert torch.allclose(net(x), before, atol=1e-6)
    with torch.no_grad():  # a moved center acts at both places, as a moved kernel center would
        learner.trained_tensor("1").add_(0.5)
        moved = conv.weight.detach().clone()
        moved[:, :, 1, 1] = learner.full_center("1")
        inner = nn.functional.conv2d(net[0](x), moved, conv.bias, padding=1)
        expected = nn.functional.conv2d(inner.relu(), moved, conv.bias, padding=1)
    assert torch.allclose(net(x), expected, atol=1e-5)
    learner.unbind()
    assert net[1] is net[3] is conv and torch.allclose(net(x), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["parametrizations", "hook"])
def test_reparametrized_convs_are_refused_naming_the_layer(kind):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    if kind == "parametrizations":
        nn.utils.parametrizations.weight_norm(net[2])
    else:
        nn.utils.weight_norm(net[2])
    with pytest.raises(NoEligibleLayerError, match=r"layer '2' has a reparametrized weight"):
        CenterKernelLearner(layers=["0", "2"]).bind(net)
    assert all(attached_branch(m) is None for m in net)  # nothing was attached


@pytest.mark.parametrize("arch,head", [("convnext_tiny", "classifier"), ("squeezenet1_1", "classifier"),
                                       ("resnet18", "fc"), ("mobilenet_v2", "classifier")])
def test_train_also_auto_is_the_classifier_head_of_real_architectures(arch, head):
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    from lightning_cskl.core.layers import resolve_train_also

    assert resolve_train_also(net, "auto", resolve_layers(net, "auto")) == [head]


def test_train_also_auto_descends_into_a_wrapper_and_keeps_every_head():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

    from lightning_cskl.core.layers import resolve_train_also

    assert resolve_train_also(Wrapper(), "auto", ["net.conv3"]) == ["net.head"]
    heads = nn.ModuleDict({"backbone": nn.Sequential(nn.Conv2d(1, 4, 3)), "heads": nn.ModuleList(
        [nn.Linear(4, 2), nn.Linear(4, 2)])})
    assert resolve_train_also(heads, "auto", ["backbone.0"]) == ["heads"]


def test_an_unknown_or_renamed_option_is_refused_naming_the_new_name():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['criterion'\] \('criterion' is now called 'projection_criterion'\)"):
        CenterKernelLearner(criterion="energy")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['chanel_ratio'\]; the method's options are: .*channel_ratio"):
        CenterKernelLearner(chanel_ratio=0.5)



def test_a_train_also_module_that_holds_a_trained_conv_does_not_move_its_kernel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
                        nn.Flatten(), nn.Linear(4 * 36, 4))
    learner = CenterKernelLearner(layers=["1.0"], train_also=["1", "3"], first_task="center", score_batches=1)
    before = net[1][0].weight.detach().clone()
    train(learner, net, torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,)), OPTIMIZERS["adam"], steps=4)
    after = net.state_dict()["1.0.weight"]
    off_center = torch.ones_like(before, dtype=torch.bool)
    off_center[:, :, 1, 1] = False
    assert torch.equal(after[off_center], before[off_center])
    assert not torch.equal(after[:, :, 1, 1], before[:, :, 1, 1])


def test_a_center_joins_only_the_optimizer_that_holds_its_conv():
    net = Net()
    learner = CenterKernelLearner(layers=["conv2"], first_task="center", score_batches=1)
    learner.bind(net)
    learner.begin_task()
    backbone = torch.optim.SGD([net.conv1.weight, net.conv2.weight, net.conv3.weight], lr=0.1)
    head = torch.optim.SGD(net.head.parameters(), lr=0.1)
    handles = [learner.attach_optimizer(backbone), learner.attach_optimizer(head)]
    center = learner.trained_tensor("conv2")
    assert any(center is p for p in backbone.param_groups[0]["params"])
    assert not any(center is p for g in head.param_groups for p in g["params"])
    for handle in handles:
        handle.remove()


def test_a_scoring_step_with_an_infinite_head_gradient_is_not_counted():
    net = Net()
    learner = CenterKernelLearner(layers=["conv2"], first_task="center", score_batches=2)
    learner.bind(net)
    learner.begin_task()
    nn.functional.cross_entropy(net(torch.randn(8, 3, 6, 6)), torch.randint(0, 4, (8,))).backward()
    net.head.weight.grad[0, 0] = float("inf")  # the AMP scaler will skip this step
    learner.before_update()
    assert learner.scored_batches == 0 and learner.phase == "scoring"


def test_a_layer_that_saw_only_non_finite_inputs_says_so_not_that_it_saw_none():
    from lightning_cskl.core.covariance import CovarianceCollector, NonFiniteInputError

    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    collector = CovarianceCollector({"conv": conv})
    with collector.hooked():
        conv(torch.full((2, 2, 4, 4), float("nan")))
    with pytest.raises(NonFiniteInputError, match="layer 'conv' saw only non-finite inputs \\(2 samples\\)"):
        collector.covariances()
    with pytest.raises(RuntimeError, match="saw no input"):
        CovarianceCollector({"conv": conv}).covariances()
