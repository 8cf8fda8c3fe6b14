"""CenterKernelCallback with real Trainers on Split Digits: sequence, resume, AMP, errors, logging."""

import copy
import glob
import os

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_cskl import CenterKernelCallback
from lightning_cskl.core import attached_branch
from lightning_cskl.lightning.callback import check_strategy
from tests.lightning_helpers import Crash, loader, make_model, make_trainer


def fit_task(model, cb, task, t, epochs=3, **kwargs):
    model.current_task = t
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = make_trainer(epochs, [cb] + kwargs.pop("extra_callbacks", []), **kwargs)
    trainer.fit(model, loader(task), ckpt_path=ckpt_path)
    return trainer


def test_task_sequence_learns_without_forgetting_and_folds_back(digit_tasks, tmp_path):
    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    cb = CenterKernelCallback(score_batches=3)
    acc0 = []
    for t in range(3):
        logger = CSVLogger(tmp_path, name=f"task{t}")
        fit_task(model, cb, digit_tasks[t], t, epochs=10, logger=logger)
        assert all(attached_branch(m) is None for m in model.modules())
        assert sum(p.numel() for p in model.parameters()) == n_params
        assert cb.learner.tasks_seen == t + 1
        acc0.append(model.evaluate(digit_tasks[0].test, seen_tasks=t + 1))
        new_acc = model.evaluate(digit_tasks[t].test, seen_tasks=t + 1)
        assert new_acc > 0.7, f"task {t} not learned: {new_acc}"
    assert acc0[0] > 0.95
    assert acc0[-1] >= acc0[0] - 0.02, acc0  # the base task is protected
    metrics = open(glob.glob(str(tmp_path / "task2" / "*" / "metrics.csv"))[0]).read()
    assert "cskl/backbone.2.0/selected_channels" in metrics and "cskl/backbone.2.0/free_dim" in metrics


def _plain_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CARRIED = dict(statistics_head="lda", head="heads.0", carry="affine", project=False, distill_weight=1.0)


@pytest.mark.parametrize("crash_epoch,score_batches,options", [(2, 4, {}), (1, 12, {}), (2, 4, CARRIED)],
                         ids=["mid-training", "mid-scoring", "mid-training-carried"])
def test_resume_after_crash_matches_uninterrupted_run(digit_tasks, tmp_path, crash_epoch, score_batches, options):
    L.seed_everything(0)
    model = make_model()
    cb = CenterKernelCallback(score_batches=score_batches, **options)
    for t in range(2):
        fit_task(model, cb, digit_tasks[t], t, epochs=2)
    start_model, start_cb = copy.deepcopy(model), copy.deepcopy(cb)

    # uninterrupted third task
    ref_model, ref_cb = copy.deepcopy(start_model), copy.deepcopy(start_cb)
    fit_task(ref_model, ref_cb, digit_tasks[2], 2, epochs=4)

    # crashed third task, checkpoints every epoch
    crash_model, crash_cb = copy.deepcopy(start_model), copy.deepcopy(start_cb)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_task(crash_model, crash_cb, digit_tasks[2], 2, epochs=4, extra_callbacks=[ckpt, Crash(crash_epoch)],
                 enable_checkpointing=True)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == crash_epoch - 1

    # a new process: fresh model object and a fresh callback, everything else from the checkpoint
    resumed_model = make_model(seed=123)
    resumed_cb = CenterKernelCallback(score_batches=score_batches, **options)
    fit_task(resumed_model, resumed_cb, digit_tasks[2], 2, epochs=4, ckpt_path=str(tmp_path / "last.ckpt"),
             extra_callbacks=[ModelCheckpoint(dirpath=tmp_path / "after")], enable_checkpointing=True)

    expected, got = _plain_state(ref_model), _plain_state(resumed_model)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert not torch.equal(expected["heads.2.weight"], _plain_state(start_model)["heads.2.weight"])
    for name, cov in ref_cb.learner.covariances.items():
        assert torch.equal(resumed_cb.learner.covariances[name], cov)
    assert resumed_cb.learner.tasks_seen == ref_cb.learner.tasks_seen == 3
    if options:  # the carried statistics come out the same: the backbone before the task was in the checkpoint
        assert ref_cb._drift.last is not None and resumed_cb._drift.last is not None
        assert torch.equal(resumed_cb.statistics.means, ref_cb.statistics.means)
        assert torch.equal(resumed_cb.statistics.scatter, ref_cb.statistics.scatter)


