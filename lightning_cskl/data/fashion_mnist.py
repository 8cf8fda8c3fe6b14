"""Fashion-MNIST from a local root, with no network at run time.

Where to get it, in order:

1. ``ROOT/FashionMNIST/raw/`` already holds the four uncompressed IDX files (torchvision's layout);
2. Debian/Ubuntu's ``dataset-fashion-mnist`` package (``apt-get install -y dataset-fashion-mnist``) put the
   gzipped files in ``/usr/share/datasets/fashion-mnist/``: they are gunzipped into ``ROOT/FashionMNIST/raw/``
   (Debian recompressed them, so torchvision's md5 check of the ``.gz`` files would reject them);
3. ``download=True``: torchvision downloads them (needs a network; a dead network fails within a timeout).

Otherwise :class:`DataNotFoundError` says how to get the data. Once prepared, Avalanche's classic
``SplitFMNIST(dataset_root=ROOT)`` works offline too.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from .download import DataNotFoundError, download_timeout

__all__ = ["DEBIAN_FASHION_MNIST", "DataNotFoundError", "load_fashion_mnist", "prepare_fashion_mnist"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _how_to_get(root: Path, source: Union[str, os.PathLike] = DEBIAN_FASHION_MNIST) -> str:
    return (
        f"Fashion-MNIST is not in {root / 'FashionMNIST' / 'raw'} and cannot be prepared from {source}. "
        "Get it with `sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu; it is then prepared "
        "automatically), or pass download=True where a network exists, or put the four IDX files "
        f"({', '.join(_FILES)}) into {root / 'FashionMNIST' / 'raw'}."
    )


def prepare_fashion_mnist(root: Union[str, os.PathLike], source: Union[str, os.PathLike] = DEBIAN_FASHION_MNIST) -> Path:
    """Make ``root`` a torchvision ``FashionMNIST`` root, gunzipping the files found in ``source`` if needed.

    Args:
        root: the data root (``root/FashionMNIST/raw/`` receives the IDX files).
        source: folder with ``*-ubyte.gz`` (or uncompressed) files; Debian's package folder by default.

    Returns:
        ``root`` as a Path.

    Raises:
        DataNotFoundError: the files are neither in ``root`` nor in ``source``; the message says how to get them.
    """
    root = Path(root)
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in _FILES):
        return root
    source = Path(source)
    found = {}
    for name in _FILES:
        for candidate in (source / f"{name}.gz", source / name):
            if candidate.is_file():
                found[name] = candidate
                break
    if len(found) != len(_FILES):
        raise DataNotFoundError(_how_to_get(root, source))
    raw.mkdir(parents=True, exist_ok=True)
    for name, path in found.items():
        target = raw / name
        if target.is_file():
            continue
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # concurrent preparers never collide
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, target)  # a crash mid-copy never leaves a truncated file under the final name
    return root


def load_fashion_mnist(
    root: Union[str, os.PathLike] = "data", download: bool = False, source: Union[str, os.PathLike] = DEBIAN_FASHION_MNIST
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Fashion-MNIST as tensors: ``((train_x, train_y), (test_x, test_y))``, images ``(N, 1, 28, 28)`` in [0, 1].

    Args:
        root: data root (see :func:`prepare_fashion_mnist`).
        download: let torchvision download the files if they are not available locally.
        source: local folder of the gzipped files (Debian's package by default).

    Raises:
        DataNotFoundError: the data is not available (and ``download`` is False or failed).
    """
    from torchvision.datasets import FashionMNIST

    root = Path(root)
    try:
        prepare_fashion_mnist(root, source)
    except DataNotFoundError:
        if not download:
            raise
        try:
            with download_timeout():
                FashionMNIST(str(root), train=True, download=True)
                FashionMNIST(str(root), train=False, download=True)
        except Exception as error:  # torchvision raises RuntimeError/URLError/timeout
            raise DataNotFoundError(f"downloading Fashion-MNIST failed ({error}). {_how_to_get(root, source)}") from error
    splits = []
    for train in (True, False):
        data = FashionMNIST(str(root), train=train, download=False)
        images = data.data.to(torch.float32).unsqueeze(1) / 255.0
        splits.append((images, data.targets.to(torch.long)))
    return splits[0], splits[1]
