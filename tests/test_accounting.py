"""Per-step cost accounting: each measure against a value worked out by hand, and CsKO against full training."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_cskl.core import CenterBranch, CenterKernelLearner
from lightning_cskl.core.accounting import (
    StepCost,
    gradient_bytes,
    make_train_step,
    measure_step,
    median_step_time,
    median_step_times,
    optimizer_state_bytes,
    saved_activation_bytes,
    storage_bytes,
    trainable_parameter_count,
    training_flops,
)

from .engine_helpers import tiny_net

torch.manual_seed(0)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------- saved activations
def test_linear_saves_exactly_its_input():
    lin = nn.Linear(16, 8)
    x = torch.randn(32, 16)
    assert saved_activation_bytes(lambda: lin(x).sum(), exclude=lin) == _bytes(x)


def test_weights_are_not_activations():
    lin = nn.Linear(16, 8)
    x = torch.randn(32, 16, requires_grad=True)  # now the weight is saved too (for the input gradient)
    with_weight = saved_activation_bytes(lambda: lin(x).sum())
    # without `exclude` only Parameter objects are skipped; Linear saves a transposed view of its weight
    assert with_weight == _bytes(x) + _bytes(lin.weight)
    assert saved_activation_bytes(lambda: lin(x).sum(), exclude=lin) == _bytes(x)
    assert saved_activation_bytes(lambda: lin(x).sum(), exclude=[lin.weight]) == _bytes(x)


def test_each_storage_counts_once():
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    model = nn.ModuleList([a, b])
    x = torch.randn(32, 16)
    # both layers save x (one as a view): one storage
    assert saved_activation_bytes(lambda: (a(x) + b(x[:, :])).sum(), exclude=model) == _bytes(x)
    # a strided view keeps its whole base alive: the whole storage counts
    assert saved_activation_bytes(lambda: a(x[::2]).sum(), exclude=model) == _bytes(x)
    assert storage_bytes([x, x[::2], x.t()]) == _bytes(x)


def test_nothing_is_saved_without_grad_or_for_a_frozen_model():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 4))
    x = torch.randn(2, 3, 8, 8)
    assert saved_activation_bytes(lambda: net(x).sum(), exclude=net) > _bytes(x)
    with torch.no_grad():
        assert saved_activation_bytes(lambda: net(x).sum(), exclude=net) == 0
    net.requires_grad_(False)
    assert saved_activation_bytes(lambda: net(x).sum(), exclude=net) == 0


def test_batchnorm_running_statistics_are_excluded_with_the_model():
    bn = nn.BatchNorm2d(4).eval()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    # eval-mode BatchNorm saves its input, weight and the running statistics (buffers)
    assert saved_activation_bytes(lambda: bn(x).sum(), exclude=bn) == _bytes(x)
    assert saved_activation_bytes(lambda: bn(x).sum()) == _bytes(x) + 2 * _bytes(bn.running_mean)


def test_a_center_branch_saves_only_its_selected_input_channels():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False).requires_grad_(False)
    branch = CenterBranch(conv)  # frozen kernel: only the 1×1 branch needs its (view of the) input
    x = torch.randn(4, 8, 6, 6)
    assert saved_activation_bytes(lambda: conv(x).sum(), exclude=[*conv.parameters(), branch.param]) == _bytes(x)
    branch.fold()
    branch = CenterBranch(conv, torch.tensor([1, 5]))  # two of eight channels: a quarter of the input
    assert saved_activation_bytes(lambda: conv(x).sum(), exclude=[*conv.parameters(), branch.param]) == _bytes(x) // 4


def test_backward_inside_fn_does_not_merge_reused_addresses():
    lin = nn.Linear(64, 64)
    x = torch.randn(16, 64)

    def two_steps():
        for _ in range(2):  # the second forward's activations must not hide behind freed first-step addresses
            torch.relu(lin(x)).sum().backward()

    one = saved_activation_bytes(lambda: torch.relu(lin(x)).sum(), exclude=lin)
    assert one == _bytes(x) + 16 * 64 * 4
    assert saved_activation_bytes(two_steps, exclude=lin) == _bytes(x) + 2 * 16 * 64 * 4


# ---------------------------------------------------------------- FLOPs
def test_matmul_and_linear_step_flops():
    a, b = torch.randn(8, 32), torch.randn(32, 4)
    assert training_flops(lambda: a @ b) == 2 * 8 * 32 * 4
    lin = nn.Linear(32, 4)
    x = torch.randn(8, 32)
    # forward + weight gradient; no input gradient for a plain input
    assert training_flops(lambda: lin(x).sum().backward()) == 2 * (2 * 8 * 32 * 4)
    lin.requires_grad_(False)
    assert training_flops(lambda: lin(x).sum()) == 2 * 8 * 32 * 4


def test_conv_flops_and_grouped_weight_gradient():
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    dense = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    forward = 2 * 2 * 36 * 16 * 8 * 9
    assert training_flops(lambda: dense(x)) == forward
    with FlopCounterMode(display=False) as reference:
        dense(x).sum().backward()
    assert training_flops(lambda: dense(x).sum().backward()) == reference.get_total_flops() == 3 * forward
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    dw_forward = 2 * 2 * 36 * 8 * 1 * 9
    assert training_flops(lambda: depthwise(x).sum().backward()) == 3 * dw_forward
    # torch's own formula counts the depthwise weight gradient as if the conv were dense (8× here)
    with FlopCounterMode(display=False) as raw:
        depthwise(x).sum().backward()
    assert raw.get_total_flops() == 2 * dw_forward + 8 * dw_forward


def test_frozen_backbone_has_no_backbone_backward_flops():
    backbone = nn.Linear(32, 32)
    head = nn.Linear(32, 4)
    x = torch.randn(8, 32)
    backbone.requires_grad_(False)
    step = lambda: head(backbone(x)).sum().backward()  # noqa: E731
    assert training_flops(step) == 2 * 8 * 32 * 32 + 2 * (2 * 8 * 32 * 4)


# ---------------------------------------------------------------- gradients, optimizer state, parameters
def test_gradient_bytes_full_and_frozen():
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    x = torch.randn(4, 10)
    net(x).sum().backward()
    assert gradient_bytes(net.parameters()) == sum(_bytes(p) for p in net.parameters())
    net.zero_grad(set_to_none=True)
    net.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    net(xg).sum().backward()  # the backward runs (to the input) but no parameter gets a gradient
    assert xg.grad is not None
    assert gradient_bytes(net.parameters()) == 0
    assert trainable_parameter_count(net) == 0


def test_optimizer_state_bytes():
    net = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 3))
    params = list(net.parameters())
    param_bytes = sum(_bytes(p) for p in params)
    adam = torch.optim.Adam(params)
    assert optimizer_state_bytes(adam) == 0  # no state before the first step
    net(torch.randn(4, 10)).sum().backward()
    adam.step()
    steps = sum(_bytes(adam.state[p]["step"]) for p in params)
    assert optimizer_state_bytes(adam) == 2 * param_bytes + steps
    sgd = torch.optim.SGD(params, lr=0.1)
    sgd.step()
    assert optimizer_state_bytes(sgd) == 0
    momentum = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    momentum.step()
    assert optimizer_state_bytes(momentum) == param_bytes


def test_trainable_parameter_count_counts_shared_parameters_once():
    lin = nn.Linear(4, 4)
    tied = nn.Sequential(lin, nn.ReLU(), lin)
    assert trainable_parameter_count(tied) == 20
    assert trainable_parameter_count([lin.weight, lin.weight]) == 16


# ---------------------------------------------------------------- timing and the cost record
def test_median_step_times_validates_and_interleaves():
    calls = []
    times = median_step_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4
    assert set(times) == {"a", "b"}
    assert median_step_time(lambda: None, warmup=0, repeats=1) >= 0
    ticks = iter(range(0, 1000, 5)).__next__  # a clock that advances 5 units per reading
    assert median_step_times({"a": lambda: None}, warmup=0, repeats=3, clock=ticks) == {"a": 5}
    with pytest.raises(ValueError, match=r"repeats=0 are not allowed"):
        median_step_times({"a": lambda: None}, repeats=0)


def test_step_cost_ratios():
    full = StepCost(100, 1000, 400, 400, 800, 0, 0.2)
    ours = StepCost(10, 400, 100, 40, 84, 16, None)
    ratios = ours.ratios(full)
    assert ratios["flops"] == 0.4
    assert ratios["gradient_and_optimizer_bytes"] == pytest.approx(124 / 1200)
    assert ratios["projection_state_bytes"] is None  # the baseline has none
    assert ratios["step_time_s"] is None
    assert ours.training_memory_bytes == 40 + 84 + 100 + 16


def test_measure_step_full_versus_csko_steady_state():
    torch.manual_seed(0)
    base = tiny_net()
    batch = (torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,)))
    loss = nn.functional.cross_entropy

    full = tiny_net()
    full.load_state_dict(base.state_dict())
    full_opt = torch.optim.Adam(full.parameters())
    full_cost = measure_step(full, full_opt, loss, batch, warmup=0, repeats=1)
    n_full = sum(p.numel() for p in full.parameters())
    assert full_cost.trainable_parameters == n_full
    assert full_cost.gradient_bytes == 4 * n_full
    assert full_cost.projection_state_bytes == 0

    model = tiny_net()
    model.load_state_dict(base.state_dict())
    learner = CenterKernelLearner(layers="auto", first_task="center", score_batches=1)
    learner.bind(model)
    learner.record(lambda: model(torch.randn(8, 3, 8, 8)))
    learner.begin_task()
    model.train()
    opt = torch.optim.Adam(learner.trainable_parameters())
    handle = learner.attach_optimizer(opt)
    make_train_step(model, opt, loss, batch, learner)()  # the DCES scoring step
    assert learner.phase == "training" and learner.free_bases
    cost = measure_step(model, opt, loss, batch, learner, time_steps=False)
    handle.remove()

    # layers 'auto' = the two deepest 3×3 convs: the centers of their selected channels (DCES keeps 6 of 8 and 12
    # of 16 at the default ratio 0.75) train, and nothing of the unselected ones is allocated
    assert [int(m.sum()) for m in learner.selected.values()] == [6, 12]
    centers = 16 * 6 + 16 * 12
    trainable = centers + 16 * 4 + 4
    assert cost.trainable_parameters == trainable
    assert cost.gradient_bytes == 4 * trainable
    steps = sum(_bytes(s["step"]) for s in opt.state.values())
    assert cost.optimizer_state_bytes == 2 * 4 * trainable + steps
    assert cost.projection_state_bytes == learner.projection_state_bytes() > 0
    assert cost.step_time_s is None and full_cost.step_time_s is not None
    # nothing below the lowest trained layer is saved: the first branch's selected center input (a stride-2 conv:
    # 8×6×4×4 floats, compact, where a strided view would keep the whole 8×8×8×8 input alive), per ReLU
    # its output (8×16×4×4 floats each), per frozen BatchNorm only its 16 constant scales (it runs as an
    # affine map), the head's input, and the loss's log-softmax, int64 targets and weight sum; frozen kernels
    # add nothing (they read the same storage)
    expected = 4 * (8 * 6 * 4 * 4 + 2 * 8 * 16 * 4 * 4 + 2 * 16 + 8 * 16 + 8 * 4) + 8 * 8 + 4
    assert cost.saved_activation_bytes == expected
    assert cost.saved_activation_bytes < full_cost.saved_activation_bytes
    assert cost.flops < full_cost.flops
