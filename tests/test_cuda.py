"""The method on a CUDA device: decoupling, the engine, the Lightning callback under AMP, and cost accounting.

Skipped where CUDA is not available (CI is CPU only). Imports only torch, lightning, pytest, numpy and the
package's core, Lightning front door and models: the GPU machine has no Avalanche, wandb or jsonargparse.
Synthetic data, tiny models: the whole file runs in seconds on a GPU.

Run on a GPU machine with ``python -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs``.
"""

from __future__ import annotations

import copy
import io

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_cskl.core import CenterBranch, CenterKernelLearner, attached_branch
from lightning_cskl.core.accounting import measure_step
from lightning_cskl.core.projection import NULL_SPACE_RTOL
from lightning_cskl.lightning import CenterKernelCallback
from lightning_cskl.lightning.module import TaskClassifier
from lightning_cskl.models import SmallCNN

from .engine_helpers import Net, low_rank_data, tiny_net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _on_device(tensor: torch.Tensor) -> bool:
    return tensor.device.type == CUDA.type

# Convolutions on CUDA may run in TF32 (about 1e-3 relative error), so fp32 comparisons between two CUDA
# computations of the same function use this tolerance; a wrong center alignment gives errors of order 1.
FP32_TOL = dict(atol=5e-3, rtol=5e-3)
FP16_TOL = dict(atol=3e-2, rtol=2e-2)


# ---------------------------------------------------------------- 1. decouple / fold on CUDA
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0), (2, 2)])
def test_decouple_and_fold_on_cuda_fp32(stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=stride, padding=padding).to(CUDA)
    x = torch.randn(4, 8, 11, 10, device=CUDA)
    original = conv.weight.detach().clone()
    with torch.no_grad():
        expected = conv(x)
        expected_cpu = copy.deepcopy(conv).cpu()(x.cpu())
    conv.requires_grad_(False)
    branch = CenterBranch(conv, torch.arange(0, 8, 2))
    assert _on_device(branch.param) and branch.param.dtype == torch.float32 and type(conv) is nn.Conv2d
    assert torch.all(conv.weight[:, ::2, 1, 1] == 0)
    with torch.no_grad():
        got = conv(x)
    assert _on_device(got)
    torch.testing.assert_close(got, expected, **FP32_TOL)
    torch.testing.assert_close(got.cpu(), expected_cpu, **FP32_TOL)

    # only the center trains, and its gradient lives on the device
    conv(x).square().mean().backward()
    assert branch.param.grad is not None and _on_device(branch.param.grad)
    assert conv.weight.grad is None

    folded = branch.fold()
    assert folded is conv and type(folded) is nn.Conv2d
    assert torch.equal(folded.weight, original)  # 0 + center is exact
    assert all(_on_device(p) for p in folded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, **FP32_TOL)


def test_fold_after_training_on_cuda_moves_only_the_center_taps():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False).to(CUDA)
    original = conv.weight.detach().clone()
    branch = CenterBranch(conv.requires_grad_(False))
    opt = torch.optim.SGD([branch.param], lr=0.5)
    x = torch.randn(4, 8, 6, 6, device=CUDA)
    for _ in range(3):
        opt.zero_grad()
        conv(x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        trained = conv(x)
    folded = branch.fold()
    mask = torch.ones_like(original, dtype=torch.bool)
    mask[:, :, 1, 1] = False
    assert torch.equal(folded.weight[mask], original[mask])
    assert not torch.equal(folded.weight[:, :, 1, 1], original[:, :, 1, 1])
    with torch.no_grad():
        torch.testing.assert_close(folded(x), trained, **FP32_TOL)


@pytest.mark.parametrize("gradient_filter", [None, 2], ids=["exact", "filtered"])
def test_decoupled_forward_and_backward_under_fp16_autocast(gradient_filter):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).to(CUDA)
    x = torch.randn(4, 8, 8, 8, device=CUDA)
    with torch.no_grad(), torch.autocast(CUDA.type, dtype=torch.float16):
        expected = conv(x)
    branch = CenterBranch(conv.requires_grad_(False), torch.arange(0, 8, 2), gradient_filter=gradient_filter)
    with torch.autocast(CUDA.type, dtype=torch.float16):
        out = conv(x)
    assert out.dtype == torch.float16 and _on_device(out)
    torch.testing.assert_close(out.float(), expected.float(), **FP16_TOL)

    # backward runs outside autocast (as Lightning and GradScaler do): the fp32 center gets an fp32 gradient
    out.float().square().mean().backward()
    grad16 = branch.param.grad
    assert grad16 is not None and grad16.dtype == torch.float32 and _on_device(grad16)
    assert torch.isfinite(grad16).all()
    branch.param.grad = None
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        conv(x).square().mean().backward()
    torch.testing.assert_close(grad16, branch.param.grad, atol=2e-3, rtol=5e-2)


