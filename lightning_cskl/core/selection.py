"""Dynamic Channel Element Selection (DCES): which input channels of a layer's center may change this task.

A layer's center weight is viewed as ``(groups, D/groups, C/groups)``. The score of input channel ``c`` is
the mean over the output channels that read it of ``|G[d, c]|``, where ``G`` is the center gradient summed
over the task's first batches (taken before any center weight moves).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["SelectionCriterion", "channel_scores", "select_channels", "validate_channel_ratio"]

SelectionCriterion = Literal["gradient", "magnitude", "random"]


def validate_channel_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float if it lies in (0, 1], else raise a ValueError quoting it."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"channel_ratio={ratio!r} is not allowed: it must be a number in (0, 1]")
    return float(ratio)


def channel_scores(center: Tensor, groups: int) -> Tensor:
    """Per-input-channel score ``I_c = mean_d |center[d, c]|``.

    Args:
        center: a center gradient sum (DCES) or center weight (magnitude criterion), shape ``(D, C/groups)``.
        groups: the convolution's groups.

    Returns:
        Scores of shape ``(C,)``, input channels in the convolution's order.

    Example:
        >>> channel_scores(torch.tensor([[1.0, -3.0], [3.0, 1.0]]), groups=1)
        tensor([2., 2.])
    """
    d, cg = center.shape
    per_group = center.detach().abs().reshape(groups, d // groups, cg)
    return per_group.mean(dim=1).reshape(groups * cg)


def select_channels(scores: Tensor, ratio: float) -> Tensor:
    """Boolean mask of the ``round(ratio * C)`` highest-scoring channels (at least one).

    Ties go to the lower channel index, so the choice is deterministic.

    Example:
        >>> select_channels(torch.tensor([0.1, 0.9, 0.5, 0.3]), 0.5)
        tensor([False,  True,  True, False])
    """
    ratio = validate_channel_ratio(ratio)
    count = scores.numel()
    keep = min(count, max(1, int(round(ratio * count))))
    order = torch.sort(scores.detach().to(torch.float64).cpu(), descending=True, stable=True).indices
    mask = torch.zeros(count, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.to(scores.device)
