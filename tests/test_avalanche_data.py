"""Offline benchmarks: Split Digits builders, Fashion-MNIST prepared from Debian's files (when installed),
Avalanche's classic SplitFMNIST trained unchanged by CSKLStrategy, and clear errors for missing data."""

from __future__ import annotations

import pytest
import torch

from lightning_cskl.avalanche import ClassIncrementalNet, CSKLStrategy
from lightning_cskl.data import (
    DEBIAN_FASHION_MNIST,
    DataNotFoundError,
    prepare_fashion_mnist,
    split_digits_benchmark,
    split_fashion_mnist,
)
from lightning_cskl.models import SmallCNN

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")


needs_fmnist = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install -y dataset-fashion-mnist provides Fashion-MNIST offline",
)


def test_split_digits_scenarios():
    bm = split_digits_benchmark("class")
    assert [len(e.dataset) for e in bm.test_stream] == [216, 109, 108, 106]  # 30 % of each class, stratified
    assert {int(e.task_label) for e in bm.train_stream} == {0}
    bm = split_digits_benchmark("task", seed=1)
    assert [e.task_label for e in bm.train_stream] == [0, 1, 2, 3, 4]
    x, y, t = bm.train_stream[2].dataset[0]
    assert x.shape == (1, 8, 8) and int(y) in (0, 1) and int(t) == 2


def test_bad_class_split_is_refused():
    with pytest.raises(ValueError, match="base_classes=5 and classes_per_exp=2 do not split 10 classes"):
        split_digits_benchmark("class", base_classes=5)
    with pytest.raises(ValueError, match="scenario='domain' is not allowed"):
        split_digits_benchmark("domain")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"apt-get install -y dataset-fashion-mnist.*download=True"):
        split_fashion_mnist(tmp_path / "root", source=tmp_path / "nothing-here")
    assert not (tmp_path / "root" / "FashionMNIST").exists()  # nothing half-prepared is left behind


@needs_fmnist
def test_fashion_mnist_from_debian_files(tmp_path):
    root = prepare_fashion_mnist(tmp_path)
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    ]
    bm = split_fashion_mnist(root, "class", train_per_class=20)
    assert [e.classes_in_this_experience for e in bm.train_stream] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert len(bm.train_stream[0].dataset) == 80 and len(bm.test_stream[0].dataset) == 4000
    bm = split_fashion_mnist(root, "task", train_per_class=20)
    assert len(bm.train_stream) == 5 and bm.train_stream[4].task_label == 4


@needs_fmnist
def test_classic_split_fmnist_runs_unchanged(tmp_path):
    from avalanche.benchmarks.classic import SplitFMNIST
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    bm = SplitFMNIST(n_experiences=5, seed=0, dataset_root=prepare_fashion_mnist(tmp_path))
    torch.manual_seed(0)
    model = ClassIncrementalNet(SmallCNN(10, width=4).features, 8)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True))
    strategy = CSKLStrategy(model=model, optimizer=torch.optim.Adam(model.parameters(), 3e-3), train_mb_size=256,
                            train_epochs=1, eval_mb_size=1000, evaluator=evaluator, record_batches=2, score_batches=2)
    for experience in bm.train_stream[:2]:
        strategy.train(experience)
    metrics = strategy.eval(bm.test_stream[:2])
    accuracy = [v for k, v in metrics.items() if k.startswith("Top1_Acc_Exp")]
    assert len(accuracy) == 2 and max(accuracy) > 0.5
    assert strategy.cskl.learner.tasks_seen == 2


def test_missing_data_message_names_the_source_folder(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"cannot be prepared from .*nowhere.*apt-get install -y dataset-fashion"):
        prepare_fashion_mnist(tmp_path / "root", source=tmp_path / "nowhere")