class _RecordCenters(L.Callback):
    """Keep the trained center tensors and learner state before and after each batch."""

    def __init__(self, cb):
        self.cb, self.before, self.after = cb, {}, {}

    def _snapshot(self, trainer):
        learner = self.cb.learner
        return ({n: learner.full_center(n) for n in learner.layers},
                learner.phase, learner.scored_batches,
                {n: s.clone() for n, s in learner.score_sums.items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step, batch_idx] = self._snapshot(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[batch_idx] = self._snapshot(trainer)


def test_amp_skipped_steps_leave_weights_and_state_untouched(digit_tasks):
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = make_model()
    cb = CenterKernelCallback(score_batches=3)
    fit_task(model, cb, digit_tasks[0], 0, epochs=1)
    poisoned = {1, 5}  # one scoring batch and one training batch get an infinite loss
    original_step = model.training_step

    def training_step(batch, batch_idx):
        loss = original_step(batch, batch_idx)
        return loss * float("inf") if batch_idx in poisoned else loss

    model.training_step = training_step
    recorder = _RecordCenters(cb)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    fit_task(model, cb, digit_tasks[1], 1, epochs=1, extra_callbacks=[recorder],
             plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    for batch_idx in poisoned:
        before = next(v for (s, b), v in recorder.before.items() if b == batch_idx)
        after = recorder.after[batch_idx]
        for name in before[0]:
            assert torch.equal(before[0][name], after[0][name]), f"batch {batch_idx}: {name} moved"
        assert before[1:3] == after[1:3]
        for name in before[3]:
            assert torch.equal(before[3][name], after[3][name])
    # the other steps did train: scoring finished (3 clean scoring steps) and centers moved
    assert cb.learner.tasks_seen == 2
    moved = [b for b in recorder.after if b not in poisoned and b > 4 and not all(
        torch.equal(recorder.after[b][0][n], recorder.after[b - 1][0][n]) for n in recorder.after[b][0])]
    assert moved


def test_bf16_mixed_precision_trains_centers_only(digit_tasks):
    model = make_model()
    cb = CenterKernelCallback(score_batches=2)
    fit_task(model, cb, digit_tasks[0], 0, epochs=1)
    before = _plain_state(model)
    fit_task(model, cb, digit_tasks[1], 1, epochs=2, precision="bf16-mixed")
    after = _plain_state(model)
    weight = "backbone.2.0.weight"
    mask = torch.ones_like(after[weight], dtype=torch.bool)
    mask[:, :, 1, 1] = False
    assert torch.equal(after[weight][mask], before[weight][mask])
    assert not torch.equal(after[weight][:, :, 1, 1], before[weight][:, :, 1, 1])
    for key in before:
        if "running" in key or key.startswith("backbone.0") or "backbone.1.1" in key or "backbone.2.1" in key:
            assert torch.equal(after[key], before[key]), key


def test_sharded_strategies_are_refused():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    with pytest.raises(ValueError, match="does not support strategy FSDPStrategy.*unsharded"):
        check_strategy(FSDPStrategy())
    check_strategy(DDPStrategy())


def test_the_centers_join_the_optimizer_in_their_weights_group(digit_tasks):
    model = make_model()
    cb = CenterKernelCallback(score_batches=2)
    fit_task(model, cb, digit_tasks[0], 0, epochs=1)
    names = [n for n, _ in model.named_parameters()]
    convs = [p for n, p in model.named_parameters() if n.startswith("backbone") and p.dim() == 4]
    rest = [p for n, p in model.named_parameters() if not (n.startswith("backbone") and p.dim() == 4)]
    # the usual decay / no-decay split, which Avalanche's make_optimizer could not place a new parameter into
    model.configure_optimizers = lambda: torch.optim.SGD(
        [{"params": convs, "weight_decay": 1e-4, "lr": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=0.1)

    class Check(L.Callback):
        seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cb.learner.phase == "training":
                groups = trainer.optimizers[0].param_groups
                self.seen.append([next(i for i, g in enumerate(groups) if any(t is q for q in g["params"]))
                                  for t in map(cb.learner.trained_tensor, cb.learner.layers)])

    fit_task(model, cb, digit_tasks[1], 1, epochs=1, extra_callbacks=[Check()])
    # every trained center sat in the group of its convolution's weight, and the model kept its parameters
    assert Check.seen and all(group == 0 for groups in Check.seen for group in groups)
    assert [n for n, _ in model.named_parameters()] == names


def test_wandb_offline_run_holds_selection_stats(digit_tasks, tmp_path):
    model = make_model()
    cb = CenterKernelCallback(score_batches=2)
    run_dirs = []
    for t in range(2):
        logger = WandbLogger(project="cskl-test", save_dir=str(tmp_path), offline=True)
        fit_task(model, cb, digit_tasks[t], t, epochs=1, logger=logger)
        run_dirs.append(os.path.dirname(logger.experiment.dir))
        logger.experiment.finish()
    import wandb

    wandb.teardown()  # the service flushes its transaction logs when it shuts down
    assert all(os.path.basename(d).startswith("offline-run-") for d in run_dirs)
    # the offline transaction log (what `wandb sync` uploads) holds the logged keys
    logs = [open(glob.glob(os.path.join(d, "run-*.wandb"))[0], "rb").read() for d in run_dirs]
    assert b"cskl/backbone.2.0/selected_channels" in logs[1] and b"cskl/backbone.2.0/free_dim" in logs[1]
    assert b"selected_channels" not in logs[0]  # the base task selects nothing


def test_pretrained_model_is_protected_by_recording_without_training(digit_tasks):
    model = make_model()
    fit_task(model, CenterKernelCallback(layers=["backbone.2.0"]), digit_tasks[0], 0, epochs=8)  # "pretraining"
    before = _plain_state(model)
    acc_before = model.evaluate(digit_tasks[0].test, seen_tasks=1)
    cb = CenterKernelCallback(first_task="center", score_batches=2,
                              forward_fn=lambda module, batch: module(batch[0], task=0))
    cb.record(model, loader(digit_tasks[0]))
    assert cb.learner.tasks_seen == 1 and cb.learner.covariances["backbone.2.0"].shape == (1, 32, 32)
    assert all(torch.equal(v, before[k]) for k, v in _plain_state(model).items())  # recording trains nothing
    fit_task(model, cb, digit_tasks[1], 1, epochs=8)
    after = _plain_state(model)
    weight = "backbone.2.0.weight"
    off_center = torch.ones_like(after[weight], dtype=torch.bool)
    off_center[:, :, 1, 1] = False
    assert torch.equal(after[weight][off_center], before[weight][off_center])  # an incremental task, not a base
    assert not torch.equal(after[weight], before[weight])
    assert model.evaluate(digit_tasks[0].test, seen_tasks=2) >= acc_before - 0.02
    assert model.evaluate(digit_tasks[1].test, seen_tasks=2) > 0.6


def test_a_fit_too_short_for_scoring_warns(digit_tasks):
    model = make_model()
    cb = CenterKernelCallback(score_batches=50)
    fit_task(model, cb, digit_tasks[0], 0, epochs=1)
    with pytest.warns(UserWarning, match=r"this fit has 8 optimizer steps but DCES scores for 50 more"):
        fit_task(model, cb, digit_tasks[1], 1, epochs=1)


def test_gradient_filter_option_reaches_the_branches(digit_tasks):
    model = make_model()
    cb = CenterKernelCallback(score_batches=2, gradient_filter=2)
    fit_task(model, cb, digit_tasks[0], 0, epochs=1)

    class Check(L.Callback):
        seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen += [attached_branch(m).gradient_filter for m in pl_module.modules() if attached_branch(m)]

    check = Check()
    fit_task(model, cb, digit_tasks[1], 1, epochs=1, extra_callbacks=[check])
    assert check.seen and set(check.seen) == {2}
    assert all(attached_branch(m) is None for m in model.modules())


def test_statistics_head_answers_in_eval_mode_and_keeps_old_classes(digit_tasks):
    accuracy = {}
    for rule in (None, "lda"):
        model = make_model(scenario="class")
        cb = CenterKernelCallback(score_batches=3, statistics_head=rule, head="heads.0")
        for t in range(3):
            fit_task(model, cb, digit_tasks[t], t, epochs=3)
        accuracy[rule] = [model.evaluate(digit_tasks[t].test, seen_tasks=3) for t in range(3)]
    assert cb.statistics.classes.tolist() == [0, 1, 2, 3, 4, 5]
    assert min(accuracy["lda"]) > 0.8, accuracy  # every task's classes are still recognised
    assert accuracy[None][0] < 0.5, accuracy  # the trained head alone forgot the first classes
    state = cb.state_dict()
    copy_cb = CenterKernelCallback(statistics_head="lda")
    copy_cb.load_state_dict(state)
    assert torch.equal(copy_cb.statistics.means, cb.statistics.means)
    with pytest.raises(ValueError, match="statistics_head='knn' is not allowed"):
        CenterKernelCallback(statistics_head="knn")


def test_resume_from_an_on_exception_checkpoint_continues_the_task(digit_tasks, tmp_path):
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    model = make_model()
    cb = CenterKernelCallback(score_batches=2)
    fit_task(model, cb, digit_tasks[0], 0, epochs=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_task(model, cb, digit_tasks[1], 1, epochs=3, enable_checkpointing=True,
                 extra_callbacks=[Crash(2), OnExceptionCheckpoint(tmp_path, filename="crash")])
    # the exception left the model plain: no branch, no hook, every parameter trainable again
    assert all(attached_branch(m) is None and not m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    saved = torch.load(tmp_path / "crash.ckpt", weights_only=True, map_location="cpu")
    state = next(v for k, v in saved["callbacks"].items() if "CenterKernelCallback" in k)
    assert state["phase"] == "training" and state["tasks_seen"] == 1  # written before anything was reset
    # the mid-task checkpoint holds the plain architecture's keys and loads into it, strictly, computing the same
    plain = make_model(seed=5)
    plain.load_state_dict(saved["state_dict"])
    assert list(saved["state_dict"]) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    # a fresh callback and the same model resume the task from that file and finish it
    resumed = CenterKernelCallback(score_batches=2)
    fit_task(model, resumed, digit_tasks[1], 1, epochs=3, ckpt_path=str(tmp_path / "crash.ckpt"),
             enable_checkpointing=True)
    assert resumed.learner.tasks_seen == 2 and resumed.learner.phase == "idle"
    assert all(attached_branch(m) is None for m in model.modules())


def test_the_end_of_task_pass_honours_record_batches_and_the_trainers_limits(digit_tasks):
    seen = []

    def forward(module, batch):
        seen.append(len(batch[0]))
        return module(batch[0])

    model = make_model()
    cb = CenterKernelCallback(score_batches=1, forward_fn=forward, record_batches=2)
    fit_task(model, cb, digit_tasks[0], 0, epochs=1)
    assert len(seen) == 2
    seen.clear()
    cb.record_batches = None
    fit_task(model, cb, digit_tasks[1], 1, epochs=1, limit_train_batches=3)
    assert len(seen) == 3
    with pytest.raises(ValueError, match="record_batches=0 is not allowed"):
        CenterKernelCallback(record_batches=0)


def test_a_train_also_typo_fails_when_the_first_fit_starts(digit_tasks):
    cb = CenterKernelCallback(train_also=["heads.9"])
    with pytest.raises(ValueError, match=r"train_also lists \['heads.9'\], which are not modules of TaskClassifier"):
        fit_task(make_model(), cb, digit_tasks[0], 0, epochs=1)


@pytest.mark.parametrize("form", ["flat", "nested"])
def test_lightning_cli_yaml_configures_the_callback(tmp_path, form):
    import yaml
    from lightning.pytorch.cli import LightningCLI

    from lightning_cskl.lightning.module import TaskClassifier

    options = {"channel_ratio": 0.5, "score_batches": 2}
    init_args = {**options, "statistics_head": "lda"} if form == "flat" else {"config": options,
                                                                               "statistics_head": "lda"}
    config = {"trainer": {"max_epochs": 1, "logger": False, "enable_checkpointing": False,
                          "callbacks": [{"class_path": "lightning_cskl.CenterKernelCallback", "init_args": init_args}]},
              "model": {"backbone": {"class_path": "torch.nn.Identity"}, "feature_dim": 4, "n_tasks": 2,
                        "classes_per_task": 2}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(TaskClassifier, run=False, args=["--config", str(path)])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, CenterKernelCallback))
    assert (cb.config.channel_ratio, cb.config.score_batches, cb.statistics.rule) == (0.5, 2, "lda")


def test_options_beside_a_config_override_its_fields():
    from lightning_cskl.core import CenterKernelConfig

    cb = CenterKernelCallback(CenterKernelConfig(channel_ratio=0.5, score_batches=3), score_batches=5)
    assert (cb.config.channel_ratio, cb.config.score_batches) == (0.5, 5)
    with pytest.raises(TypeError, match="chanel_ratio"):
        CenterKernelCallback(CenterKernelConfig(), chanel_ratio=0.5)


@pytest.mark.parametrize("task", [0, 1], ids=["base", "incremental"])
def test_a_task_that_fails_at_its_end_leaves_the_model_plain(digit_tasks, task):
    model = make_model()
    cb = CenterKernelCallback(score_batches=1)
    if task:
        fit_task(model, cb, digit_tasks[0], 0, epochs=1)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def broken_forward(module, batch):
        raise KeyError("the end-of-task pass cannot read this batch")

    cb.forward_fn = broken_forward
    with pytest.raises(KeyError, match="cannot read this batch"):
        fit_task(model, cb, digit_tasks[task], task, epochs=1)
    assert all(attached_branch(m) is None and not m._forward_hooks for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert cb.learner.tasks_seen == task


def test_a_fit_on_an_empty_loader_leaves_the_model_plain(digit_tasks):
    from torch.utils.data import DataLoader, TensorDataset

    model = make_model()
    cb = CenterKernelCallback(score_batches=1)
    fit_task(model, cb, digit_tasks[0], 0, epochs=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    model.current_task = 1
    with pytest.warns(UserWarning, match="the fit ended before training ended"):
        make_trainer(1, [cb]).fit(model, empty)
    assert all(attached_branch(m) is None and not m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()) and cb.learner.tasks_seen == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    fit_task(model, cb, digit_tasks[1], 1, epochs=1)  # the next fit trains the task
    assert cb.learner.tasks_seen == 2


def test_prototype_replay_from_the_lightning_door_keeps_old_classes(digit_tasks):
    """The Avalanche door's classifier-side remedy, from the callback: one prototype per old class, replayed
    through the head in every later task (the class-incremental head forgets old classes without it)."""
    accuracies = {}
    for replay in (False, True):
        model = make_model(scenario="class", optimizer="adam", lr=1e-2)
        cb = CenterKernelCallback(score_batches=2, prototype_replay=replay, head="heads.0", statistics_head=None,
                                  target_fn=lambda batch: batch[1])
        for t in range(3):
            fit_task(model, cb, digit_tasks[t], t, epochs=3)
        assert "training_step" not in vars(model)  # the replay term is removed when a task ends
        accuracies[replay] = [model.evaluate(digit_tasks[t].test, seen_tasks=3) for t in range(3)]
        if replay:
            assert cb.memory.classes.tolist() == list(range(6))
            assert "prototypes" in cb.state_dict()
    # measured: [0.00, 0.00, 0.45] without, [0.97, 0.58, 0.14] with (mean 0.15 -> 0.56)
    assert accuracies[True][0] > 0.9 and sum(accuracies[True]) > sum(accuracies[False]) + 0.6, accuracies


def test_a_true_precision_cast_after_setup_rebuilds_the_branches(digit_tasks):
    """Lightning casts the model in ``bf16-true`` after the callback's setup attached the branches: they follow."""
    model = make_model()
    cb = CenterKernelCallback(score_batches=2, first_task="center")
    fit_task(model, cb, digit_tasks[0], 0, epochs=1, precision="bf16-true")
    assert cb.learner.tasks_seen == 1 and next(model.parameters()).dtype == torch.bfloat16
    assert all(attached_branch(m) is None for m in model.modules())


def _features(model, head, dataset):
    captured = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    model.eval()
    with torch.no_grad():
        for x, *_ in torch.utils.data.DataLoader(dataset, batch_size=256):
            model(x)
    handle.remove()
    return torch.cat(captured).double()


def test_carried_statistics_follow_an_update_that_moves_the_features(digit_tasks):
    """Without projection the update moves the features; the carried class means of the first task stay near
    where its data now lies (re-measured), the stale ones do not; distillation adds a term to the loss."""
    means = {}
    for carry in (None, "affine"):
        model = make_model(scenario="class", optimizer="adam", lr=1e-2)
        cb = CenterKernelCallback(score_batches=2, statistics_head="lda", head="heads.0", project=False,
                                  carry=carry, distill_weight=0.1 if carry else 0.0)
        for t in range(2):
            fit_task(model, cb, digit_tasks[t], t, epochs=3)
        head = cb.head_module(model)
        now = _features(model, head, digit_tasks[0].train)
        labels = torch.tensor([int(y) for _, y, *_ in digit_tasks[0].train])
        remeasured = torch.stack([now[labels == c].mean(0) for c in labels.unique()])
        means[carry] = (cb.statistics.means[:2], remeasured)
    assert cb._drift.last is not None and cb._drift.last.samples == len(digit_tasks[1].train)
    assert cb.distill_loss is not None and float(cb.distill_loss) > 0
    error = {k: float((m - r).norm() / r.norm()) for k, (m, r) in means.items()}
    assert error["affine"] < 0.5 * error[None], error


def test_a_diverging_task_is_undone_with_a_truthful_warning_and_the_next_task_runs(digit_tasks, caplog):
    model = make_model(scenario="class", optimizer="sgd", lr=0.3)
    cb = CenterKernelCallback(score_batches=2, layers="all")
    fit_task(model, cb, digit_tasks[0], 0, epochs=1)
    before = _plain_state(model)
    model.lr = 1e6  # the second task's training diverges
    with caplog.at_level("WARNING"):
        fit_task(model, cb, digit_tasks[1], 1, epochs=2)
    assert "this task's training diverged" in caplog.text and "lower learning rate" in caplog.text
    assert "saw no input" not in caplog.text
    assert cb.learner.diverged_tasks == 1 and cb.learner.tasks_seen == 2
    after = _plain_state(model)
    for key in before:  # the model before the task, kept (the head grew nothing: one class-IL head)
        assert torch.equal(before[key], after[key]), key
    assert all(torch.isfinite(c).all() for c in cb.learner.covariances.values())
    model.lr = 0.05  # the next task trains normally
    fit_task(model, cb, digit_tasks[2], 2, epochs=2)
    assert cb.learner.tasks_seen == 3 and cb.learner.diverged_tasks == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(_plain_state(model)["heads.0.weight"], after["heads.0.weight"])
