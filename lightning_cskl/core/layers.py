"""Which modules a task trains: the convolutions whose centers train (``layers``) and the modules trained fully
beside them (``train_also``, by default the classifier head). Resolved once, when a model is bound, with errors
that name the offending value; the model is never changed here. Imports torch only.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    >>> resolve_layers(net, "all"), resolve_train_also(net, "auto", ["0", "2"])
    (['0', '2'], ['4'])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

from torch import nn

from .center import is_eligible_conv

__all__ = ["NoEligibleLayerError", "refuse_reparametrized", "resolve_layers", "resolve_train_also"]


class NoEligibleLayerError(ValueError):
    """The layer specification selects no convolution that can train its center."""


def _candidate_convs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions in registration order (a module registered twice counts once, under its first name)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.modules.conv._ConvNd)]


def _matches(spec: str | list[str], name: str) -> bool:
    if isinstance(spec, list):
        return name in spec
    return re.fullmatch(spec, name) is not None


def resolve_layers(model: nn.Module, layers: str | list[str]) -> list[str]:
    """Qualified names of the convolutions that ``layers`` selects, in registration order.

    Raises:
        NoEligibleLayerError: nothing eligible is selected, a listed name is not a convolution of the model,
            or a selected convolution has an even kernel or is transposed.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1))
        >>> resolve_layers(net, "auto")
        ['0', '2']
        >>> resolve_layers(net, r"[02]")
        ['0', '2']
    """
    convs = _candidate_convs(model)
    eligible = [(n, m) for n, m in convs if is_eligible_conv(m)]
    if not eligible:
        raise NoEligibleLayerError(
            f"{type(model).__name__} has no convolution that can train its center: CsKO needs nn.Conv1d/2d/3d "
            f"layers whose kernel is odd in every dimension (found {len(convs)} convolution(s), none eligible)"
        )
    if layers == "all":
        return [n for n, _ in eligible]
    if layers == "auto":
        # the deepest eighth (rounded down, at least two) of the k×k convolutions: the center matters most in
        # deep layers (on a ResNet-18 these are the last block's two convs, the research code's choice);
        # 1×1 convolutions (all center, so the whole weight would train) only when there is no k×k one
        spatial = [n for n, m in eligible if any(k > 1 for k in m.kernel_size)]
        pool = spatial or [n for n, m in eligible if m.groups == 1] or [n for n, _ in eligible]
        count = min(len(pool), max(2, len(pool) // 8))
        return pool[-count:]
    names = {n for n, _ in convs}
    if isinstance(layers, list):
        missing = [n for n in layers if n not in names]
        if missing:
            shown = ", ".join(n for n, _ in eligible[:12]) + (" ..." if len(eligible) > 12 else "")
            raise NoEligibleLayerError(
                f"layers lists {missing} which are not convolutions of {type(model).__name__}; "
                f"eligible convolutions are: {shown}"
            )
    chosen = [(n, m) for n, m in convs if _matches(layers, n)]
    if not chosen:
        shown = ", ".join(n for n, _ in eligible[:12]) + (" ..." if len(eligible) > 12 else "")
        raise NoEligibleLayerError(
            f"layers={layers!r} matches no convolution of {type(model).__name__} (a string other than 'auto' or "
            f"'all' is a regex matched in full against qualified names); eligible convolutions are: {shown}"
        )
    for n, m in chosen:
        if not is_eligible_conv(m):
            raise NoEligibleLayerError(
                f"layer {n!r} ({type(m).__name__}, kernel_size={tuple(m.kernel_size)}) cannot train its center: "
                "only nn.Conv1d/2d/3d with an odd kernel in every dimension are allowed"
            )
    return [n for n, _ in chosen]


def refuse_reparametrized(name: str, conv: nn.Module) -> None:
    """A weight computed from other parameters (weight norm, spectral norm, any parametrization) cannot have
    its center moved out and folded back."""
    from torch.nn.utils import parametrize

    hooked = any(type(hook).__name__ in ("WeightNorm", "SpectralNorm") for hook in conv._forward_pre_hooks.values())
    if parametrize.is_parametrized(conv) or hooked:
        raise NoEligibleLayerError(
            f"layer {name!r} has a reparametrized weight (weight norm, spectral norm or a parametrization): its "
            "center cannot be trained apart; remove the reparametrization or leave the layer out of `layers`"
        )


def resolve_train_also(model: nn.Module, spec: Optional[str | list[str]], trained: Sequence[str] = ()) -> list[str]:
    """Qualified names of the modules that ``train_also`` trains fully besides the centers.

    ``"auto"`` is the classifier head: the last child module (in registration order) that has parameters,
    descending into it while it holds one of the ``trained`` convolutions. On a ResNet that is ``fc`` / ``head``;
    on a LightningModule wrapping a network, the network's head; on a multi-head model, the module holding every
    head; on SqueezeNet, its classifier of a 1×1 convolution; never the MLPs inside ConvNeXt's blocks. A network
    that ends in a trained convolution has none.

    Raises:
        ValueError: a listed name or a regex matches no module of ``model``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> resolve_train_also(net, "auto", trained=["0"]), resolve_train_also(net, ["0"])
        (['2'], ['0'])
    """
    if spec is None:
        return []
    if spec == "auto":
        node, prefix = model, ""
        while True:
            children = [(name, child) for name, child in node.named_children()
                        if any(True for _ in child.parameters())]
            if not children:
                return []  # the network ends in a trained convolution: it has no head besides it
            name, child = children[-1]
            qualified = f"{prefix}{name}"
            if qualified in trained:
                return []
            if not any(t.startswith(qualified + ".") for t in trained):
                return [qualified]
            node, prefix = child, qualified + "."
    modules = [n for n, _ in model.named_modules() if n]
    if isinstance(spec, list):
        missing = [n for n in spec if n not in modules]
        if missing:
            raise ValueError(f"train_also lists {missing}, which are not modules of {type(model).__name__}")
        return list(spec)
    names = [n for n in modules if _matches(spec, n)]
    if not names:
        raise ValueError(f"train_also={spec!r} matches no module of {type(model).__name__} (a string other than "
                         "'auto' is a regex matched in full against qualified names)")
    return names
