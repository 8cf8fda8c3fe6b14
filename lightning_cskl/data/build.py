"""The Avalanche benchmark a run's :class:`~lightning_cskl.options.DataOptions` describe: the built-in offline
ones, CIFAR-100, or any ``module:function``.

The package reads one way down: options -> builder -> loader. This module only picks the builder
(:mod:`.benchmarks`: class and task splits; :mod:`.shifts`: domain-incremental and cross-dataset); each builder
reads its data with a loader (:mod:`.digits`, :mod:`.fashion_mnist`) and ends in :mod:`.tensors`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..options import DataOptions, UsageError

__all__ = ["BUILTIN_BENCHMARKS", "build_benchmark", "input_channels"]

BUILTIN_BENCHMARKS = ("digits", "fashion_mnist", "fashion_digits", "cifar100")


def _custom_benchmark(spec: str):
    module_name, _, function_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"data.benchmark={spec!r}: cannot load {function_name!r} from module {module_name!r} "
                         f"({error})") from None
    benchmark = factory()
    if not all(hasattr(benchmark, stream) for stream in ("train_stream", "test_stream")):
        raise UsageError(f"data.benchmark={spec!r} returned a {type(benchmark).__name__}, not an Avalanche benchmark "
                         "(an object with train_stream and test_stream)")
    return benchmark


def build_benchmark(options: DataOptions):
    """The Avalanche benchmark that ``options`` describe.

    Raises:
        DataNotFoundError: the data is not on disk (the message says how to get it).
        UsageError: an option is not allowed.
    """
    from .benchmarks import split_cifar100, split_digits_benchmark, split_fashion_mnist
    from .fashion_mnist import DEBIAN_FASHION_MNIST
    from .shifts import fashion_digits_benchmark, fashion_mnist_domains, split_digits_domains

    base: Any = "auto" if options.base_classes is None else options.base_classes
    source = options.source or DEBIAN_FASHION_MNIST
    try:
        if options.scenario == "domain":
            if options.benchmark == "digits":
                return split_digits_domains(options.domains, seed=options.seed)
            if options.benchmark == "fashion_mnist":
                return fashion_mnist_domains(options.root, options.domains, train_per_class=options.train_per_class,
                                             test_per_class=options.test_per_class, seed=options.seed,
                                             download=options.download, source=source)
            if options.benchmark in BUILTIN_BENCHMARKS:
                raise UsageError(f"data.scenario='domain' is not allowed with data.benchmark="
                                 f"{options.benchmark!r}: use digits or fashion_mnist")
        if options.benchmark == "fashion_digits":
            if options.scenario != "class":
                raise UsageError(f"data.scenario={options.scenario!r} is not allowed with data.benchmark="
                                 "'fashion_digits': it is class-incremental (scenario: class)")
            return fashion_digits_benchmark(options.root, options.classes_per_exp,
                                            train_per_class=options.train_per_class,
                                            test_per_class=options.test_per_class, seed=options.seed,
                                            download=options.download, source=source)
        if options.benchmark == "digits":
            return split_digits_benchmark(options.scenario, base, options.classes_per_exp, seed=options.seed)
        if options.benchmark == "fashion_mnist":
            return split_fashion_mnist(options.root, options.scenario, base, options.classes_per_exp,
                                       download=options.download, train_per_class=options.train_per_class,
                                       source=source)
        if options.benchmark == "cifar100":
            return split_cifar100(options.root, options.scenario, options.base_classes, options.classes_per_exp,
                                  download=options.download, seed=options.seed)
    except ValueError as error:  # a class split or option the builder refused; DataNotFoundError is no ValueError
        raise UsageError(f"data: {error}") from None
    if ":" in options.benchmark:
        return _custom_benchmark(options.benchmark)
    raise UsageError(f"data.benchmark={options.benchmark!r} is not allowed: use one of "
                     f"{', '.join(BUILTIN_BENCHMARKS)} or 'module:function' returning an Avalanche benchmark")


def input_channels(benchmark: Any) -> int:
    """Channels of the first image of a benchmark (1 if every experience is empty)."""
    for stream in (benchmark.train_stream, benchmark.test_stream):
        for experience in stream:
            if len(experience.dataset):
                return int(experience.dataset[0][0].shape[0])
    return 1

