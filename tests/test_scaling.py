"""Scaling helpers: CsKO's projection state is constant in the number of tasks, the full-kernel
baseline's covariance is k⁴ times larger per layer, published GPM's basis grows, costs grow with width."""

import copy

import pytest
import torch

from lightning_cskl.models import SmallCNN
from lightning_cskl.experiments.scaling import (
    PublishedGpmMemory,
    csko_state_over_tasks,
    full_finetune_setup,
    full_kernel_setup,
    full_kernel_state_over_tasks,
    measure_setups,
    synthetic_tasks,
)


def _plugin():
    from lightning_cskl.experiments.baselines import FullKernelProjectionPlugin

    return FullKernelProjectionPlugin("energy")


@pytest.fixture(scope="module")
def tasks():
    return synthetic_tasks(4, (1, 8, 8), batch_size=16, n_batches=2, seed=1)


def test_csko_projection_state_is_constant_in_the_number_of_tasks(tasks):
    torch.manual_seed(0)
    states = csko_state_over_tasks(SmallCNN(10, 1, 8), tasks, train_steps=1)
    between = [s.between_bytes for s in states]
    assert len(set(between[:3])) == 1 and between[0] > 0
    # between tasks: per trained layer a C×C float32 covariance and a C boolean mask (SmallCNN(8): C = 8, 16)
    assert between[0] == (8 * 8 + 16 * 16) * 4 + (8 + 16)
    # during a task the free bases C×r (r ≤ C) are added on top, and the trained tensors' start values (the
    # selected centers of 16 outputs, ρ = 0.75: 6 of 8 and 12 of 16 input channels, and the head's 10×16 + 10)
    start = (16 * 6 + 16 * 12 + 10 * 16 + 10) * 4
    assert all(between[0] + start < s.during_bytes <= between[0] + start + (8 * 8 + 16 * 16) * 4 for s in states[:3])
    assert states[-1].during_bytes is None


def test_full_kernel_covariance_is_k4_times_csko_covariance(tasks):
    torch.manual_seed(0)
    net = SmallCNN(10, 1, 8)
    csko = csko_state_over_tasks(copy.deepcopy(net), tasks[:2], train_steps=1)
    plugin = _plugin()
    gpm = full_kernel_state_over_tasks(copy.deepcopy(net), tasks[:2], plugin, train_steps=1)
    assert [s.between_bytes for s in gpm] == [gpm[0].between_bytes] * 2  # a sum of covariances: constant too
    elements = {name: cov.numel() for name, cov in plugin.covariances.items()}
    assert elements == {"features.1.0": (8 * 9) ** 2, "features.2.0": (16 * 9) ** 2}
    masks = 8 + 16
    csko_covariance_bytes = csko[0].between_bytes - masks
    # k⁴ = 81 times the elements, both stored in float32
    assert gpm[0].between_bytes == 81 * csko_covariance_bytes


def test_published_gpm_basis_grows_with_new_directions_and_saturates():
    memory = PublishedGpmMemory()
    sizes = []
    for t in range(4):
        vectors = torch.zeros(6, 2)
        vectors[2 * (t % 3), 0] = vectors[2 * (t % 3) + 1, 1] = 1.0  # task t excites two new axes (repeats at t=3)
        memory.update({"conv": (vectors @ vectors.T).unsqueeze(0)}, energy=0.97)
        sizes.append(memory.ranks()["conv"])
    assert sizes == [2, 4, 6, 6]
    assert memory.nbytes() == 6 * 6 * 4 and memory.projector_nbytes() == 6 * 6 * 4
    basis = memory.bases["conv"][0]
    assert torch.allclose(basis.T @ basis, torch.eye(6, dtype=basis.dtype), atol=1e-10)


def test_published_gpm_basis_grows_on_synthetic_tasks(tasks):
    torch.manual_seed(0)
    states = full_kernel_state_over_tasks(SmallCNN(10, 1, 8), tasks[:3], _plugin(), train_steps=1)
    ranks = [sum(s.published_ranks.values()) for s in states]
    assert ranks[0] < ranks[1] < ranks[2] <= 8 * 9 + 16 * 9


def test_costs_grow_with_width():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    costs = []
    for width in (4, 8):
        base = SmallCNN(10, 1, width)
        costs.append(measure_setups({
            "full": lambda: full_finetune_setup(base),
            "gpm": lambda: full_kernel_setup(base, _plugin(), [x]),
        }, (x, y)))
    for method in ("full", "gpm"):
        small, large = costs[0][method], costs[1][method]
        assert small.trainable_parameters < large.trainable_parameters
        assert small.flops < large.flops
        assert small.saved_activation_bytes < large.saved_activation_bytes
        assert small.gradient_and_optimizer_bytes < large.gradient_and_optimizer_bytes
    assert costs[0]["full"].projection_state_bytes == 0
    assert 0 < costs[0]["gpm"].projection_state_bytes < costs[1]["gpm"].projection_state_bytes
