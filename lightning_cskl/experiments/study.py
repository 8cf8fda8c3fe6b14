"""The knowledge-intensity study: which tap of a 3×3 kernel learns a new task best, at each depth.

The method rests on one empirical claim: the CENTER element of a conv kernel carries the most "knowledge
intensity" for learning new data, especially in deeper layers. This module measures it on any of our
backbones, with plain fine-tuning (no projection, no channel selection: it measures the kernel positions,
not the method).

Procedure (:func:`run_study`):

1. A base-session model is trained once, with all parameters, on ``base_classes`` (or loaded from
   ``OUTPUT_DIR/base.pt`` when that file was written by the same base settings).
2. A linear head for ``new_classes`` is fitted on the frozen base features (``probe_epochs`` of a linear
   probe, on cached features, once per seed): every run below starts from this head, so that what a run
   gains is not the head catching up (a fresh head converges slowly and would dominate every gain).
3. Reference run ("head only"): the backbone stays frozen and only the head trains, ``epochs`` epochs.
   Its new-task accuracy is the baseline of every gain.
4. For each depth (a stage of the net, e.g. ResNet ``layer3``) and each position (one of the nine taps
   ``top_left`` ... ``bottom_right``, or ``full`` for the whole kernel), a copy of the base model trains ONLY
   that tap of every 3×3 convolution of the stage, together with the head, for the same ``epochs`` from the
   same starting head and with the same batches. Everything else is frozen, BatchNorm included (eval mode:
   its statistics and affine do not move), so the only change to the representation is the trained tap.
   With ``repeats > 1`` steps 2-4 are repeated with further seeds (batch order, head initialisation).

Metrics, in accuracy points (0-100), evaluated on the held-out test images:

* ``new_acc``: accuracy of the new-task head on the new classes (argmax over the new classes only).
* ``old_acc``: accuracy of the base model's own head on the base classes (argmax over the base classes only).
  The base head is never trained, so any change comes from the representation the tap moved.
* ``gained = new_acc - new_acc(head only)``: what training the tap adds to a frozen backbone.
* ``lost = old_acc(base model) - old_acc``: what it costs the base task (forgetting).

Both heads read the same features and neither task's classes compete with the other's (task-aware
evaluation): in a single class-incremental head, a head trained on the new classes alone would predict new
classes everywhere and hide the representation effect this study is after.

Outputs in ``output_dir``: ``study.md`` (the tables), ``study.json`` (config, machine, every run) and one
``heatmap_<depth>.png`` per depth (3×3 panels of accuracy gained and lost per tap; the full kernel in the
title).

Example:
    >>> config = StudyConfig(dataset="digits", positions=["center", "full"], depths=["layer4"])
    >>> config.positions
    ['center', 'full']
    >>> tap_index((3, 3), "top_left"), tap_index((3, 3), "center"), tap_index((5, 5), "right")
    ((0, 0), (1, 1), (2, 4))

Command line (``cskl study`` takes the same options)::

    cskl study --config configs/study_fmnist.yaml
    python -m lightning_cskl.experiments.study --config configs/study_fmnist.yaml
    python -m lightning_cskl.experiments.study --config configs/study_fmnist.yaml --depths '[layer4]' --epochs 1
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from ..core.center import center_index

__all__ = ["FULL", "POSITIONS", "StudyConfig", "TapMask", "convs_in", "run_study", "tap_index", "train_new_task"]

logger = logging.getLogger(__name__)

#: the nine taps of the 3×3 grid, as (row, column) of a 3×3 kernel; larger odd kernels use their outer rows,
#: middle row and outer columns (see :func:`tap_index`)
POSITIONS: dict[str, tuple[int, int]] = {
    "top_left": (0, 0), "top": (0, 1), "top_right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom_left": (2, 0), "bottom": (2, 1), "bottom_right": (2, 2),
}
#: the reference position: every tap of the kernel trains
FULL = "full"
_ALL_POSITIONS = (*POSITIONS, FULL)
_EDGES = ("top", "left", "right", "bottom")
_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
_MODELS = ("resnet18", "small_cnn")
_DATASETS = ("fashion_mnist", "digits")
_NUM_CLASSES = 10  # both data sets
_EVAL_BATCH = 1000


# ---------------------------------------------------------------------------------------------- config
@dataclass
class StudyConfig:
    """Settings of the knowledge-intensity study; plain values, checked at construction.

    Args:
        dataset: ``fashion_mnist`` (local files under ``root``, see :mod:`lightning_cskl.data.fashion_mnist`)
            or ``digits`` (scikit-learn's bundled 8×8 digits; for tests and demos).
        root: data root of Fashion-MNIST (prepared from Debian's ``dataset-fashion-mnist`` files).
        base_classes: classes of the base session (labels 0-9).
        new_classes: classes of the new task (labels 0-9, disjoint from ``base_classes``).
        samples_per_class: training images per class, for the base session and the new task (the first N of
            each class); None keeps all.
        test_per_class: test images per class (the first N); None keeps all.
        model: ``resnet18`` (CIFAR-style, stages ``layer1``..``layer4``, stem stride 1) or ``small_cnn``
            (three conv blocks ``features.0``..``features.2``).
        width: ``nf`` of the ResNet-18 (channels of its first stage) or ``width`` of the small CNN.
        base_epochs: epochs of the base session (all parameters, BatchNorm in training mode).
        epochs: epochs of each study run (one tap and the new-task head; also the head-only reference).
        lr: learning rate of the study runs (one tap and the head; also the head-only reference).
        optimizer: optimizer of the study runs: ``adam`` (no weight decay; every trained element moves by about
            ``lr`` per step whatever its gradient's size) or ``sgd`` (momentum 0.9; steps follow the gradient's
            size, so taps with larger gradients move more).
        base_lr: Adam learning rate of the base session.
        probe_epochs: epochs of the linear probe that every study run's new-task head starts from (a head
            fitted on the frozen base features, computed once per seed on cached features); 0: every run
            starts from a freshly initialised head.
        probe_lr: Adam learning rate of the linear probe.
        batch_size: training batch size.
        seed: seed of the initial weights, the new-task head and the batch order.
        repeats: study runs per (depth, position) with seeds ``seed``, ``seed + 1``, ... (same base model);
            tables report the mean and, for ``repeats > 1``, the standard deviation.
        depths: modules whose 3×3 convolutions train, by qualified name (e.g. ``layer1``..``layer4``).
        positions: taps to study: ``center``, ``top``, ``bottom``, ``left``, ``right``, ``top_left``,
            ``top_right``, ``bottom_left``, ``bottom_right``, and ``full`` (the whole kernel, reference).
        output_dir: where the tables, the JSON, the heatmaps and the base checkpoint go.
        reuse_base: load the base model from ``output_dir/base.pt`` when it was trained with the same base
            settings (data, model, base_epochs, base_lr, batch_size, seed).
        threads: torch CPU threads (None: leave torch's setting).
        progress: show a tqdm progress bar.

    Raises:
        ValueError: a value is not allowed; the message names it and says what is.

    Example:
        >>> StudyConfig(positions=["centre"])
        Traceback (most recent call last):
        ...
        ValueError: positions: 'centre' is not a kernel position; allowed: top_left, top, top_right, left, center, right, bottom_left, bottom, bottom_right, full
    """

    dataset: Literal["fashion_mnist", "digits"] = "fashion_mnist"
    root: str = "data"
    base_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    new_classes: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8, 9])
    samples_per_class: Optional[int] = 500
    test_per_class: Optional[int] = None
    model: Literal["resnet18", "small_cnn"] = "resnet18"
    width: int = 8
    base_epochs: int = 4
    epochs: int = 2
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    base_lr: float = 1e-3
    probe_epochs: int = 20
    probe_lr: float = 1e-2
    batch_size: int = 64
    seed: int = 0
    repeats: int = 1
    depths: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3", "layer4"])
    positions: list[str] = field(default_factory=lambda: list(_ALL_POSITIONS))
    output_dir: str = "outputs/study"
    reuse_base: bool = True
    threads: Optional[int] = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.base_classes = list(self.base_classes)
        self.new_classes = list(self.new_classes)
        self.depths = list(self.depths)
        self.positions = list(self.positions)
        if self.dataset not in _DATASETS:
            raise ValueError(f"dataset={self.dataset!r} is not allowed: use one of {', '.join(_DATASETS)}")
        if self.model not in _MODELS:
            raise ValueError(f"model={self.model!r} is not allowed: use one of {', '.join(_MODELS)}")
        for name in ("base_classes", "new_classes"):
            classes = getattr(self, name)
            if not classes or any(not _is_int(c) or not 0 <= c < _NUM_CLASSES for c in classes) \
                    or len(set(classes)) != len(classes):
                raise ValueError(f"{name}={classes!r} is not allowed: give distinct class labels in 0..{_NUM_CLASSES - 1}")
        if len(self.new_classes) < 2:
            raise ValueError(f"new_classes={self.new_classes!r} is not allowed: the new task needs at least 2 classes")
        shared = sorted(set(self.base_classes) & set(self.new_classes))
        if shared:
            raise ValueError(f"base_classes and new_classes share {shared}: the new task must bring new classes")
        for name in ("samples_per_class", "test_per_class"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name}={value!r} is not allowed: use None (all) or an int >= 1")
        if not _is_int(self.probe_epochs) or self.probe_epochs < 0:
            raise ValueError(f"probe_epochs={self.probe_epochs!r} is not allowed: it must be an int >= 0")
        for name in ("width", "base_epochs", "epochs", "batch_size", "repeats"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: it must be an int >= 1")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise ValueError(f"threads={self.threads!r} is not allowed: use None or an int >= 1")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r} is not allowed: use adam or sgd")
        for name in ("lr", "base_lr", "probe_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number > 0")
        if not self.positions:
            raise ValueError(f"positions is empty: give at least one of {', '.join(_ALL_POSITIONS)}")
        for position in self.positions:
            if position not in _ALL_POSITIONS:
                raise ValueError(f"positions: {position!r} is not a kernel position; allowed: {', '.join(_ALL_POSITIONS)}")
        if len(set(self.positions)) != len(self.positions):
            raise ValueError(f"positions={self.positions!r} lists a position twice")
        if not self.depths or any(not isinstance(d, str) or not d for d in self.depths):
            raise ValueError(f"depths={self.depths!r} is not allowed: give module names such as layer1, layer4")
        if len(set(self.depths)) != len(self.depths):
            raise ValueError(f"depths={self.depths!r} lists a depth twice")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------- tap masks
def tap_index(kernel_size: Sequence[int], position: str) -> tuple[int, int]:
    """(row, column) of a named tap in a 2-d kernel with odd sides.

    ``top``/``bottom`` are the first/last rows, ``left``/``right`` the first/last columns, and the middle
    row or column is :func:`~lightning_cskl.core.center.center_index`'s.

    Raises:
        ValueError: ``position`` is not one of :data:`POSITIONS`, or the kernel is not 2-d with odd sides.
    """
    if position not in POSITIONS:
        raise ValueError(f"position={position!r} is not a tap; allowed: {', '.join(POSITIONS)}")
    if len(kernel_size) != 2:
        raise ValueError(f"kernel_size={tuple(kernel_size)} is not allowed: the study needs 2-d kernels")
    middle = center_index(tuple(kernel_size))
    row, col = POSITIONS[position]
    return tuple((0, m, k - 1)[i] for i, m, k in zip((row, col), middle, kernel_size))  # type: ignore[return-value]


def _tap_mask(weight: Tensor, position: str) -> Tensor:
    mask = torch.zeros(weight.shape[-2:], dtype=torch.bool, device=weight.device)
    if position == FULL:
        mask[:] = True
    else:
        mask[tap_index(weight.shape[-2:], position)] = True
    return mask


class TapMask:
    """Let an optimizer move only one tap of some convolutions' weights.

    Each weight gets a gradient hook that zeroes its gradient outside the tap (so the optimizer's state for
    the other taps stays empty), and :meth:`restore` puts the other taps back bit for bit after each step:
    a gradient mask alone does not stop weight decay or momentum from moving them.

    Args:
        convs: the convolutions, by qualified name; their weights are set to require gradients.
        position: a key of :data:`POSITIONS` or ``"full"`` (no restriction).

    Example:
        >>> conv = nn.Conv2d(2, 3, 3)
        >>> before = conv.weight.detach().clone()
        >>> mask = TapMask({"conv": conv}, "center")
        >>> opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        >>> conv(torch.randn(1, 2, 5, 5)).sum().backward(); opt.step(); mask.restore(); mask.remove()
        >>> changed = (conv.weight != before).any(0).any(0)
        >>> changed.tolist()
        [[False, False, False], [False, True, False], [False, False, False]]
    """

    def __init__(self, convs: dict[str, nn.Module], position: str) -> None:
        if position not in _ALL_POSITIONS:
            raise ValueError(f"position={position!r} is not allowed; use one of {', '.join(_ALL_POSITIONS)}")
        self.position = position
        self._masks: dict[str, Tensor] = {}
        self._frozen: dict[str, Tensor] = {}
        self._weights: dict[str, nn.Parameter] = {}
        self._handles = []
        for name, conv in convs.items():
            weight = conv.weight
            weight.requires_grad_(True)
            self._weights[name] = weight
            if position == FULL:
                continue
            mask = _tap_mask(weight, position)
            self._masks[name] = mask
            self._frozen[name] = weight.detach().clone()
            self._handles.append(weight.register_hook(lambda grad, mask=mask: grad * mask))

    def parameters(self) -> list[nn.Parameter]:
        """The trained weights (whole tensors; only their tap moves)."""
        return list(self._weights.values())

    @torch.no_grad()
    def restore(self) -> None:
        """Put every element outside the tap back to its value at construction."""
        for name, mask in self._masks.items():
            weight = self._weights[name]
            weight.copy_(torch.where(mask, weight, self._frozen[name]))

    def remove(self) -> None:
        """Remove the gradient hooks (the weights keep their trained taps)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone as an ordered list of ``(name, module)`` stages whose composition is ``model.features``.

    ResNet-18: ``conv1`` (the stem: conv1, bn1, relu), ``layer1``..``layer4``, ``pool``; SmallCNN:
    ``features.0``, ``features.1``, ... A depth of the study is a stage name: the study runs the frozen
    stages before it once and caches their output.

    Raises:
        TypeError: the model is neither of the two.
    """
    from ..models.nets import SmallCNN, _ResNet

    if isinstance(model, _ResNet):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu)
        return [("conv1", stem)] + [(f"layer{i}", model.get_submodule(f"layer{i}")) for i in range(1, 5)] \
            + [("pool", model.pool)]
    if isinstance(model, SmallCNN):
        return [(f"features.{i}", m) for i, m in enumerate(model.features)]
    raise TypeError(f"{type(model).__name__} is not supported by the study: use resnet18 or SmallCNN")


def _has_3x3(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3) for m in module.modules())


def convs_in(model: nn.Module, depth: str) -> dict[str, nn.Conv2d]:
    """The 3×3 ``Conv2d`` modules of stage ``depth`` of ``model`` (see :func:`stages`), by qualified name.

    Raises:
        ValueError: ``depth`` is not a stage of ``model`` with a 3×3 convolution; the message lists the stages
            that are.

    Example:
        >>> from lightning_cskl.models import resnet18
        >>> list(convs_in(resnet18(4, 1, nf=4), "layer2"))
        ['layer2.0.conv1', 'layer2.0.conv2', 'layer2.1.conv1', 'layer2.1.conv2']
    """
    allowed = [name for name, module in stages(model) if _has_3x3(module)]
    if depth not in allowed:
        raise ValueError(f"depths: {depth!r} is not a stage of the model with 3×3 convolutions; allowed: "
                         f"{', '.join(allowed)}")
    if depth == "conv1":  # the ResNet stem: a Sequential built by stages(), not a module of the model
        return {"conv1": model.conv1}
    return {f"{depth}.{name}": m for name, m in model.get_submodule(depth).named_modules()
            if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3)}


def _split_at(model: nn.Module, depth: Optional[str]) -> tuple[nn.Module, nn.Module]:
    """(frozen stages before ``depth``, stages from ``depth`` on); None: (all stages, identity)."""
    named = stages(model)
    names = [name for name, _ in named]
    cut = len(named) if depth is None else names.index(depth)
    return nn.Sequential(*[m for _, m in named[:cut]]), nn.Sequential(*[m for _, m in named[cut:]])


@torch.no_grad()
def _run(module: nn.Module, images: Tensor) -> Tensor:
    return torch.cat([module(images[i:i + _EVAL_BATCH]) for i in range(0, len(images), _EVAL_BATCH)]) \
        if len(images) else images


# ---------------------------------------------------------------------------------------------- data, model
@dataclass
class _Split:
    train_x: Tensor
    train_y: Tensor  # labels 0..n-1 in the order of the config's class list
    test_x: Tensor
    test_y: Tensor


def _select(images: Tensor, labels: Tensor, classes: list[int], per_class: Optional[int]) -> tuple[Tensor, Tensor]:
    keep, local = [], []
    for i, c in enumerate(classes):
        idx = (labels == c).nonzero().squeeze(1)[:per_class]
        keep.append(idx)
        local.append(torch.full((len(idx),), i, dtype=torch.long))
    index = torch.cat(keep)
    return images[index], torch.cat(local)


def _load_data(config: StudyConfig) -> tuple[_Split, _Split]:
    if config.dataset == "fashion_mnist":
        from ..data import load_fashion_mnist

        (train_x, train_y), (test_x, test_y) = load_fashion_mnist(config.root)
    else:
        from ..data import split_digits

        (data,) = split_digits(n_tasks=1, seed=0)
        train_x, train_y, _ = data.train.tensors
        test_x, test_y, _ = data.test.tensors
    splits = []
    for classes in (config.base_classes, config.new_classes):
        tr = _select(train_x, train_y, classes, config.samples_per_class)
        te = _select(test_x, test_y, classes, config.test_per_class)
        splits.append(_Split(*tr, *te))
    return splits[0], splits[1]


def _build_model(config: StudyConfig) -> nn.Module:
    from ..models import SmallCNN, resnet18

    if config.model == "resnet18":
        return resnet18(len(config.base_classes), in_channels=1, nf=config.width)
    return SmallCNN(len(config.base_classes), in_channels=1, width=config.width)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def _accuracy(tail: nn.Module, head: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    correct = 0
    for i in range(0, len(labels), _EVAL_BATCH):
        logits = head(tail(inputs[i:i + _EVAL_BATCH]))
        correct += int((logits.argmax(1) == labels[i:i + _EVAL_BATCH]).sum())
    return 100.0 * correct / max(1, len(labels))


def _train_base(config: StudyConfig, model: nn.Module, data: _Split) -> None:
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.base_lr)
    model.train()
    for _ in range(config.base_epochs):
        for index in _batches(len(data.train_y), config.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(data.train_x[index]), data.train_y[index])
            loss.backward()
            optimizer.step()
    model.eval()


def train_new_task(
    model: nn.Module,
    head: nn.Linear,
    images: Tensor,
    labels: Tensor,
    *,
    depth: Optional[str],
    position: Optional[str],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    optimizer: Literal["adam", "sgd"] = "adam",
) -> dict[str, int]:
    """Fine-tune ``head`` on ``model``'s features and, with ``depth``, one tap of that stage's 3×3 convs, in place.

    Every other parameter and buffer of ``model`` stays as it is, bit for bit: all parameters are frozen,
    the model runs in eval mode (BatchNorm uses and keeps its running statistics), and the trained weights
    move only at the tap (:class:`TapMask`). The frozen stages before ``depth`` run
    once over ``images`` (their output is cached for all epochs).

    Args:
        model: a backbone of :func:`stages` (ResNet-18 or SmallCNN) whose features ``head`` reads.
        head: the new task's classifier (trained in full).
        images: training images of the new task.
        labels: their labels, ``0..head.out_features - 1``.
        depth: the stage whose 3×3 convs train (:func:`convs_in`); None trains the head only.
        position: a tap of :data:`POSITIONS` or ``"full"``; required with ``depth``.
        epochs: passes over the data.
        lr: learning rate.
        batch_size: batch size.
        seed: seed of the batch order.
        optimizer: ``adam`` (no weight decay) or ``sgd`` (momentum 0.9).

    Returns:
        ``{"trainable_parameters": ...}``: head parameters plus the trained tap elements.

    Raises:
        ValueError: ``depth`` is not a stage with 3×3 convs, or ``position`` is missing or unknown.
    """
    if depth is not None:
        convs_in(model, depth)
    model.requires_grad_(False)
    model.eval()
    before, tail = _split_at(model, depth)
    inputs = _run(before, images)
    return _fit(model, tail, head, inputs, labels, depth=depth, position=position, epochs=epochs, lr=lr,
                batch_size=batch_size, seed=seed, optimizer=optimizer)


def _fit(model: nn.Module, tail: nn.Module, head: nn.Linear, inputs: Tensor, labels: Tensor, *,
         depth: Optional[str], position: Optional[str], epochs: int, lr: float, batch_size: int,
         seed: int, optimizer: str = "adam") -> dict[str, int]:
    """:func:`train_new_task` on the cached input of stage ``depth`` (``tail`` = the stages from it on)."""
    if depth is not None and position not in _ALL_POSITIONS:
        raise ValueError(f"position={position!r} is not allowed with depth={depth!r}: use one of "
                         f"{', '.join(_ALL_POSITIONS)}")
    model.requires_grad_(False)
    model.eval()
    convs = convs_in(model, depth) if depth is not None else {}
    mask = TapMask(convs, position) if convs else None
    params = list(head.parameters()) + (mask.parameters() if mask else [])
    trainable = sum(p.numel() for p in head.parameters())
    for conv in convs.values():
        trainable += conv.weight.numel() if position == FULL else conv.weight[..., 0, 0].numel()
    if optimizer == "sgd":
        step: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    else:
        step = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    try:
        for _ in range(epochs):
            for index in _batches(len(labels), batch_size, generator):
                step.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(head(tail(inputs[index])), labels[index])
                loss.backward()
                step.step()
                if mask is not None:
                    mask.restore()
    finally:
        if mask is not None:
            mask.remove()
        model.requires_grad_(False)
        head.eval()
    return {"trainable_parameters": trainable}


# ---------------------------------------------------------------------------------------------- the study
_BASE_KEYS = ("dataset", "root", "base_classes", "samples_per_class", "model", "width", "base_epochs", "base_lr",
              "batch_size", "seed")


def _base_model(config: StudyConfig, base: _Split, out: Path) -> tuple[nn.Module, bool]:
    """The trained base-session model, from ``out/base.pt`` when its settings match; else trained and saved."""
    fingerprint = json.dumps({k: getattr(config, k) for k in _BASE_KEYS}, sort_keys=True)
    path = out / "base.pt"
    model = _build_model(config)
    if config.reuse_base and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            model.load_state_dict(saved["state_dict"])
            model.eval()
            return model, True
        logger.info("%s was trained with other base settings: training the base model again", path)
    torch.manual_seed(config.seed)
    model = _build_model(config)  # initial weights drawn under the seed
    _train_base(config, model, base)
    partial = path.with_suffix(".partial")
    torch.save({"fingerprint": fingerprint, "state_dict": model.state_dict()}, partial)
    os.replace(partial, path)
    return model, False


def _new_head(model: nn.Module, classes: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(model.feature_dim, classes)


@dataclass
class _Cached:
    """Outputs of the frozen stages before a depth: the new task's train/test inputs and the old test inputs."""

    new_train: Tensor
    new_test: Tensor
    old_test: Tensor


def _cache(model: nn.Module, depth: Optional[str], new: _Split, old: _Split) -> _Cached:
    before, _ = _split_at(model, depth)
    return _Cached(_run(before, new.train_x), _run(before, new.test_x), _run(before, old.test_x))


def _probe(config: StudyConfig, base_model: nn.Module, features: _Cached, new: _Split, seed: int) -> nn.Linear:
    """The new-task head every run of this seed starts from: fresh, or fitted on the frozen features."""
    head = _new_head(base_model, len(config.new_classes), seed)
    if config.probe_epochs:
        _fit(base_model, nn.Sequential(), head, features.new_train, new.train_y, depth=None, position=None,
             epochs=config.probe_epochs, lr=config.probe_lr, batch_size=config.batch_size, seed=seed)
    return head


def _one_run(config: StudyConfig, base_model: nn.Module, head: nn.Linear, cached: _Cached, new: _Split,
             old: _Split, depth: Optional[str], position: Optional[str], seed: int) -> dict[str, Any]:
    began = time.perf_counter()
    model = copy.deepcopy(base_model)
    head = copy.deepcopy(head)
    _, tail = _split_at(model, depth)
    info = _fit(model, tail, head, cached.new_train, new.train_y, depth=depth, position=position,
                epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=seed,
                optimizer=config.optimizer)
    return {
        "depth": depth, "position": position, "seed": seed,
        "new_acc": _accuracy(tail, head, cached.new_test, new.test_y),
        "old_acc": _accuracy(tail, model.head, cached.old_test, old.test_y),
        **info, "seconds": time.perf_counter() - began,
    }


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run the knowledge-intensity study and write its tables, JSON and heatmaps (see the module docstring).

    Args:
        config: the study's settings.

    Returns:
        The content of ``study.json``: ``config``, ``machine``, ``base`` (base model's old-task accuracy and
        the head-only reference), ``runs`` (one dict per depth × position × repeat: ``new_acc``, ``old_acc``,
        ``gained``, ``lost``, ``trainable_parameters``, ``seconds``), ``summary`` (per depth and position:
        mean/std of gained and lost) and ``seconds`` (wall time of the whole study).

    Raises:
        ValueError: a depth is not a module of the model or holds no 3×3 convolution (checked before any
            training).
        lightning_cskl.data.DataNotFoundError: Fashion-MNIST is not available.
    """
    began = time.perf_counter()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    probe = _build_model(config)
    for depth in config.depths:
        convs_in(probe, depth)  # fail on a bad depth before minutes of training
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    old, new = _load_data(config)
    base_began = time.perf_counter()
    base_model, reused = _base_model(config, old, out)
    base_seconds = time.perf_counter() - base_began
    base_old_acc = _accuracy(base_model, nn.Identity(), old.test_x, old.test_y)

    seeds = [config.seed + r for r in range(config.repeats)]
    plan = [(None, None, s) for s in seeds]
    plan += [(d, p, s) for d in config.depths for p in config.positions for s in seeds]
    from tqdm.auto import tqdm

    references: dict[int, float] = {}
    features = _cache(base_model, None, new, old)
    heads = {s: _probe(config, base_model, features, new, s) for s in seeds}
    probe_acc = [_accuracy(nn.Sequential(), heads[s], features.new_test, new.test_y) for s in seeds]
    runs: list[dict[str, Any]] = []
    bar = tqdm(plan, desc="study", unit="run", disable=not config.progress, dynamic_ncols=True)
    cached, cached_depth = None, object()
    for depth, position, seed in bar:
        bar.set_postfix_str("head only" if depth is None else f"{depth}/{position}/seed {seed}")
        if depth != cached_depth:  # the plan is ordered by depth: one cache at a time
            cached, cached_depth = (features if depth is None else _cache(base_model, depth, new, old)), depth
        run = _one_run(config, base_model, heads[seed], cached, new, old, depth, position, seed)
        if depth is None:
            references[seed] = run["new_acc"]
            reference = run
            continue
        run["gained"] = run["new_acc"] - references[seed]
        run["lost"] = base_old_acc - run["old_acc"]
        runs.append(run)
    bar.close()

    result: dict[str, Any] = {
        "config": asdict(config),
        "machine": _machine(),
        "base": {
            "old_acc": base_old_acc,
            "probe_new_acc": _mean(probe_acc),
            "head_only_new_acc": _mean([references[s] for s in seeds]),
            "head_only_new_acc_per_seed": [references[s] for s in seeds],
            "head_only_trainable_parameters": reference["trainable_parameters"],
            "reused_checkpoint": reused,
            "seconds": base_seconds,
        },
        "runs": runs,
        "summary": _summarise(runs, config),
        "definitions": {
            "new_acc": "accuracy (%) of the new-task head on the new classes' test images, argmax over new classes",
            "old_acc": "accuracy (%) of the frozen base head on the base classes' test images, argmax over base classes",
            "gained": "new_acc - new_acc of the head-only run (frozen backbone, same starting head and batches)",
            "lost": "old_acc of the base model - old_acc after the run",
        },
    }
    result["seconds"] = time.perf_counter() - began
    (out / "study.json").write_text(json.dumps(result, indent=2))
    (out / "study.md").write_text(format_markdown(result))
    for depth in config.depths:
        save_heatmaps(result, depth, out / f"heatmap_{depth.replace('.', '_')}.png")
    logger.info("study written to %s in %.0f s", out, result["seconds"])
    return result


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _summarise(runs: list[dict[str, Any]], config: StudyConfig) -> dict[str, dict[str, dict[str, float]]]:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for depth in config.depths:
        summary[depth] = {}
        for position in config.positions:
            group = [r for r in runs if r["depth"] == depth and r["position"] == position]
            summary[depth][position] = {
                "gained": _mean([r["gained"] for r in group]), "gained_std": _std([r["gained"] for r in group]),
                "lost": _mean([r["lost"] for r in group]), "lost_std": _std([r["lost"] for r in group]),
                "new_acc": _mean([r["new_acc"] for r in group]), "old_acc": _mean([r["old_acc"] for r in group]),
                "trainable_parameters": group[0]["trainable_parameters"],
            }
    return summary


# ---------------------------------------------------------------------------------------------- reports
def _cell(entry: dict[str, float], key: str, repeats: int) -> str:
    if repeats > 1:
        return f"{entry[key]:+.2f} ± {entry[key + '_std']:.2f}"
    return f"{entry[key]:+.2f}"


def _center_rank(entries: dict[str, dict[str, float]], key: str, reverse: bool) -> Optional[int]:
    taps = [p for p in POSITIONS if p in entries]
    if "center" not in taps:
        return None
    order = sorted(taps, key=lambda p: entries[p][key], reverse=reverse)
    return order.index("center") + 1


def _center_advantage(runs: list[dict[str, Any]], depth: str, repeats: int) -> str:
    """Gain of the center minus the mean gain of the other taps, paired by seed (same batches and head)."""
    differences = []
    for seed in sorted({r["seed"] for r in runs if r["depth"] == depth}):
        gains = {r["position"]: r["gained"] for r in runs if r["depth"] == depth and r["seed"] == seed}
        others = [gains[p] for p in POSITIONS if p in gains and p != "center"]
        if "center" in gains and others:
            differences.append(gains["center"] - _mean(others))
    if not differences:
        return "-"
    if repeats > 1:
        return f"{_mean(differences):+.2f} ± {_std(differences):.2f}"
    return _fmt(differences[0])


def format_markdown(result: dict[str, Any]) -> str:
    """The study's tables as Markdown: gained and lost per depth and position, and a per-depth summary."""
    config = result["config"]
    summary = result["summary"]
    repeats = config["repeats"]
    depths = config["depths"]
    positions = config["positions"]
    base = result["base"]
    lines = [
        f"Base model: {config['model']} (width {config['width']}), {config['dataset']}, base classes "
        f"{config['base_classes']}, new classes {config['new_classes']}; base old-task accuracy "
        f"{base['old_acc']:.2f}%. New-task head: "
        + (f"linear probe on the frozen base features ({config['probe_epochs']} epochs, Adam lr "
           f"{config['probe_lr']}: {base['probe_new_acc']:.2f}%), the start of every run"
           if config["probe_epochs"] else "freshly initialised in every run (same seed)")
        + f"; head-only run (the reference of 'gained'): {base['head_only_new_acc']:.2f}%. Study runs: "
        f"{config['epochs']} epoch(s), {config.get('optimizer', 'adam')} lr {config['lr']}, batch "
        f"{config['batch_size']}, {repeats} seed(s) from {config['seed']}" + (" (mean ± std)" if repeats > 1 else "") + ".",
    ]
    for key, title in (("gained", "**New-task accuracy gained** (points over the head-only run; higher = more "
                                  "knowledge intensity)"),
                       ("lost", "**Old-task accuracy lost** (points below the base model; lower = less forgetting)")):
        lines += ["", title, "", "| position | " + " | ".join(depths) + " |", "|---|" + "---|" * len(depths)]
        for position in positions:
            lines.append(f"| {position} | " + " | ".join(_cell(summary[d][position], key, repeats) for d in depths)
                         + " |")
    lines += ["", "**Per depth** (taps only; rank 1 = largest gain / smallest loss among the taps studied)", "",
              "| depth | trained elements per tap | best tap (gained) | center: rank by gain | center gained | "
              "mean edge gained | mean corner gained | center − mean of the other taps, gained (per seed) | "
              "center: rank by loss | full kernel gained / lost |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for depth in depths:
        entries = summary[depth]
        taps = [p for p in POSITIONS if p in entries]
        head_params = result["base"]["head_only_trainable_parameters"]
        tap_params = entries[taps[0]]["trainable_parameters"] - head_params if taps else None
        best = max(taps, key=lambda p: entries[p]["gained"]) if taps else "-"
        rank_gain = _center_rank(entries, "gained", reverse=True)
        rank_loss = _center_rank(entries, "lost", reverse=False)
        edges = [entries[p]["gained"] for p in _EDGES if p in entries]
        corners = [entries[p]["gained"] for p in _CORNERS if p in entries]
        full = entries.get(FULL)
        lines.append(
            f"| {depth} | {tap_params if tap_params is not None else '-'} | {best} | "
            f"{f'{rank_gain}/{len(taps)}' if rank_gain else '-'} | "
            f"{_fmt(entries['center']['gained']) if 'center' in entries else '-'} | "
            f"{_fmt(_mean(edges)) if edges else '-'} | {_fmt(_mean(corners)) if corners else '-'} | "
            f"{_center_advantage(result['runs'], depth, repeats)} | "
            f"{f'{rank_loss}/{len(taps)}' if rank_loss else '-'} | "
            f"{_fmt(full['gained']) + ' / ' + _fmt(full['lost']) if full else '-'} |"
        )
    base_time = result["base"].get("seconds")
    lines += ["", f"Study wall time: {result['seconds']:.0f} s"
              + (f" (base session: {base_time:.0f} s{', loaded' if result['base']['reused_checkpoint'] else ''})"
                 if base_time is not None else "") + f"; machine: {result['machine']['machine']}, "
              f"{result['machine']['cpus']} CPUs, {result['machine']['threads']} torch threads, torch "
              f"{result['machine']['torch']}.", ""]
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:+.2f}"


def save_heatmaps(result: dict[str, Any], depth: str, path: Union[str, os.PathLike]) -> None:
    """Write one depth's heatmap PNG: 3×3 panels of accuracy gained and lost per tap (full kernel in the title).

    Taps not studied are grey.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    entries = result["summary"][depth]
    figure, axes = plt.subplots(1, 2, figsize=(8.0, 4.0))
    for ax, key, cmap, label in ((axes[0], "gained", "viridis", "new-task accuracy gained (points)"),
                                 (axes[1], "lost", "magma_r", "old-task accuracy lost (points)")):
        grid = np.full((3, 3), np.nan)
        for position, (row, col) in POSITIONS.items():
            if position in entries:
                grid[row, col] = entries[position][key]
        colours = plt.get_cmap(cmap).with_extremes(bad="#dddddd")
        shown = np.ma.masked_invalid(grid)
        image = ax.imshow(shown, cmap=colours)
        finite = grid[np.isfinite(grid)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (row, col), value in np.ndenumerate(grid):
            if np.isfinite(value):
                dark = (value < middle) if cmap == "viridis" else (value > middle)
                ax.text(col, row, f"{value:+.2f}", ha="center", va="center", fontsize=9,
                        color="white" if dark else "black")
        ax.set_xticks(range(3), ["left", "middle", "right"])
        ax.set_yticks(range(3), ["top", "middle", "bottom"])
        full = entries.get(FULL)
        ax.set_title(f"{label}\nfull kernel: {full[key]:+.2f}" if full else label, fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    config = result["config"]
    figure.suptitle(f"{depth}: one tap of every 3×3 conv trained ({config['model']}, {config['dataset']})",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- entry point
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """``python -m lightning_cskl.experiments.study --config FILE.yaml [--key value ...]`` (the options of :class:`StudyConfig`)."""
    import sys

    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_cskl.experiments.study", description="the knowledge-intensity study")
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML config (configs/study_fmnist.yaml)")
    parser.add_class_arguments(StudyConfig, nested_key=None, fail_untyped=True)
    parsed = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    values = {k: v for k, v in parsed.as_dict().items() if k in StudyConfig.__dataclass_fields__}
    try:
        config = StudyConfig(**values)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_study(config)
    print((Path(config.output_dir) / "study.md").read_text())
    return result


if __name__ == "__main__":
    main()
