"""The prefix cache in CenterKernelCallback, with real Trainers on Split Digits: a float32 cached run is the uncached
run bit for bit, and every case the cache cannot serve (random augmentation, no ``index_fn``, a task that raised)
runs uncached with the same results and a notice."""

import copy
import logging

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from torch.utils.data import DataLoader, Dataset

from lightning_cskl import CenterKernelCallback
from tests.lightning_helpers import EpochShuffle, make_model, make_trainer

CACHE_LOG = "lightning_cskl.core.prefix_cache"


class Indexed(Dataset):
    """A task's ``(x, y, t)`` items followed by their position in it; ``jitter`` adds fresh noise at every read (a
    random augmentation)."""

    def __init__(self, data, jitter: float = 0.0) -> None:
        self.data, self.jitter = data, jitter

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, *rest = self.data[i]
        if self.jitter:
            x = x + self.jitter * torch.randn_like(x)
        return (x, *rest, i)


def _index(batch):
    return batch[-1]


def _run(tasks, epochs=2, jitter=0.0, extra_callbacks=(), **options):
    """Train the tasks in sequence; return the model, the callback, and per task what the cache did."""
    torch.manual_seed(0)
    model = make_model(scenario="class")
    options.setdefault("prefix_cache_min_flops", 0)  # the SmallCNN's first block is too cheap for the default rule
    cb = CenterKernelCallback(score_batches=3, **options)
    reports = []
    for t, task in enumerate(tasks):
        model.current_task = t
        cb.prefix_cache.last_task = {}
        data = Indexed(task.train, jitter)
        trainer = make_trainer(epochs, [cb, *extra_callbacks])
        trainer.fit(model, DataLoader(data, batch_size=32, sampler=EpochShuffle(len(data))))
        reports.append(dict(cb.prefix_cache.last_task))
    return model, cb, reports


def _predictions(model, tasks):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(task.test.tensors[0]) for task in tasks])


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_float32_cache_gives_the_uncached_runs_weights_and_predictions(digit_tasks):
    tasks = digit_tasks[:3]
    plain, _, off = _run(tasks, prefix_cache="off", index_fn=_index)
    cached, cb, reports = _run(tasks, index_fn=_index)
    assert off == [{}, {}, {}]
    assert reports[0] == {}  # the base session trains everything: nothing is cached
    for report in reports[1:]:
        assert report["cut"] and report["reason"] == "" and report["bytes"] > 0
        # epoch 1 runs the prefix and stores it, epoch 2 and the task-end pass check once each and read the rest
        assert report["hits"] > report["misses"] > 0
    assert cb.prefix_cache.nbytes == 0  # freed at the task's end
    assert _same(cached, plain)
    assert torch.equal(_predictions(cached, tasks), _predictions(plain, tasks))


def test_random_augmentation_switches_the_cache_off_with_a_notice(digit_tasks, caplog):
    tasks = digit_tasks[:2]
    plain, _, _ = _run(tasks, jitter=0.05, prefix_cache="off")
    with caplog.at_level(logging.INFO):
        cached, _, reports = _run(tasks, jitter=0.05, index_fn=_index)
    assert reports[1]["hits"] == 0 and "changed between passes" in reports[1]["reason"]
    notices = [r.getMessage() for r in caplog.records if r.name == CACHE_LOG]
    assert len(notices) == 1 and "random augmentation" in notices[0]
    assert _same(cached, plain)


def test_without_index_fn_nothing_is_cached_and_the_callback_says_so(digit_tasks, caplog):
    tasks = digit_tasks[:2]
    plain, _, _ = _run(tasks, prefix_cache="off")
    with caplog.at_level(logging.INFO):
        quiet, _, _ = _run(tasks)  # the default "on" without index_fn: no cache, no notice
        asked, _, reports = _run(tasks, prefix_cache="on")
    assert reports == [{}, {}]
    notices = [r.getMessage() for r in caplog.records if "prefix_cache" in r.getMessage()]
    assert len(notices) == 1 and "prefix_cache='on' is not used" in notices[0] and "index_fn" in notices[0]
    assert _same(quiet, plain) and _same(asked, plain)


def test_a_bad_index_fn_is_refused_with_what_it_returned(digit_tasks):
    refused = r"index_fn returned a tensor of shape \(32, 1, 8, 8\) and dtype torch.float32: it must return a 1-D"
    with pytest.raises(ValueError, match=refused):
        _run(digit_tasks[:2], epochs=1, index_fn=lambda batch: batch[0])


