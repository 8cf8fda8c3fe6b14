"""The prefix cache (core/prefix_cache.py) on tiny real models and runs: the float32 cache gives the uncached
run's predictions, the cut lands where the model allows it, and every reason to stay off (augmentation, a prefix
that trains, the budget, a skip connection around the cut) is detected, said in one line, and runs uncached."""

from __future__ import annotations

import logging

import pytest
import torch
from avalanche.benchmarks import benchmark_from_datasets
from avalanche.benchmarks.utils import DataAttribute
from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset
from torch import nn
from torch.utils.data import Dataset

from lightning_cskl.avalanche import ClassIncrementalNet, CSKLStrategy, TaskIncrementalNet
from lightning_cskl.core import CenterKernelLearner
from lightning_cskl.core.prefix_cache import (DEFAULT_MIN_FLOPS, PrefixCache, PrefixCacheConfig, PrefixStore,
                                              validate_prefix_cache)
from lightning_cskl.data import split_digits, split_digits_benchmark
from lightning_cskl.models import ResNetFeatures, SmallCNN, resnet18

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")

NOTICE = "lightning_cskl.core.prefix_cache"


def _backbone(kind: str) -> tuple[nn.Module, int]:
    if kind == "plain":  # a 10-way linear head: data without Avalanche's class bookkeeping
        return SmallCNN(10, width=8), 0
    if kind == "small_cnn":
        return SmallCNN(10, width=8).features, 16
    return ResNetFeatures(resnet18(10, in_channels=1, nf=4)), 32


def _run(benchmark, kind="small_cnn", scenario="class", experiences=3, epochs=3, **options):
    """Train the first ``experiences`` of ``benchmark``; the model's logits on their test data, and the strategy."""
    torch.manual_seed(0)
    options.setdefault("prefix_cache_min_flops", 0)  # the toy prefixes are too cheap for the default cost rule
    backbone, features = _backbone(kind)
    model = backbone if not features else (ClassIncrementalNet if scenario == "class" else TaskIncrementalNet)(
        backbone, features)
    strategy = CSKLStrategy(model=model, optimizer=torch.optim.Adam(model.parameters(), 1e-3), train_mb_size=32,
                            train_epochs=epochs, eval_mb_size=512, evaluator=None, statistics_head=None, **options)
    reports = []
    for experience in benchmark.train_stream[:experiences]:
        strategy.train(experience)
        reports.append(dict(strategy.cskl.prefix_cache.last_task))
    model.eval()
    with torch.no_grad():
        logits = [model(torch.stack([e.dataset[i][0] for i in range(len(e.dataset))]),
                        *([e.task_label] if scenario == "task" else []))
                  for e in benchmark.test_stream[:experiences]]
    return torch.cat(logits), reports, strategy


@pytest.mark.parametrize("kind,scenario,cut", [("small_cnn", "class", "backbone.1.0"),
                                               ("resnet", "task", "backbone.layer4.1")])
def test_the_float32_cache_gives_the_uncached_runs_predictions(kind, scenario, cut):
    benchmark = split_digits_benchmark(scenario)
    plain, off, _ = _run(benchmark, kind, scenario, prefix_cache="off")
    cached, reports, _ = _run(benchmark, kind, scenario)
    assert off == [{}, {}, {}]
    assert reports[0] == {}  # the base session trains everything: nothing is cached
    for report in reports[1:]:
        # on the ResNet the cut is the block around the lowest trained conv: its shortcut reads the same input
        assert report["cut"] == cut and report["reason"] == "" and report["bytes"] > 0
        assert report["hits"] > report["misses"] > 0  # epoch 1 and one check per pass run the prefix; the rest skip it
    assert torch.equal(cached, plain)