# ---------------------------------------------------------------- 2. the engine on CUDA, two tasks
def _train_steps(learner, net, x, y, steps, batch=16, lr=1e-2):
    """Begin a task and run ``steps`` Adam steps with the learner's hooks; the task is left open."""
    learner.bind(net)
    learner.begin_task()
    opt = torch.optim.Adam(learner.trainable_parameters(), lr=lr)
    handle = learner.attach_optimizer(opt)
    for step in range(steps):
        i = (step * batch) % len(x)
        opt.zero_grad()
        net.train()
        nn.functional.cross_entropy(net(x[i:i + batch]), y[i:i + batch]).backward()
        learner.before_update()
        opt.step()
    handle.remove()
    return opt


LAYERS = ["conv1", "conv2", "conv3"]


def _two_task_learner(project: bool = True, layers=LAYERS, steps: int = 12, channel_ratio: float = 0.75):
    torch.manual_seed(0)
    net = Net().to(CUDA)
    x_old = low_rank_data(64, seed=1).to(CUDA)
    x_new, y_new = torch.randn(64, 3, 6, 6, device=CUDA), torch.randint(0, 4, (64,), device=CUDA)
    learner = CenterKernelLearner(layers=layers, first_task="center", score_batches=2, channel_ratio=channel_ratio,
                                  project=project)
    learner.bind(net)
    learner.record(lambda: net(x_old))  # task 1: protect what the model computes on x_old
    before = {n: learner.full_center(n) for n in learner.layers}
    opt = _train_steps(learner, net, x_new, y_new, steps)
    return net, learner, opt, before, (x_new, y_new)


def test_engine_on_cuda_respects_the_null_space_and_keeps_tensors_on_device():
    net, learner, opt, before, _ = _two_task_learner()
    assert learner.phase == "training" and learner.tasks_seen == 1
    checked = 0
    for name in learner.layers:
        tensor = learner.trained_tensor(name)
        assert _on_device(tensor) and attached_branch(net.get_submodule(name)) is not None
        # bases and gradient masks are built on the model's device; covariances are checkpoint state (C×C
        # per layer, accumulated in float64 on the device, stored in float32) and are kept on the CPU
        assert learner.free_bases[name].device == tensor.device
        assert all(mask.device == tensor.device for mask in learner._grad_masks.values())
        assert learner.covariances[name].device.type == "cpu" and learner.covariances[name].dtype == torch.float32
        delta = (learner.full_center(name) - before[name]).double().cpu()
        selected = learner.selected[name].cpu()
        assert torch.all(delta[:, ~selected] == 0), f"{name}: unselected channels moved"
        cov = learner.covariances[name][0].double()
        sub = cov[selected][:, selected]
        eig = torch.linalg.eigvalsh(sub).clamp_min(0)
        allowed = max(5.0 * eig[0].item(), NULL_SPACE_RTOL * eig[-1].item())
        ds = delta[:, selected]
        norm = ds.square().sum().item()
        if norm == 0:
            continue
        change = torch.trace(ds @ sub @ ds.T).item()  # mean squared change of old-task center outputs
        assert change <= allowed * norm * (1 + 1e-3) + 1e-9, f"{name}: {change} > {allowed} * {norm}"
        checked += 1
    assert checked > 0, "no center moved"
    for state in opt.state.values():
        assert all(_on_device(t) for k, t in state.items() if k != "step")


def test_engine_on_cuda_projection_protects_old_outputs():
    changes = {}
    for project in (True, False):
        _, learner, _, before, _ = _two_task_learner(project=project, layers=["conv1"], steps=10, channel_ratio=1.0)
        delta = (learner.full_center("conv1") - before["conv1"]).double().cpu()
        cov = learner.covariances["conv1"][0].double()
        changes[project] = torch.trace(delta @ cov @ delta.T).item()
    assert changes[False] > 1e3 * changes[True], changes


