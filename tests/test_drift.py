"""Drift-carried statistics (core/drift.py), the QDA statistics head, whole-kernel branches and the backbone before
the update (CenterKernelLearner.task_start_weights): plain torch, no framework."""

import logging

import pytest
import torch
from torch import nn

from lightning_cskl.core import CenterKernelLearner
from lightning_cskl.core.center import CenterBranch
from lightning_cskl.core.drift import DriftCarry, DriftMap, feature_distillation, fit_drift, validate_distill_weight
from lightning_cskl.core.head import StatisticsHead
from lightning_cskl.core.prototypes import PrototypeMemory
from tests.engine_helpers import Net, low_rank_data


def _pairs(n=400, f=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g, dtype=torch.float64)
    a = torch.eye(f, dtype=torch.float64) + 0.3 * torch.randn(f, f, generator=g, dtype=torch.float64)
    b = torch.randn(f, generator=g, dtype=torch.float64)
    return x, x @ a + b, a, b


def test_the_affine_map_is_recovered_and_carries_means_and_covariance():
    x, y, a, b = _pairs()
    drift = fit_drift(x, y)
    assert drift.residual < 1e-3 and drift.samples == 400
    means = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(drift.apply_means(means), means @ a + b, atol=1e-3)
    head = StatisticsHead("lda")
    labels = torch.arange(400) % 4
    head.update(x, labels)
    carried = StatisticsHead("lda")
    carried.load_state_dict(head.state_dict())
    carried.carry(drift)
    measured = StatisticsHead("lda")
    measured.update(y, labels)  # the statistics the new features would have given
    assert torch.allclose(carried.means, measured.means, atol=1e-3)
    assert torch.allclose(carried.covariance(), measured.covariance(), atol=1e-3)


def test_shift_and_sdc_move_means_and_keep_the_covariance():
    x = torch.randn(100, 3, dtype=torch.float64)
    for kind in ("shift", "sdc"):
        drift = fit_drift(x, x + torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64), kind)
        moved = drift.apply_means(torch.zeros(2, 3, dtype=torch.float64))
        assert torch.allclose(moved, torch.tensor([[1.0, 0.0, -2.0]] * 2, dtype=torch.float64)), kind
        scatter = torch.eye(3, dtype=torch.float64)
        assert torch.equal(drift.apply_scatter(scatter), scatter)


def test_too_little_data_warns_and_falls_back(caplog):
    x, y, _, _ = _pairs(n=5, f=6)
    with caplog.at_level(logging.WARNING):
        drift = fit_drift(x, y, task="experience 3")
    assert drift is not None and drift.ridge == 1.0
    assert "experience 3: 5 samples for 6 features, the drift map is fitted with the ridge prior" in caplog.text
    caplog.clear()
    x, y, _, _ = _pairs(n=200, f=3)
    with caplog.at_level(logging.WARNING):
        fit_drift(x, y, labels=torch.zeros(200), task="t")
    assert "one class only" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert fit_drift(x[:1], y[:1], task="t") is None
    assert "too few to fit a drift map: the stored statistics are not carried" in caplog.text
    with caplog.at_level(logging.WARNING):
        assert DriftCarry().apply([StatisticsHead()], task="empty task") is None
    assert "empty task: no features were paired" in caplog.text


def test_non_finite_features_are_left_out_and_counted(caplog):
    x, y, _, _ = _pairs(n=100, f=3)
    y[:7, 0] = float("nan")
    with caplog.at_level(logging.WARNING):
        drift = fit_drift(x, y)
    assert drift.dropped == 7 and drift.samples == 93 and torch.isfinite(drift.weight).all()
    assert "7 of 100 samples with non-finite features" in caplog.text