def test_a_task_that_raised_leaves_no_cache_hook_and_the_next_fit_uses_the_cache(digit_tasks):
    tasks = digit_tasks[:2]
    model, cb, _ = _run(tasks[:1], index_fn=_index)

    class Boom(RuntimeError):
        pass

    def explode(module, args):
        if cb.prefix_cache.hits:  # while a batch reads the store
            raise Boom

    head = cb.head_module(model)
    handle = head.register_forward_pre_hook(explode)
    model.current_task = 1
    data = Indexed(tasks[1].train)
    with pytest.raises(Boom):
        make_trainer(2, [cb]).fit(model, DataLoader(data, batch_size=32, sampler=EpochShuffle(len(data))))
    handle.remove()
    assert cb.prefix_cache.nbytes == 0 and cb.prefix_cache.last_task["hits"] > 0
    assert all(not m._forward_pre_hooks for m in model.modules())
    # no module before the cut is left answering the cache's placeholder
    assert not [m for m in model.modules() if getattr(getattr(vars(m).get("forward"), "func", None), "__name__", "")
                == "placeholder"]
    cb.prefix_cache.last_task = {}
    make_trainer(2, [cb]).fit(model, DataLoader(data, batch_size=32, sampler=EpochShuffle(len(data))))
    assert cb.prefix_cache.last_task["hits"] > 0 and cb.prefix_cache.last_task["reason"] == ""


class CrashAt(L.Callback):
    """Raise before a given batch of a given epoch (``batch=0``: at an epoch boundary, after the last epoch's
    checkpoint; later: in the middle of an epoch, with the cache part filled)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("simulated crash")


def _fit(model, cb, task, t, epochs, ckpt_path=None, callbacks=(), **kwargs):
    model.current_task = t
    data = Indexed(task.train)
    trainer = make_trainer(epochs, [cb, *callbacks], **kwargs)
    trainer.fit(model, DataLoader(data, batch_size=32, sampler=EpochShuffle(len(data))), ckpt_path=ckpt_path)
    return dict(cb.prefix_cache.last_task)


@pytest.mark.parametrize("crash_batch", [0, 5], ids=["at-an-epoch-boundary", "mid-epoch"])
def test_a_resumed_task_rebuilds_the_cache_and_ends_as_an_uncached_resume(digit_tasks, tmp_path, crash_batch):
    tasks = digit_tasks[:3]
    start, start_cb, _ = _run(tasks[:2], index_fn=_index)
    # the third task crashes in its third epoch, with the cache filled (epochs 1-2) and read
    crash_model, crash_cb = copy.deepcopy(start), copy.deepcopy(start_cb)
    saver = OnExceptionCheckpoint(tmp_path, filename="crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(crash_model, crash_cb, tasks[2], 2, 4, callbacks=[saver, CrashAt(2, crash_batch)],
             enable_checkpointing=True, default_root_dir=tmp_path)
    assert crash_cb.prefix_cache.last_task["hits"] > 0 and crash_cb.prefix_cache.nbytes == 0
    saved = torch.load(tmp_path / "crash.ckpt", weights_only=True, map_location="cpu")
    state = next(v for k, v in saved["callbacks"].items() if "CenterKernelCallback" in k)
    assert not any("prefix" in key or "cache" in key for key in state)  # nothing of the cache is checkpointed

    # a new process: a fresh model and callback resume from the file, cached and uncached
    resumed = {}
    for setting in ("on", "off"):
        model = make_model(seed=123, scenario="class")
        cb = CenterKernelCallback(score_batches=3, prefix_cache=setting, prefix_cache_min_flops=0, index_fn=_index)
        report = _fit(model, cb, tasks[2], 2, 4, ckpt_path=str(tmp_path / "crash.ckpt"), default_root_dir=tmp_path)
        resumed[setting] = (model, cb, report)
    model, cb, report = resumed["on"]
    # the resumed epoch stores the prefix again, the next one and the task-end pass read it
    assert report["cut"] and report["reason"] == "" and report["hits"] > 0 and report["misses"] > 0
    assert cb.learner.tasks_seen == 3
    assert _same(model, resumed["off"][0])
    assert torch.equal(_predictions(model, tasks), _predictions(resumed["off"][0], tasks))