def test_engine_checkpoint_made_on_cuda_resumes_on_cpu():
    net, learner, _, _, (x_new, y_new) = _two_task_learner()
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    for group in ("covariances", "score_sums", "selected"):
        assert all(t.device.type == "cpu" for t in state[group].values()), group

    cpu_net = copy.deepcopy(net).cpu()  # the model's own checkpoint, restored on a CPU machine
    other = CenterKernelLearner(layers=LAYERS, first_task="center", score_batches=2, channel_ratio=0.75)
    other.load_state_dict(state)
    other.bind(cpu_net)
    other.begin_task()  # continues the task: rebuilds the free_bases on the CPU
    assert other.phase == "training" and other.tasks_seen == 1
    for name in LAYERS:
        assert torch.equal(other.selected[name], learner.selected[name].cpu())
        assert torch.equal(other.covariances[name], learner.covariances[name])
        assert other.free_bases[name].device.type == "cpu"
        torch.testing.assert_close(other.free_bases[name], learner.free_bases[name].cpu())

    # the resumed CPU learner trains (projected) and finishes the task
    before = {n: other.full_center(n) for n in LAYERS}
    opt = torch.optim.Adam(other.trainable_parameters(), lr=1e-2)
    handle = other.attach_optimizer(opt)
    x_cpu, y_cpu = x_new.cpu(), y_new.cpu()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(cpu_net(x_cpu[:16]), y_cpu[:16]).backward()
        other.before_update()
        opt.step()
    handle.remove()
    assert any(not torch.equal(other.full_center(n), before[n]) for n in LAYERS)
    other.end_task(lambda: cpu_net(x_cpu))
    assert other.tasks_seen == 2 and all(attached_branch(m) is None for m in cpu_net.modules())

    # and the CUDA learner finishes its own task on the device
    learner.end_task(lambda: net(x_new))
    assert learner.tasks_seen == 2 and all(_on_device(p) for p in net.parameters())
    assert all(attached_branch(m) is None for m in net.modules())
    for name in LAYERS:  # both added task 2's covariance (different values: the CPU run trained 3 more steps)
        channels = net.get_submodule(name).in_channels
        assert other.covariances[name].shape == learner.covariances[name].shape == (1, channels, channels)
        assert not torch.equal(other.covariances[name], state["covariances"][name])


# ---------------------------------------------------------------- 3. the Lightning callback, GPU + AMP
def _make_model(seed: int = 0) -> TaskClassifier:
    torch.manual_seed(seed)
    cnn = SmallCNN(width=16)
    return TaskClassifier(cnn.features, cnn.feature_dim, n_tasks=2, classes_per_task=2, lr=0.3, optimizer="sgd")


def _task_loader(task: int, n: int = 128, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed + 100 * task)
    x = torch.randn(n, 1, 8, 8, generator=g)
    label = (x[:, :, :4].mean((1, 2, 3)) > x[:, :, 4:].mean((1, 2, 3))).long()  # learnable: top vs bottom half
    y = 2 * task + label
    t = torch.full((n,), task, dtype=torch.long)
    return DataLoader(TensorDataset(x, y, t), batch_size=32, shuffle=False)


def _trainer(epochs: int, callbacks, precision: str, **kwargs) -> L.Trainer:
    # deterministic=False: adaptive_avg_pool2d's CUDA backward has no deterministic implementation
    accelerator = "gpu" if CUDA.type == "cuda" else "cpu"
    return L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_epochs=epochs, callbacks=callbacks,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, deterministic=False, **kwargs)


class _Watch(L.Callback):
    """Record every training loss and where the learner's tensors live while the task trains."""

    def __init__(self, cb: CenterKernelCallback) -> None:
        self.cb, self.losses, self.devices = cb, [], set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        learner = self.cb.learner
        for name in learner.layers:
            self.devices.add(learner.trained_tensor(name).device.type)
            if name in learner.free_bases:
                self.devices.add(learner.free_bases[name].device.type)


