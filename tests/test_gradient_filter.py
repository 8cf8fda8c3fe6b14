"""Gradient filtering on the center branch: exact forward, backward equal to the filtered reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_cskl.core import CenterBranch, CenterKernelLearner
from lightning_cskl.core.accounting import saved_activation_bytes


def reference_filtered_grads(x_center, weight, grad_out, patch, groups):
    """Back-propagate the patch-averaged output gradient through a plain 1×1 convolution."""
    g = F.avg_pool2d(grad_out, patch, patch, ceil_mode=True, count_include_pad=False)
    g = g.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, : grad_out.shape[2], : grad_out.shape[3]]
    x = x_center.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    y = F.conv2d(x, w[:, :, None, None], groups=groups)
    y.backward(g)
    return x.grad, w.grad


@pytest.mark.parametrize("patch", [2, 3])
@pytest.mark.parametrize("size,groups,stride", [((8, 8), 1, 1), ((7, 9), 1, 1), ((9, 8), 2, 2)])
def test_filtered_backward_matches_reference(patch, size, groups, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=stride, groups=groups)
    plain = nn.Conv2d(4, 6, 3, padding=1, stride=stride, groups=groups)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, *size, requires_grad=True)
    branch = CenterBranch(conv.requires_grad_(False), gradient_filter=patch)
    out = conv(x)
    assert torch.allclose(out, plain(x), atol=1e-5)  # the forward is exact
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    # reference: the same filtered output gradient through center input and 1×1 weight
    x_ref = x.detach().clone().requires_grad_(True)
    from lightning_cskl.core.center import center_input

    x_center = center_input(conv, x_ref, tuple(out.shape[2:]))
    gx_center, gw = reference_filtered_grads(x_center, branch.param, grad_out, patch, groups)
    assert torch.allclose(branch.param.grad, gw, atol=1e-4)
    # the frozen kernel's input gradient is exact (its centers are zero while the branch holds them), the branch's
    # is filtered
    x_ref.grad = None
    frozen = F.conv2d(x_ref, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    frozen.backward(grad_out)
    expected_x = x_ref.grad.clone()
    expected_x_center = torch.zeros_like(x_ref)
    center_input(conv, expected_x_center, tuple(out.shape[2:])).copy_(gx_center)
    assert torch.allclose(x.grad, expected_x + expected_x_center, atol=1e-4)


def test_filter_cuts_the_saved_activation_of_the_branch():
    torch.manual_seed(0)
    results = {}
    for patch in (None, 2):
        net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        learner = CenterKernelLearner(layers=["2"], first_task="center", gradient_filter=patch)
        learner.bind(net)
        learner.begin_task()
        x = torch.randn(8, 16, 16, 16)
        results[patch] = saved_activation_bytes(lambda: net(x).square().sum().backward())
    # exact: the branch saves its 16×16 input; filtered: the 8×8 cell sums (a quarter) instead
    input_bytes = 8 * 16 * 16 * 16 * 4
    assert results[None] - results[2] >= 0.75 * input_bytes


def test_bad_gradient_filter_is_refused():
    with pytest.raises(ValueError, match=r"gradient_filter=1 is not allowed: use None or a patch size >= 2"):
        CenterBranch(nn.Conv2d(2, 2, 3), gradient_filter=1)
    from lightning_cskl import CenterKernelConfig

    with pytest.raises(ValueError, match=r"gradient_filter=2.5 is not allowed"):
        CenterKernelConfig(gradient_filter=2.5)


def test_filtered_branch_trains_under_cpu_autocast():
    """Autograd runs the backward outside autocast: a bf16 output gradient meets the fp32 saved input/weight."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).requires_grad_(False)
    branch = CenterBranch(conv, gradient_filter=2)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert branch.param.grad is not None and branch.param.grad.dtype == torch.float32
    assert torch.isfinite(branch.param.grad).all() and branch.param.grad.abs().sum() > 0
    # the same gradient, up to bf16 rounding, as the fp32 run
    fp32 = nn.Conv2d(4, 6, 3, padding=1, bias=False).requires_grad_(False)
    fp32_branch = CenterBranch(fp32, gradient_filter=2)
    fp32.load_state_dict(conv.state_dict())
    fp32(x).square().mean().backward()
    assert torch.allclose(branch.param.grad, fp32_branch.param.grad, rtol=0.1, atol=1e-2)
