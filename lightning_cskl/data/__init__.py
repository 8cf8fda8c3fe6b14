"""Offline continual-learning data: Split Digits (bundled with scikit-learn) and Split Fashion-MNIST (local
files), as task lists and as Avalanche benchmarks."""

from .benchmarks import Scenario, split_digits_benchmark, split_fashion_mnist, tensor_benchmark
from .digits import TaskData, split_digits
from .fashion_mnist import DEBIAN_FASHION_MNIST, DataNotFoundError, load_fashion_mnist, prepare_fashion_mnist

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "DataNotFoundError",
    "Scenario",
    "TaskData",
    "load_fashion_mnist",
    "prepare_fashion_mnist",
    "split_digits",
    "split_digits_benchmark",
    "split_fashion_mnist",
    "tensor_benchmark",
]
