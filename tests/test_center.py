"""The center branch beside a convolution: function preservation, exact fold-back, gradients, what backward
saves, the module's own structure and state_dict, and bad input."""

import copy
import itertools

import pytest
import torch
from torch import nn

from lightning_cskl.core import CenterBranch, attached_branch, center_index

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


def _channels(conv):
    """Every other input channel of a plain or depthwise convolution (None, all channels, for other grouped ones)."""
    return torch.arange(0, conv.in_channels, 2) if conv.groups in (1, conv.in_channels) else None


@pytest.mark.parametrize("cfg", GRID_2D[::3], ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_a_branch_keeps_the_function_and_folds_back_exactly(cfg):
    conv = _build(nn.Conv2d, 4, 8, **cfg)
    if conv is None:
        pytest.skip("combination refused by torch")
    x = torch.randn(2, 4, 11, 10)
    try:
        expected = conv(x)
    except RuntimeError:
        pytest.skip("padding larger than the input for this mode")
    original = conv.weight.detach().clone()
    branch = CenterBranch(conv, _channels(conv))
    assert type(conv) is nn.Conv2d and attached_branch(conv) is branch
    assert (conv(x) - expected).abs().max() <= 1e-5
    assert torch.equal(conv.state_dict()["weight"], original)  # the emitted weight holds the centers
    assert branch.fold() is conv and attached_branch(conv) is None
    assert torch.equal(conv.weight, original)
    assert (conv(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("cls,shape", [(nn.Conv1d, (2, 6, 13)), (nn.Conv3d, (2, 6, 7, 8, 6))])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, "same", 2), (2, 3, 1)])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv1d_and_conv3d(cls, shape, stride, padding, dilation, groups):
    conv = cls(6, 4, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn(*shape)
    expected = conv(x)
    CenterBranch(conv, _channels(conv))
    assert (conv(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("multiplier", [1, 2])
def test_a_depthwise_branch_holds_the_selected_channels_scales_only(multiplier):
    conv = nn.Conv2d(6, 6 * multiplier, 3, padding=1, groups=6)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    expected = conv(x)
    reference = torch.autograd.grad(expected.square().sum(), [x, conv.weight])
    branch = CenterBranch(conv.requires_grad_(False), torch.tensor([1, 4]))
    assert branch.param.shape == (2 * multiplier, 1)
    out = conv(x)
    assert (out - expected).abs().max() <= 1e-5
    grad_x, grad_w = torch.autograd.grad(out.square().sum(), [x, branch.param])
    rows = [m * 1 + j for m in (1 * multiplier, 4 * multiplier) for j in range(multiplier)]
    assert torch.allclose(grad_w, reference[1][rows, :, 1, 1], atol=1e-4)
    assert torch.allclose(grad_x, reference[0], atol=1e-5)
    original = conv.state_dict()["weight"]
    branch.fold()
    assert torch.equal(conv.weight, original)


def test_a_learned_center_is_merged_on_fold():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    branch = CenterBranch(conv, torch.tensor([1]))
    with torch.no_grad():
        branch.param.add_(0.5)
    x = torch.randn(2, 3, 6, 6)
    out = conv(x)
    assert torch.equal(branch.full_center()[:, 1], conv.state_dict()["weight"][:, 1, 1, 1])
    branch.fold()
    assert (conv(x) - out).abs().max() <= 1e-5
    assert branch.fold() is conv  # idempotent


@pytest.mark.parametrize("channels", [None, [0, 2]])
def test_gradients_equal_the_kernel_centers_and_the_input_gradient_is_exact(channels):
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    reference = copy.deepcopy(conv)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    reference(x).square().sum().backward()
    expected_x = x.grad.clone()
    x.grad = None
    conv.requires_grad_(False)
    branch = CenterBranch(conv, None if channels is None else torch.tensor(channels))
    conv(x).square().sum().backward()
    assert conv.weight.grad is None
    index = slice(None) if channels is None else channels
    assert torch.allclose(branch.param.grad, reference.weight.grad[:, index, 1, 1], atol=1e-5)
    assert torch.allclose(x.grad, expected_x, atol=1e-5)


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves while ``fn`` runs its forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_backward_saves_only_the_selected_channels_of_an_input_without_gradient():
    conv = nn.Conv2d(16, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(4, 16, 12, 12)
    whole = _saved_bytes(lambda: CenterBranch(copy.deepcopy(conv)).conv(x))
    branch = CenterBranch(conv, torch.arange(4))
    quarter = _saved_bytes(lambda: conv(x))
    assert quarter < 0.3 * whole, (quarter, whole)
    # an input that needs a gradient is saved by the convolution anyway: the branch adds no storage of its own
    y = x.clone().requires_grad_(True)
    plain = copy.deepcopy(conv)
    branch.fold()
    assert _saved_bytes(lambda: plain(y)) == _saved_bytes(lambda: CenterBranch(conv, torch.arange(4)).conv(y))


def test_the_module_keeps_its_parameters_and_state_dict_and_loads_plain_checkpoints():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    names = [n for n, _ in conv.named_parameters()]
    branch = CenterBranch(conv, torch.tensor([0, 3]))
    with torch.no_grad():
        branch.param.mul_(2)
    x = torch.randn(2, 4, 5, 5)
    out = conv(x)
    assert [n for n, _ in conv.named_parameters()] == names and list(conv.state_dict()) == ["weight", "bias"]
    # a checkpoint written now loads into the plain architecture and computes the same
    plain = nn.Conv2d(4, 6, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    assert torch.allclose(plain(x), out, atol=1e-6)
    # and loads back into a module with a branch, bit for bit
    other = nn.Conv2d(4, 6, 3, padding=1)
    other_branch = CenterBranch(other, torch.tensor([0, 3]))
    other.load_state_dict(conv.state_dict())
    assert torch.equal(other_branch.param, branch.param) and torch.equal(other.weight, conv.weight)


def test_a_deep_copy_owns_its_branch():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    branch = CenterBranch(conv)
    twin = copy.deepcopy(conv)
    twin_branch = attached_branch(twin)
    assert twin_branch is not branch and twin_branch.param is not branch.param
    twin_branch.fold()
    assert attached_branch(conv) is branch and conv._forward_hooks and not twin._forward_hooks
    x = torch.randn(1, 3, 5, 5)
    assert torch.allclose(twin(x), conv(x), atol=1e-6)


def test_a_user_forward_hook_sees_the_output_with_its_center():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    seen = []
    conv.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    branch = CenterBranch(conv, torch.tensor([0, 2]))
    with torch.no_grad():
        branch.param.add_(1.0)
    out = conv(torch.randn(1, 3, 5, 5))
    assert torch.equal(seen[-1], out.detach())


def test_even_kernels_bad_channels_and_a_second_branch_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"kernel_size=\(2, 3\) has no center element.*odd"):
        CenterBranch(nn.Conv2d(2, 2, (2, 3)))
    with pytest.raises(ValueError, match="must be odd"):
        center_index(4)
    with pytest.raises(ValueError, match=r"channels=\[1, 1\] is not allowed for Conv2d\(in_channels=4, groups=1\)"):
        CenterBranch(nn.Conv2d(4, 2, 3), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"groups=2\): give distinct sorted input channels"):
        CenterBranch(nn.Conv2d(4, 2, 3, groups=2), torch.tensor([0]))
    conv = nn.Conv2d(2, 2, 3)
    CenterBranch(conv)
    with pytest.raises(ValueError, match="already has a center branch"):
        CenterBranch(conv)
    with pytest.raises(ValueError, match="gradient_filter=1 is not allowed"):
        CenterBranch(nn.Conv2d(2, 2, 3), gradient_filter=1)


def test_non_conv_is_refused():
    with pytest.raises(TypeError, match="needs an nn.Conv1d/Conv2d/Conv3d, got Linear"):
        CenterBranch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="got ConvTranspose2d"):
        CenterBranch(nn.ConvTranspose2d(2, 2, 3))


def test_unbatched_input_is_supported():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(3, 6, 6)
    expected = conv(x)
    CenterBranch(conv, torch.tensor([0, 1]))
    assert (conv(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("groups", [1, 16], ids=["plain", "depthwise"])
def test_the_weight_gradient_costs_scale_with_the_selected_channels(groups):
    from lightning_cskl.core.accounting import training_flops

    x = torch.randn(4, 16, 10, 10)

    def weight_gradient_flops(channels):
        conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups).requires_grad_(False)
        branch = CenterBranch(conv, channels)
        with torch.no_grad():
            out = conv(x)
            forward = training_flops(lambda: branch.contribution(x, out))

        def backward():
            contribution = branch.contribution(x, out)
            torch.autograd.grad(contribution, branch.param, torch.ones_like(contribution))

        return training_flops(backward) - forward, branch.param.numel()

    whole, whole_size = weight_gradient_flops(None)
    quarter, quarter_size = weight_gradient_flops(torch.arange(0, 16, 4))
    assert quarter_size * 4 == whole_size and quarter * 4 == whole > 0


def test_a_call_by_keyword_and_a_pickled_copy_keep_the_branch():
    import pickle

    from torch.utils.hooks import RemovableHandle

    conv = nn.Conv2d(3, 4, 3, padding=1)
    branch = CenterBranch(conv, torch.tensor([0, 2]))
    with torch.no_grad():
        branch.param.add_(1.0)
    x = torch.randn(1, 3, 5, 5)
    expected = conv(x)
    assert torch.equal(conv(input=x), expected)
    # a new process restarts the hook-id counter: a hook registered on the unpickled conv must not replace ours
    saved = RemovableHandle.next_id
    try:
        RemovableHandle.next_id = 0
        twin = pickle.loads(pickle.dumps(conv))
        twin.register_forward_hook(lambda m, a, out: None)
        assert torch.allclose(twin(x), expected, atol=1e-6)
        attached_branch(twin).fold()
        assert len(twin._forward_hooks) == 1  # the user's hook stays
    finally:
        RemovableHandle.next_id = max(saved, RemovableHandle.next_id)