def test_drift_carry_moves_heads_and_prototypes_and_times_itself():
    x, y, a, b = _pairs()
    labels = torch.arange(400) % 2
    head, memory = StatisticsHead("ncm"), PrototypeMemory()
    head.update(x, labels)
    memory.begin_collect(); memory.collect(x.float(), labels); memory.end_collect()
    carry = DriftCarry("affine")
    carry.add(x[:200], y[:200], labels[:200]); carry.add(x[200:], y[200:], labels[200:])
    drift = carry.apply([head, memory], task="t")
    assert isinstance(drift, DriftMap) and carry.last is drift and carry.seconds > 0 and len(carry) == 0
    expected = torch.stack([y[labels == c].mean(0) for c in (0, 1)])
    assert torch.allclose(head.means, expected, atol=1e-3)
    assert torch.allclose(memory.prototypes.double(), expected, atol=1e-3)


def test_distillation_term_and_its_weight():
    assert float(feature_distillation(torch.zeros(4, 2), torch.ones(4, 2))) == 2.0
    with pytest.raises(ValueError, match="distill_weight=-1 is not allowed"):
        validate_distill_weight(-1)


def test_qda_head_merges_batches_exactly_and_beats_lda_on_unequal_covariances():
    g = torch.Generator().manual_seed(0)
    n = 600
    z0 = torch.randn(n, 2, generator=g) * torch.tensor([3.0, 0.2])
    z1 = torch.randn(n, 2, generator=g) * torch.tensor([0.2, 3.0]) + 0.5
    z, y = torch.cat([z0, z1]), torch.cat([torch.zeros(n), torch.ones(n)]).long()
    order = torch.randperm(2 * n, generator=g)
    z, y = z[order], y[order]
    train, test = slice(0, n), slice(n, None)
    accuracy = {}
    for rule in ("lda", "qda"):
        head = StatisticsHead(rule)
        for i in range(0, n, 97):  # uneven batches
            head.update(z[train][i:i + 97], y[train][i:i + 97])
        accuracy[rule] = float((head.logits(z[test]).argmax(1) == y[test]).float().mean())
    one_shot = StatisticsHead("qda")
    one_shot.update(z[train], y[train])
    assert torch.allclose(one_shot.class_scatter, head.class_scatter, atol=1e-6)
    assert accuracy["qda"] > accuracy["lda"] + 0.1, accuracy
    restored = StatisticsHead("qda")
    restored.load_state_dict(head.state_dict())
    assert torch.equal(restored.logits(z[test]), head.logits(z[test]))
    with pytest.raises(ValueError, match="statistics_head='knn' is not allowed"):
        StatisticsHead("knn")
    with pytest.raises(ValueError, match="shrinkage=2 is not allowed for statistics_head='qda'"):
        StatisticsHead("qda", 2)