def test_later_epochs_and_the_task_end_pass_read_the_store_but_for_one_checked_batch_each():
    benchmark = split_digits_benchmark("class")
    epochs = 3
    _, reports, _ = _run(benchmark, epochs=epochs)
    for experience, report in zip(benchmark.train_stream[1:3], reports[1:]):
        batches = -(-len(experience.dataset) // 32)  # the training batch size, also that of the task-end pass
        # epoch 1 runs the prefix on every batch; each later pass (epochs 2-3, the task end) on its first only
        assert report["misses"] == batches + epochs, report
        assert report["hits"] == epochs * (batches - 1), report


class _Jittered(Dataset):
    """Digits with fresh noise at every read: a transform that changes a sample between epochs."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.05 * torch.randn_like(self.x[i]), self.y[i]


def test_augmentation_is_detected_and_the_task_runs_uncached(caplog):
    tasks = split_digits(5)[:2]
    data = [ClassificationDataset([_Jittered(t.train.tensors[0], t.train.tensors[1])],
                                  data_attributes=[DataAttribute(t.train.tensors[1].tolist(), "targets")])
            for t in tasks]
    benchmark = benchmark_from_datasets(train=data, test=data)
    with caplog.at_level(logging.WARNING, logger=NOTICE):
        _, reports, _ = _run(benchmark, "plain", experiences=2, epochs=2)
    assert reports[1]["hits"] == 0 and "changed between passes" in reports[1]["reason"]
    notices = [r.getMessage() for r in caplog.records if r.name == NOTICE]
    assert len(notices) == 1 and "random augmentation" in notices[0] and "\n" not in notices[0]


def test_over_budget_the_task_says_so_and_runs_uncached(caplog):
    benchmark = split_digits_benchmark("class")
    plain, _, _ = _run(benchmark, experiences=2, epochs=2, prefix_cache="off")
    with caplog.at_level(logging.WARNING, logger=NOTICE):
        small, reports, _ = _run(benchmark, experiences=2, epochs=2, prefix_cache=10_000)
    assert reports[1]["hits"] == 0 and reports[1]["bytes"] == 0 and "over the budget" in reports[1]["reason"]
    assert any("prefix_cache=10000" in r.getMessage() for r in caplog.records if r.name == NOTICE)
    assert torch.equal(small, plain)


@pytest.mark.parametrize("precision,stored_share", [("float16", 0.5), ("int8", 0.3)])
def test_lower_precisions_store_less_and_keep_the_predictions_close(precision, stored_share):
    benchmark = split_digits_benchmark("class")
    plain, exact, _ = _run(benchmark, experiences=2, epochs=2)
    cached, reports, _ = _run(benchmark, experiences=2, epochs=2, prefix_cache_precision=precision)
    assert reports[1]["reason"] == "" and reports[1]["hits"] > 0
    assert reports[1]["bytes"] <= stored_share * exact[1]["bytes"]
    agree = (cached.argmax(1) == plain.argmax(1)).float().mean()
    assert agree > 0.95, f"{precision}: {agree:.3f} of the predictions agree with the uncached run's"


def test_an_experience_that_raised_leaves_no_cache_hook_and_trains_again():
    benchmark = split_digits_benchmark("class")
    torch.manual_seed(0)
    model = ClassIncrementalNet(SmallCNN(10, width=4).features, 8)
    strategy = CSKLStrategy(model=model, optimizer=torch.optim.Adam(model.parameters(), 1e-3), train_mb_size=32,
                            train_epochs=3, eval_mb_size=512, evaluator=None, prefix_cache_min_flops=0)
    strategy.train(benchmark.train_stream[0])

    class Boom(RuntimeError):
        pass

    def explode(module, args):
        if strategy.clock.train_exp_epochs == 1 and strategy.cskl.prefix_cache.hits:  # while reading the cache
            raise Boom

    handle = model.head.register_forward_pre_hook(explode)
    with pytest.raises(Boom):
        strategy.train(benchmark.train_stream[1])
    handle.remove()
    assert all(not m._forward_pre_hooks and "forward" not in vars(m) for m in model.modules())
    strategy.train(benchmark.train_stream[1])  # the cache is rebuilt
    assert strategy.cskl.prefix_cache.last_task["hits"] > 0


# ---------------------------------------------------------------------------------------------- the engine alone
class _Side(nn.Module):
    """A skip connection from below the trained conv to its output: the prefix is needed after the cut."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(1, 4, 3, padding=1)
        self.side = nn.Conv2d(1, 4, 1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        side = self.side(x)
        return self.head((self.conv(self.pre(x)) + side).mean((2, 3)))


def _task(model, layers, setting="on", min_flops=0, **learner_options):
    learner = CenterKernelLearner(layers=layers, first_task="center", score_batches=1, **learner_options)
    learner.bind(model)
    learner.begin_task()
    cache = PrefixCache(setting, min_flops=min_flops)
    cache.begin_task(model, list(learner.layers), size=16)
    x = torch.randn(16, 1, 6, 6)
    with cache.batch(torch.arange(16), lambda: model(x)):
        model(x)
    return cache


def test_a_skip_connection_around_the_cut_is_detected(caplog):
    with caplog.at_level(logging.WARNING, logger=NOTICE):
        cache = _task(_Side(), ["conv"])
    assert not cache.active and cache.cut is None and "output differs" in cache.reason


class _Masked(_Side):
    """_Side behind a head that masks every class (as an expanding head does before it has seen one): the model's
    output is the same whatever the features, so only the modules after the cut can tell a wrong cut."""

    def forward(self, x):
        return super().forward(x) * 0 - 1000


def test_a_skip_connection_is_detected_even_behind_an_output_that_ignores_the_features(caplog):
    with caplog.at_level(logging.WARNING, logger=NOTICE):
        cache = _task(_Masked(), ["conv"])
    assert not cache.active and cache.cut is None and "output differs" in cache.reason


def test_a_prefix_that_trains_or_is_empty_gets_no_cache():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(),
                        nn.Linear(4 * 36, 2))
    assert "not frozen: '0'" in _task(net, ["2"], train_also=["0", "4"]).reason
    assert "no prefix" in _task(net, "all").reason
    assert _task(net, ["2"]).active


def test_a_prefix_too_cheap_to_store_is_recomputed_with_an_info_line(caplog):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(),
                        nn.Linear(4 * 36, 2))
    with caplog.at_level(logging.INFO, logger=NOTICE):
        cheap = _task(net, ["2"], min_flops=DEFAULT_MIN_FLOPS)
    # a 3×3 conv from one channel: 9 multiply-adds, 18 FLOPs per output value (the ReLU counts none)
    assert cheap.flops_per_value == 18 and not cheap.active and cheap.cut is None and cheap.nbytes == 0
    notices = [r for r in caplog.records if r.name == NOTICE]
    assert len(notices) == 1 and notices[0].levelno == logging.INFO
    assert "spends 18 FLOPs per value" in notices[0].getMessage() and "prefix_cache_min_flops=32" in cheap.reason
    assert _task(net, ["2"], min_flops=18).active  # the rule is "at least"


