"""Offline benchmarks for two more scenarios of PROTOCOL.md: domain-incremental and cross-dataset class-incremental.

* Domain-incremental ("ever-changing environments"): the same classes return under new input conditions
  (contrast inversion, rotation, blur, noise, occlusion). One label space, task label 0 everywhere, a single
  expanding head, no domain id at test time. Experience i trains on a disjoint, class-stratified share of the
  training images seen under ``domains[i]``; test experience j holds the test images under ``domains[j]``.
  Built with Avalanche's ``dataset_benchmark`` (one dataset per experience), so every experience lists its
  classes (``classes_in_this_experience``) and ``IncrementalClassifier`` heads adapt as usual.
* Cross-dataset class-incremental: a base session of the 10 Fashion-MNIST classes (labels 0-9), then
  scikit-learn's digits resized to 28×28 as new classes 10-19, built with :func:`tensor_benchmark` like the
  other class-incremental benchmarks.

Every transform is deterministic given its ``torch.Generator``; the benchmarks seed one generator per
(split, experience), so the same ``seed`` always gives the same images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .digits import split_digits
from .fashion_mnist import DEBIAN_FASHION_MNIST, load_fashion_mnist
from .tensors import LabeledTensors, tensor_benchmark

__all__ = [
    "DEFAULT_DOMAINS",
    "DOMAINS",
    "domain_benchmark",
    "fashion_digits_benchmark",
    "fashion_mnist_domains",
    "shift_images",
    "split_digits_domains",
]

DOMAINS = ("clean", "invert", "rotate", "blur", "noise", "occlude")
"""Every input condition :func:`shift_images` knows."""

DEFAULT_DOMAINS = ("clean", "invert", "rotate", "noise")
"""The domains of the domain-incremental benchmarks unless told otherwise (one experience each)."""

BLUR_SIGMA, BLUR_KERNEL = 1.5, 7
NOISE_STD = 0.5
_TRAIN, _TEST, _PARTITION = 0, 1, 2  # generator streams of :func:`_generator`


# ---------------------------------------------------------------------------------------------- transforms
def _check_domain(domain: object) -> None:
    if not isinstance(domain, str) or domain not in DOMAINS:
        raise ValueError(f"domain={domain!r} is not allowed: use one of {', '.join(DOMAINS)}")


def _gaussian_blur(images: Tensor) -> Tensor:
    half = BLUR_KERNEL // 2
    x = torch.arange(BLUR_KERNEL, dtype=images.dtype, device=images.device) - half
    g = torch.exp(-(x**2) / (2 * BLUR_SIGMA**2))
    g = g / g.sum()
    channels = images.shape[1]
    kernel = torch.outer(g, g).expand(channels, 1, BLUR_KERNEL, BLUR_KERNEL)
    padded = F.pad(images, (half, half, half, half), mode="reflect")
    return F.conv2d(padded, kernel, groups=channels)  # depthwise: each channel blurred on its own


def shift_images(images: Tensor, domain: str, generator: Optional[torch.Generator] = None) -> Tensor:
    """``images`` ``(N, C, H, W)`` in [0, 1] seen under the input condition ``domain``; the input is not changed.

    Domains:
        ``"clean"``: the images as they are (a copy).
        ``"invert"``: contrast inversion, ``1 - x``.
        ``"rotate"``: exact rotation by 90° (``torch.rot90`` on the last two dims); needs ``H == W``.
        ``"blur"``: Gaussian blur, sigma 1.5, 7×7 kernel, reflect padding, each channel on its own.
        ``"noise"``: additive Gaussian noise of std 0.5, independent per pixel and sample, clamped to [0, 1].
        ``"occlude"``: a square of side ``H // 2`` at a random position per sample (all channels) set to 0.

    Args:
        images: a float batch ``(N, C, H, W)``.
        domain: one of :data:`DOMAINS`.
        generator: draws the noise and the occlusion positions (None: PyTorch's global generator). The same
            seed gives the same images.

    Returns:
        A new tensor of the shape, dtype and device of ``images``.

    Raises:
        ValueError: an unknown domain (the message lists the allowed ones), a batch that is not 4-D, or
            ``"rotate"`` on non-square images.

    Example:
        >>> x = torch.tensor([[[[0.0, 1.0], [0.25, 0.5]]]])
        >>> shift_images(x, "invert").tolist()
        [[[[1.0, 0.0], [0.75, 0.5]]]]
        >>> shift_images(x, "rotate").tolist()
        [[[[1.0, 0.5], [0.0, 0.25]]]]
        >>> a = shift_images(x, "noise", torch.Generator().manual_seed(0))
        >>> torch.equal(a, shift_images(x, "noise", torch.Generator().manual_seed(0)))
        True
    """
    _check_domain(domain)
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images of shape {shape} are not allowed: give a batch (N, C, H, W)")
    height, width = images.shape[-2:]
    if domain == "clean":
        return images.clone()
    if domain == "invert":
        return 1.0 - images
    if domain == "rotate":
        if height != width:
            raise ValueError(f"domain='rotate' needs square images: these are {height}×{width} (H×W)")
        return torch.rot90(images, 1, dims=(-2, -1))
    if domain == "blur":
        if min(height, width) <= BLUR_KERNEL // 2:
            raise ValueError(f"domain='blur' needs images over 3×3 (reflect padding): these are {height}×{width}")
        return _gaussian_blur(images)
    where = generator.device if generator is not None else torch.device("cpu")
    if domain == "noise":
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=where)
        return (images + NOISE_STD * noise.to(images.device)).clamp_(0.0, 1.0)
    # occlude
    side = height // 2
    if side > width:
        raise ValueError(f"domain='occlude' needs W >= H // 2: these images are {height}×{width} (H×W)")
    n = images.shape[0]
    top = torch.randint(0, height - side + 1, (n,), generator=generator, device=where).to(images.device)
    left = torch.randint(0, width - side + 1, (n,), generator=generator, device=where).to(images.device)
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)  # (N, W)
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (N, 1, H, W)
    return images.masked_fill(mask, 0.0)


# ---------------------------------------------------------------------------------------------- helpers
def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed: it must be an int >= 0")
    return seed


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    """The generator of one (split or partition, experience): independent streams from one seed."""
    import numpy as np

    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _check_per_class(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r} is not allowed: use None or an int >= 1")


def _first_per_class(data: tuple[Tensor, Tensor], per_class: Optional[int]) -> tuple[Tensor, Tensor]:
    """The first ``per_class`` samples of each class, in their original order (all when None)."""
    images, labels = data
    if per_class is None:
        return images, labels
    keep = torch.cat([(labels == c).nonzero().squeeze(1)[:per_class] for c in labels.unique()]).sort().values
    return images[keep], labels[keep]


def _check_domains(domains: Sequence[str]) -> tuple[str, ...]:
    if isinstance(domains, str):
        raise ValueError(f"domains={domains!r} is not allowed: give a sequence of domains, e.g. ({domains!r},)")
    domains = tuple(domains)
    if not domains:
        raise ValueError(f"domains=() is not allowed: give at least one of {', '.join(DOMAINS)}")
    for domain in domains:
        _check_domain(domain)
    return domains


# ---------------------------------------------------------------------------------------------- domain-incremental
def domain_benchmark(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    domains: Sequence[str] = DEFAULT_DOMAINS,
    seed: int = 0,
    test_per_class: Optional[int] = None,
):
    """A domain-incremental Avalanche benchmark: one experience per domain, the same classes in each.

    Train experience i holds a disjoint, class-stratified ``1 / len(domains)`` share of the training images
    (seeded shuffle within each class), transformed by ``domains[i]``; the shares together cover the training
    data. Test experience j holds all the test images (or the first ``test_per_class`` of each class)
    transformed by ``domains[j]``. Task label 0 everywhere; labels are the given ones. Built with Avalanche's
    ``dataset_benchmark``.

    Args:
        train: ``(images, labels)`` of the training data, images ``(N, C, H, W)`` in [0, 1].
        test: ``(images, labels)`` of the test data.
        domains: the input condition of each experience, in order (see :func:`shift_images`).
        seed: seeds the shuffle and one generator per (split, experience) for the noise and occlusions.
        test_per_class: keep only the first N test images of each class (quick runs); None keeps all.

    Returns:
        An Avalanche ``ClassificationScenario`` with ``train_stream`` and ``test_stream``; its ``domains``
        attribute holds the domains in order.

    Raises:
        ValueError: an unknown domain, a class with fewer training images than domains, or no data.

    Example:
        >>> (data,) = split_digits(n_tasks=1)
        >>> train, test = data.train.tensors[:2], data.test.tensors[:2]
        >>> bm = domain_benchmark(train, test, ("clean", "invert"), test_per_class=5)
        >>> len(bm.train_stream), bm.train_stream[1].classes_in_this_experience, bm.train_stream[1].task_label
        (2, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 0)
        >>> len(bm.test_stream[1].dataset), bm.domains
        (50, ('clean', 'invert'))
    """
    from avalanche.benchmarks import dataset_benchmark

    domains = _check_domains(domains)
    seed = _check_seed(seed)
    _check_per_class("test_per_class", test_per_class)
    train_x, train_y = train
    test_x, test_y = _first_per_class(test, test_per_class)
    if len(train_y) == 0 or len(test_y) == 0:
        raise ValueError(
            f"the benchmark has no data: {len(train_y)} training and {len(test_y)} test samples were given"
        )
    shuffle = _generator(seed, _PARTITION, 0)
    shares: list[list[Tensor]] = [[] for _ in domains]
    for c in train_y.unique().tolist():
        idx = (train_y == c).nonzero().squeeze(1)
        if len(idx) < len(domains):
            raise ValueError(
                f"class {c} has {len(idx)} training images, fewer than the {len(domains)} domains: every "
                "experience must hold every class"
            )
        idx = idx[torch.randperm(len(idx), generator=shuffle)]
        for share, part in zip(shares, torch.tensor_split(idx, len(domains))):
            share.append(part)
    train_sets, test_sets = [], []
    for i, domain in enumerate(domains):
        idx = torch.cat(shares[i]).sort().values
        train_images = shift_images(train_x[idx], domain, _generator(seed, _TRAIN, i))
        train_sets.append(LabeledTensors(train_images, train_y[idx]))
        test_sets.append(LabeledTensors(shift_images(test_x, domain, _generator(seed, _TEST, i)), test_y.clone()))
    benchmark = dataset_benchmark(train_sets, test_sets)
    benchmark.domains = domains
    return benchmark


def split_digits_domains(domains: Sequence[str] = DEFAULT_DOMAINS, seed: int = 0, test_fraction: float = 0.3):
    """Domain-incremental Split Digits: scikit-learn's 8×8 digits (always there), one experience per domain.

    Args:
        domains: the input condition of each experience (see :func:`shift_images`).
        seed: seed of the train/test split and of :func:`domain_benchmark`.
        test_fraction: fraction of each class held out for testing.

    Example:
        >>> bm = split_digits_domains()
        >>> len(bm.train_stream), len(bm.test_stream), bm.domains
        (4, 4, ('clean', 'invert', 'rotate', 'noise'))
        >>> [e.classes_in_this_experience == list(range(10)) for e in bm.train_stream]
        [True, True, True, True]
    """
    domains = _check_domains(domains)
    (data,) = split_digits(n_tasks=1, seed=_check_seed(seed), test_fraction=test_fraction)
    train_x, train_y, _ = data.train.tensors
    test_x, test_y, _ = data.test.tensors
    return domain_benchmark((train_x, train_y), (test_x, test_y), domains, seed)


def fashion_mnist_domains(
    root: Union[str, os.PathLike] = "data",
    domains: Sequence[str] = DEFAULT_DOMAINS,
    train_per_class: Optional[int] = None,
    test_per_class: Optional[int] = None,
    seed: int = 0,
    download: bool = False,
    source: Union[str, os.PathLike] = DEBIAN_FASHION_MNIST,
):
    """Domain-incremental Fashion-MNIST from local files (see :mod:`lightning_cskl.data.fashion_mnist`).

    Args:
        root: data root; prepared from Debian's ``dataset-fashion-mnist`` files when they are installed.
        domains: the input condition of each experience (see :func:`shift_images`).
        train_per_class: keep only the first N training images of each class before they are split across the
            domains (as :func:`split_fashion_mnist` does); None keeps all.
        test_per_class: keep only the first N test images of each class; None keeps all.
        seed: seed of :func:`domain_benchmark`.
        download: let torchvision download the data if it is not available locally.
        source: folder of the gzipped IDX files.

    Raises:
        DataNotFoundError: the data is not available; the message says how to get it.
        ValueError: an unknown domain or a bad count (checked before any data is read).

    Example:
        >>> fashion_mnist_domains(domains=("clean", "fog"))
        Traceback (most recent call last):
        ...
        ValueError: domain='fog' is not allowed: use one of clean, invert, rotate, blur, noise, occlude
    """
    domains = _check_domains(domains)
    seed = _check_seed(seed)
    _check_per_class("train_per_class", train_per_class)
    _check_per_class("test_per_class", test_per_class)
    train, test = load_fashion_mnist(root, download=download, source=source)
    return domain_benchmark(_first_per_class(train, train_per_class), test, domains, seed, test_per_class)


# ---------------------------------------------------------------------------------------------- cross-dataset
def fashion_digits_benchmark(
    root: Union[str, os.PathLike] = "data",
    classes_per_exp: int = 2,
    train_per_class: Optional[int] = None,
    test_per_class: Optional[int] = None,
    seed: int = 0,
    download: bool = False,
    source: Union[str, os.PathLike] = DEBIAN_FASHION_MNIST,
):
    """Cross-dataset class-incremental: a Fashion-MNIST base session, then scikit-learn digits as new classes.

    Experience 0 holds the 10 Fashion-MNIST classes (labels 0-9); the later experiences bring the digits
    0-9, resized from 8×8 to 28×28 (bilinear, ``align_corners=False``), as classes 10-19 in order,
    ``classes_per_exp`` per experience. Built with :func:`tensor_benchmark` (``base_classes=10``).

    Args:
        root: Fashion-MNIST data root (see :func:`split_fashion_mnist`).
        classes_per_exp: digit classes per later experience; must divide 10.
        train_per_class: keep only the first N training images of each class (of both data sets); None: all.
        test_per_class: keep only the first N test images of each class; None: all.
        seed: seed of the digits' stratified train/test split (30 % test).
        download: let torchvision download Fashion-MNIST if it is not available locally.
        source: folder of the gzipped Fashion-MNIST files.

    Raises:
        DataNotFoundError: Fashion-MNIST is not available; the message says how to get it.
        ValueError: ``classes_per_exp`` does not divide 10, or a bad count (checked before any data is read).

    Example:
        >>> fashion_digits_benchmark(classes_per_exp=3)
        Traceback (most recent call last):
        ...
        ValueError: classes_per_exp=3 is not allowed: it must divide the 10 digit classes (1, 2, 5 or 10)
    """
    if (isinstance(classes_per_exp, bool) or not isinstance(classes_per_exp, int) or classes_per_exp < 1
            or 10 % classes_per_exp):
        raise ValueError(
            f"classes_per_exp={classes_per_exp!r} is not allowed: it must divide the 10 digit classes (1, 2, 5 or 10)"
        )
    _check_per_class("train_per_class", train_per_class)
    _check_per_class("test_per_class", test_per_class)
    seed = _check_seed(seed)
    fashion_train, fashion_test = load_fashion_mnist(root, download=download, source=source)
    (data,) = split_digits(n_tasks=1, seed=seed)
    size = tuple(fashion_train[0].shape[-2:])

    def digits(split) -> tuple[Tensor, Tensor]:
        images, labels, _ = split.tensors
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return images, labels + 10

    train = [_first_per_class(d, train_per_class) for d in (fashion_train, digits(data.train))]
    test = [_first_per_class(d, test_per_class) for d in (fashion_test, digits(data.test))]
    return tensor_benchmark(
        (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])),
        (torch.cat([x for x, _ in test]), torch.cat([y for _, y in test])),
        scenario="class",
        base_classes=10,
        classes_per_exp=classes_per_exp,
    )