def test_qda_carry_moves_every_class_covariance():
    x, y, a, b = _pairs()
    labels = torch.arange(400) % 3
    head = StatisticsHead("qda", power=1.0)
    head.update(x, labels)
    head.carry(fit_drift(x, y))
    measured = StatisticsHead("qda")
    measured.update(y, labels)
    assert torch.allclose(head.class_scatter, measured.class_scatter, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("groups", [1, 4])
def test_a_kernel_branch_keeps_the_function_and_folds_back(groups):
    conv = nn.Conv2d(4, 8, 3, padding=1, stride=2, groups=groups)
    x = torch.randn(2, 4, 7, 7)
    before, weight = conv(x), conv.weight.detach().clone()
    branch = CenterBranch(conv, torch.tensor([1, 3]), elements="kernel")
    assert branch.param.shape[-2:] == (3, 3)
    assert torch.allclose(conv(x), before, atol=1e-5)
    assert sorted(conv.state_dict()) == ["bias", "weight"] and torch.equal(conv.state_dict()["weight"], weight)
    with torch.no_grad():
        branch.param.add_(0.5)
    moved = conv(x)
    branch.fold()
    assert torch.allclose(conv(x), moved, atol=1e-5)
    changed = (conv.weight.detach() != weight).flatten(2).any(2)  # (out, in/groups): which kernels moved
    assert changed.any()
    if groups == 1:
        assert changed[:, [1, 3]].all() and not changed[:, [0, 2]].any()
    with pytest.raises(ValueError, match="gradient_filter=2 is not allowed with elements='kernel'"):
        CenterBranch(conv, None, gradient_filter=2, elements="kernel")


def _train_task(learner, net, data, steps=12):
    learner.begin_task()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    handle = learner.attach_optimizer(opt)
    for i in range(steps):
        opt.zero_grad()
        net(data[i % 4 * 8:(i % 4 + 1) * 8]).pow(2).sum().backward()
        learner.before_update()
        opt.step()
    return handle


def test_kernel_elements_train_whole_kernels_of_selected_channels_only():
    torch.manual_seed(0)
    net = Net()
    learner = CenterKernelLearner(layers=["conv2"], elements="kernel", score_batches=2, channel_ratio=0.5,
                                  first_task="center", project=False)
    learner.bind(net)
    weight = net.conv2.weight.detach().clone()
    handle = _train_task(learner, net, low_rank_data(32, 0))
    learner.end_task(lambda: net(low_rank_data(32, 0)))
    handle.remove()
    moved = (net.conv2.weight.detach() != weight).flatten(2)  # (out, in, taps)
    selected = learner.selected["conv2"]
    assert moved[:, selected].any(0).all(), "every tap of the selected channels should move"
    assert not moved[:, ~selected].any(), "an unselected channel moved"
    with pytest.raises(ValueError, match="elements='kernel' needs mode='decouple'"):
        CenterKernelLearner(elements="kernel", mode="mask")


def test_task_start_weights_give_the_backbone_before_the_update_exactly():
    torch.manual_seed(0)
    net = Net()
    data = low_rank_data(32, 0)
    learner = CenterKernelLearner(layers=["conv2", "conv3"], score_batches=2, first_task="center",
                                  train_also=["head"], project=False)
    learner.bind(net)
    with torch.no_grad():
        start = net.eval()(data)
    handle = _train_task(learner, net.train(), data)
    with torch.no_grad():
        now = net.eval()(data)
        with learner.task_start_weights() as swapped:
            old = net(data)
        after = net(data)
    assert swapped and torch.allclose(old, start, atol=1e-6) and not torch.allclose(now, start, atol=1e-3)
    assert torch.equal(after, now), "the trained values must be put back"
    state = learner.state_dict()
    assert set(state["start_values"]) == {"conv2:branch", "conv3:branch", "head.weight", "head.bias"}
    learner.end_task(lambda: net(data))
    handle.remove()
    with learner.task_start_weights() as swapped:
        assert not swapped  # between tasks nothing is swapped


def test_the_carried_covariance_adds_what_no_affine_map_predicts():
    """y = x A + b + e with e independent of x: every class's covariance under the new backbone is AᵀΣA + Σ_e.
    Without Σ_e the carried covariances are too narrow; with it they match the re-measured ones."""
    x, y, a, b = _pairs(n=4000)
    g = torch.Generator().manual_seed(1)
    noise_scale = torch.tensor([0.5, 0.1, 0.1, 0.3, 0.1, 0.2], dtype=torch.float64)
    y = y + torch.randn(y.shape, generator=g, dtype=torch.float64) * noise_scale
    drift = fit_drift(x, y)
    assert torch.allclose(drift.noise.diagonal().sqrt(), noise_scale, rtol=0.1)
    labels = torch.arange(4000) % 3
    measured = StatisticsHead("qda")
    measured.update(y, labels)
    for with_noise in (True, False):
        head = StatisticsHead("qda")
        head.update(x, labels)
        head.carry(drift if with_noise else DriftMap("affine", weight=drift.weight, bias=drift.bias))
        error = (head.class_covariances() - measured.class_covariances()).norm() / measured.class_covariances().norm()
        assert (error < 0.05) == with_noise, (with_noise, float(error))
        pooled = (head.covariance() - measured.covariance()).norm() / measured.covariance().norm()
        assert (pooled < 0.05) == with_noise, (with_noise, float(pooled))