def test_the_resnet_cut_is_the_block_and_skips_everything_below():
    net = resnet18(2, in_channels=1, nf=4)
    cache = _task(net, ["layer4.1.conv1", "layer4.1.conv2"], min_flops=DEFAULT_MIN_FLOPS)
    assert cache.cut == "layer4.1" and cache.active and cache.flops_per_value > 10 * DEFAULT_MIN_FLOPS
    assert set(cache._plan.skipped) == {"conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer4.0"}


def test_options_are_validated_with_the_allowed_values():
    assert validate_prefix_cache("off") is None and validate_prefix_cache(512) == 512
    for bad in (0, -3, "maybe", 1.5):
        with pytest.raises(ValueError, match=r"prefix_cache=.* is not allowed: use 'on'"):
            validate_prefix_cache(bad)
    with pytest.raises(ValueError, match=r"prefix_cache_precision='int4' is not allowed: use one of float32"):
        PrefixCache("on", "int4")
    for bad in (-1, float("inf"), float("nan"), "cheap", True):
        with pytest.raises(ValueError, match=r"prefix_cache_min_flops=.* is not allowed: use a number >= 0"):
            PrefixCacheConfig(prefix_cache_min_flops=bad)


@pytest.mark.parametrize("precision,error",
                         [("float32", 0.0), ("float16", 2.0**-11), ("int8", 0.5 / 127 * (1 + 2.0**-7))])
def test_the_store_rounds_within_its_precision_and_spots_a_changed_sample(precision, error):
    # channels of very different magnitudes, one near zero
    x = torch.relu(torch.randn(6, 4, 4, 4)) * torch.tensor([1.0, 10.0, 100.0, 1e-4]).reshape(1, 4, 1, 1)
    store = PrefixStore(6, (4, 4, 4), precision, torch.device("cpu"), torch.float32)
    store.write(torch.arange(6), x)
    amax = x.abs().amax((2, 3), keepdim=True)
    assert ((store.read(torch.arange(6)) - x).abs() <= error * amax + 1e-7).all()
    for _ in range(3):  # the same values written again are never taken for a changed sample
        store.write(torch.arange(6), x)
    assert not store.differs(torch.arange(6), x)
    assert store.differs(torch.arange(6), x + 0.01 * amax * torch.randn_like(x))
