"""Offline continual-learning data: Split Digits (bundled with scikit-learn) and Split Fashion-MNIST (local
files), as task lists and as Avalanche benchmarks; domain-incremental and cross-dataset benchmarks (shifts)."""

from .benchmarks import split_cifar100, split_digits_benchmark, split_fashion_mnist
from .download import DataNotFoundError
from .digits import TaskData, split_digits
from .fashion_mnist import DEBIAN_FASHION_MNIST, load_fashion_mnist, prepare_fashion_mnist
from .tensors import Scenario, tensor_benchmark
from .shifts import (
    DEFAULT_DOMAINS,
    DOMAINS,
    domain_benchmark,
    fashion_digits_benchmark,
    fashion_mnist_domains,
    shift_images,
    split_digits_domains,
)

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "DEFAULT_DOMAINS",
    "DOMAINS",
    "DataNotFoundError",
    "Scenario",
    "TaskData",
    "domain_benchmark",
    "fashion_digits_benchmark",
    "fashion_mnist_domains",
    "load_fashion_mnist",
    "prepare_fashion_mnist",
    "shift_images",
    "split_cifar100",
    "split_digits",
    "split_digits_benchmark",
    "split_digits_domains",
    "split_fashion_mnist",
    "tensor_benchmark",
]
