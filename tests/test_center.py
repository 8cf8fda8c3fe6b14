"""Decoupling and folding the kernel center: function preservation, fold-back, and bad input."""

import itertools

import pytest
import torch
from torch import nn

from lightning_cskl.core import (
    CenterDecoupledConv,
    center_index,
    decouple_center,
    fold_center,
    is_center_decoupled,
)

torch.manual_seed(0)

GRID_2D = [
    dict(kernel_size=k, stride=s, padding=p, dilation=d, groups=g, padding_mode=pm, bias=b)
    for k, s, p, d, g, pm, b in itertools.product(
        [1, 3, (3, 5), 5],
        [1, 2, (2, 1)],
        [0, 1, 2, (1, 3), "same", "valid"],
        [1, 2],
        [1, 2, 4],
        ["zeros", "reflect", "circular"],
        [True, False],
    )
    # torch forbids 'same' with stride > 1
    if not (p == "same" and s != 1)
]


def _build(cls, in_ch, out_ch, **kw):
    try:
        return cls(in_ch, out_ch, **kw)
    except (ValueError, RuntimeError):
        return None


@pytest.mark.parametrize("cfg", GRID_2D[::3], ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_decoupled_conv2d_computes_the_same_function(cfg):
    conv = _build(nn.Conv2d, 4, 8, **cfg)
    if conv is None:
        pytest.skip("combination refused by torch")
    x = torch.randn(2, 4, 11, 10)
    try:
        expected = conv(x)
    except RuntimeError:
        pytest.skip("padding larger than the input for this mode")
    original_weight = conv.weight.detach().clone()
    dec = decouple_center(conv)
    assert isinstance(dec, CenterDecoupledConv) and is_center_decoupled(dec)
    assert (dec(x) - expected).abs().max() <= 1e-5
    folded = fold_center(dec)
    assert folded is conv and type(folded) is nn.Conv2d
    assert torch.equal(folded.weight, original_weight)
    assert (folded(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("cls,shape", [(nn.Conv1d, (2, 6, 13)), (nn.Conv3d, (2, 6, 7, 8, 6))])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, "same", 2), (2, 3, 1)])
def test_conv1d_and_conv3d(cls, shape, stride, padding, dilation):
    conv = cls(6, 4, 3, stride=stride, padding=padding, dilation=dilation, groups=2)
    x = torch.randn(*shape)
    expected = conv(x)
    dec = decouple_center(conv)
    assert (dec(x) - expected).abs().max() <= 1e-5


def test_depthwise_branch_is_a_per_channel_scale():
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    x = torch.randn(3, 6, 5, 5)
    expected = conv(x)
    dec = decouple_center(conv)
    assert dec.center.shape == (6, 1)
    assert (dec(x) - expected).abs().max() <= 1e-5



def test_learned_center_is_merged_on_fold():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    dec = decouple_center(conv)
    with torch.no_grad():
        dec.center.add_(0.5)
    x = torch.randn(2, 3, 6, 6)
    out = dec(x)
    folded = fold_center(dec)
    assert (folded(x) - out).abs().max() <= 1e-5
    assert fold_center(folded) is folded  # idempotent


def test_only_center_is_trainable_and_gradient_matches_kernel_center():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    reference = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 9, 9)
    reference(x).square().sum().backward()
    dec = decouple_center(conv)
    dec(x).square().sum().backward()
    assert not dec.conv.weight.requires_grad and dec.conv.weight.grad is None
    assert torch.allclose(dec.center.grad, reference.weight.grad[:, :, 1, 1], atol=1e-5)


def test_decouple_is_idempotent_and_keeps_device_and_dtype():
    conv = nn.Conv2d(2, 2, 3).double()
    dec = decouple_center(conv)
    assert decouple_center(dec) is dec
    assert dec.center.dtype == torch.float64


def test_even_kernel_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"kernel_size=\(2, 3\) has no center element.*odd"):
        decouple_center(nn.Conv2d(2, 2, (2, 3)))
    with pytest.raises(ValueError, match="must be odd"):
        center_index(4)


def test_non_conv_is_refused():
    with pytest.raises(TypeError, match="needs an nn.Conv1d/Conv2d/Conv3d, got Linear"):
        decouple_center(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="got ConvTranspose2d"):
        decouple_center(nn.ConvTranspose2d(2, 2, 3))


def test_unbatched_input_is_supported():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(3, 6, 6)
    expected = conv(x)
    assert (decouple_center(conv)(x) - expected).abs().max() <= 1e-5