class _SaveAt(L.Callback):
    def __init__(self, epoch: int, path: str) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_callback_on_gpu_with_mixed_precision(precision, tmp_path):
    if precision == "bf16-mixed" and CUDA.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model = _make_model()
    cb = CenterKernelCallback(score_batches=2)
    model.current_task = 0
    _trainer(1, [cb], precision).fit(model, _task_loader(0))  # base task: everything trains
    assert cb.learner.tasks_seen == 1
    start = _plain_state(model)
    start_cb = copy.deepcopy(cb)

    # task 2 (a new Trainer: a second fit on the same Trainer trains nothing), checkpoint after its 1st epoch
    watch = _Watch(cb)
    ckpt = str(tmp_path / "mid_task.ckpt")
    model.current_task = 1
    _trainer(2, [cb, watch, _SaveAt(0, ckpt)], precision).fit(model, _task_loader(1))
    assert cb.learner.tasks_seen == 2
    assert watch.losses and np.all(np.isfinite(watch.losses)), watch.losses
    assert watch.devices == {CUDA.type}, watch.devices
    assert all(attached_branch(m) is None for m in model.modules())

    after = _plain_state(model)
    trained = sorted(cb.learner.covariances)
    assert trained == ["backbone.1.0", "backbone.2.0"]  # 'auto': the two deepest 3×3 convs
    moved = []
    for name in trained:
        weight = f"{name}.weight"
        mask = torch.ones_like(after[weight], dtype=torch.bool)
        mask[:, :, 1, 1] = False
        assert torch.equal(after[weight][mask], start[weight][mask]), f"{weight}: a frozen k×k tap moved"
        if not torch.equal(after[weight][:, :, 1, 1], start[weight][:, :, 1, 1]):
            moved.append(name)
    assert moved, "no center moved in task 2"
    assert not torch.equal(after["heads.1.weight"], start["heads.1.weight"])
    for key in start:
        if key.startswith("heads.") or key in {f"{n}.weight" for n in trained}:
            continue
        assert torch.equal(after[key], start[key]), f"{key} changed in task 2"  # frozen BN stats included

    # the callback's state round-trips through the Lightning checkpoint, on a fresh model and callback
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    cb_state = next(v for k, v in saved["callbacks"].items() if "CenterKernelCallback" in k)
    assert cb_state["phase"] == "training" and cb_state["tasks_seen"] == 1
    for name in trained:
        assert torch.equal(cb_state["covariances"][name], start_cb.learner.covariances[name])
        assert torch.equal(cb_state["selected"][name], cb.learner.selected[name].cpu())

    resumed_model, resumed_cb = _make_model(seed=123), CenterKernelCallback(score_batches=2)
    resumed_model.current_task = 1
    _trainer(2, [resumed_cb], precision).fit(resumed_model, _task_loader(1), ckpt_path=ckpt)
    assert resumed_cb.learner.tasks_seen == 2
    for name in trained:
        assert torch.equal(resumed_cb.learner.selected[name].cpu(), cb.learner.selected[name].cpu())
        torch.testing.assert_close(resumed_cb.learner.covariances[name], cb.learner.covariances[name],
                                   rtol=1e-2, atol=1e-5)
    resumed = _plain_state(resumed_model)
    assert resumed.keys() == after.keys()
    for key in after:
        if key.startswith("heads.") or key in {f"{n}.weight" for n in trained}:
            # trained after the checkpoint: GPU kernels and AMP reproduce the trajectory up to rounding only
            torch.testing.assert_close(resumed[key], after[key], rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(resumed[key], after[key]), f"{key} differs after resuming"


# ---------------------------------------------------------------- 4. cost accounting is device-independent
def _costs(base: nn.Module, batch, device: torch.device, learner_state=None):
    net = copy.deepcopy(base).to(device)
    inputs, targets = (t.to(device) for t in batch)
    learner = None
    if learner_state is not None:
        # magnitude selection: the channels (and so the projector) depend only on the weights, not on
        # device-specific rounding of gradients
        learner = CenterKernelLearner(layers="auto", first_task="center", selection="magnitude")
        learner.load_state_dict(learner_state)
        learner.bind(net)
        learner.begin_task()
        assert learner.phase == "training"
    params = learner.trainable_parameters() if learner else list(net.parameters())
    opt = torch.optim.Adam(params)
    handle = learner.attach_optimizer(opt) if learner else None
    net.train()
    cost = measure_step(net, opt, nn.functional.cross_entropy, (inputs, targets), learner, time_steps=False)
    if handle:
        handle.remove()
    return cost


@pytest.mark.parametrize("method", ["full", "csko"])
def test_measure_step_on_cuda_matches_cpu(method):
    torch.manual_seed(0)
    base = tiny_net()
    batch = (torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,)))
    state = None
    if method == "csko":
        recorder = CenterKernelLearner(layers="auto", first_task="center", selection="magnitude")
        recorder.bind(base)
        recorder.record(lambda: base(torch.randn(16, 3, 8, 8)))
        recorder.unbind()
        state = recorder.state_dict()
    cpu = _costs(base, batch, torch.device("cpu"), state)
    gpu = _costs(base, batch, CUDA, state)
    assert gpu.flops > 0 and gpu.forward_flops > 0 and gpu.saved_activation_bytes > 0
    assert gpu.gradient_bytes > 0 and gpu.optimizer_state_bytes > 0
    # FLOPs are counted at the aten level and bytes from tensor shapes and dtypes: neither depends on the device
    assert gpu.as_dict() == cpu.as_dict(), {k: (v, cpu.as_dict()[k]) for k, v in gpu.as_dict().items()}
    if method == "csko":
        assert gpu.projection_state_bytes > 0
