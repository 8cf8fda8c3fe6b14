"""Free subspace of old-task center inputs and projection of center-weight updates onto it.

For the selected channels ``S`` of a layer, the covariance ``Σ[S, S]`` of old-task center inputs is
eigendecomposed (block by block for grouped convolutions: the matrix is block diagonal, so its spectrum is
the union of the blocks' spectra). Eigenvectors with small eigenvalues span directions old inputs barely
excite (the free subspace); an update ``ΔW[:, S] ← ΔW[:, S] · U_free U_freeᵀ`` then changes old-task outputs
by at most ``λ_max(free) · ‖ΔW‖²`` in mean square. Unselected channels get zero update.

Two criteria choose the free eigenvectors:

* ``"null_space"`` (Adam-NSCL): ``λ ≤ θ · λ_min`` (plus a numerical floor ``rtol · λ_max``), and never above
  ``NULL_SPACE_MAX_SHARE · λ_max`` (without that cap a flat spectrum, such as the single input channel of a
  grayscale network's first convolution, leaves every direction free). ``λ_min`` is
  that of ``Σ[S, S]`` (``null_space_reference="selected"``, the research code's rule) or of the layer's whole
  ``Σ`` (``"layer"``: stricter, since a principal submatrix's eigenvalues never fall below the whole
  matrix's ``λ_min``).
* ``"energy"`` (GPM): protect the largest eigenvectors that together hold a fraction ``ε`` of the energy;
  the rest are free.

* ``"relative"``: ``λ ≤ relative_threshold · λ_max``: a threshold on the energy old inputs put in a direction
  compared with the strongest one, rather than with the weakest (which is often a dead channel's zero).
* ``"scaled"`` (SGP, Saha & Roy 2023): no direction is cut; the update along each eigenvector is scaled by
  ``1 − importance``, ``importance = α λ / ((α − 1) λ + λ_max)`` with ``α = importance_scale``: the most used
  direction does not move, unused ones move freely, the rest in between. The basis columns carry
  ``sqrt(1 − importance)``, so ``ΔW U Uᵀ`` applies the scaling with the same two matrix products.

All are taken over the whole layer, so a depthwise layer (one channel per group) frees the channels whose
old-task energy is small instead of every channel.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

__all__ = [
    "ProjectionCriterion", "direction_scales", "free_basis", "free_mask", "layer_projector", "project_taps",
    "project_update",
    "NULL_SPACE_MAX_SHARE", "NULL_SPACE_RTOL",
]

ProjectionCriterion = Literal["null_space", "energy", "relative", "scaled"]

#: eigenvalues below ``NULL_SPACE_RTOL * λ_max`` count as zero (float32 covariances are not exact)
NULL_SPACE_RTOL = 1e-6
#: the null-space rule never frees a direction holding more than this share of the strongest one's energy: with a
#: flat spectrum (a 1-channel input, whitened features) ``θ · λ_min`` reaches ``λ_max`` and would free everything
NULL_SPACE_MAX_SHARE = 0.1


def free_mask(
    eigenvalues: Tensor,
    criterion: ProjectionCriterion = "null_space",
    null_space_factor: float = 5.0,
    energy: float = 0.97,
    reference: Optional[tuple[float, float]] = None,
    relative_threshold: float = 1e-2,
) -> Tensor:
    """Which eigenvalues (any order, clamped at 0) belong to free directions (``"scaled"``: every one).

    Args:
        eigenvalues: eigenvalues of a covariance (one layer's, possibly gathered from several blocks).
        criterion: ``"null_space"``, ``"energy"``, ``"relative"`` or ``"scaled"``.
        null_space_factor: θ (free if ``λ ≤ θ λ_min``).
        energy: ε, the fraction of energy protected, in [0, 1].
        reference: ``(λ_min, λ_max)`` the null-space threshold is relative to; default: those given.
        relative_threshold: free if ``λ ≤ relative_threshold · λ_max`` (``"relative"``).

    Example:
        >>> free_mask(torch.tensor([100.0, 0.1, 0.4, 10.0]))
        tensor([False,  True,  True, False])
    """
    values = eigenvalues.clamp_min(0)
    if values.numel() == 0 or values.max() <= 0:
        return torch.ones_like(values, dtype=torch.bool)
    if criterion == "null_space":
        low, high = (values.min().item(), values.max().item()) if reference is None else reference
        return values <= min(max(null_space_factor * low, NULL_SPACE_RTOL * high), NULL_SPACE_MAX_SHARE * high)
    if criterion == "relative":
        return values <= relative_threshold * values.max()
    if criterion == "scaled":
        return torch.ones_like(values, dtype=torch.bool)
    if criterion == "energy":
        order = torch.argsort(values)
        # ascending: the free ones are the smallest whose energy adds up to at most 1 - ε
        share = torch.cumsum(values[order], 0) / values.sum()
        free = torch.zeros_like(values, dtype=torch.bool)
        free[order] = share <= (1.0 - energy) + 1e-12
        return free
    raise ValueError(f"criterion={criterion!r} is not allowed: use 'null_space', 'energy', 'relative' or 'scaled'")


def direction_scales(eigenvalues: Tensor, importance_scale: float) -> Tensor:
    """SGP's ``1 − importance`` per eigenvalue: ``importance = α λ / ((α − 1) λ + λ_max)``, α ≥ 1.

    Example:
        >>> direction_scales(torch.tensor([4.0, 1.0, 0.0]), importance_scale=1.0)
        tensor([0.0000, 0.7500, 1.0000])
    """
    values = eigenvalues.clamp_min(0)
    top = values.max() if values.numel() else values.new_tensor(0.0)
    if values.numel() == 0 or top <= 0:
        return torch.ones_like(values)
    importance = importance_scale * values / ((importance_scale - 1.0) * values + top)
    return (1.0 - importance).clamp(0.0, 1.0)


def free_basis(
    cov: Tensor,
    criterion: ProjectionCriterion = "null_space",
    null_space_factor: float = 5.0,
    energy: float = 0.97,
    reference: Optional[tuple[float, float]] = None,
) -> tuple[Tensor, Tensor]:
    """Orthonormal basis of the free subspace of one symmetric PSD matrix.

    Returns:
        ``(basis, eigenvalues)``: ``basis`` of shape ``(n, r)`` (orthonormal columns) and the ``n``
        eigenvalues in ascending order. A zero covariance (no old task) leaves everything free.

    Example:
        >>> basis, _ = free_basis(torch.diag(torch.tensor([4.0, 0.0])))
        >>> basis.abs().squeeze(1)
        tensor([0., 1.], dtype=torch.float64)
    """
    eigenvalues, eigenvectors = _eigh(cov)
    free = free_mask(eigenvalues, criterion, null_space_factor, energy, reference)
    return eigenvectors[:, free], eigenvalues.clamp_min(0)


def _eigh(cov: Tensor) -> tuple[Tensor, Tensor]:
    if cov.shape[0] == 0:
        return cov.new_zeros(0, dtype=torch.float64), cov.new_zeros(0, 0, dtype=torch.float64)
    sym = cov.to(torch.float64)
    return torch.linalg.eigh((sym + sym.T) / 2)


def layer_projector(
    cov: Tensor,
    selected: Tensor,
    criterion: ProjectionCriterion = "null_space",
    null_space_factor: float = 5.0,
    energy: float = 0.97,
    null_space_reference: Literal["layer", "selected"] = "selected",
    relative_threshold: float = 1e-2,
    importance_scale: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """Bases of the free subspace of each group's selected channels.

    Args:
        cov: ``(groups, C/g, C/g)`` covariance of old-task center inputs.
        selected: ``(C,)`` boolean channel mask.
        criterion, null_space_factor, energy, relative_threshold: see :func:`free_mask`; thresholds use the
            whole layer's spectrum.
        null_space_reference: ``"selected"``: ``λ_min`` of ``Σ[S, S]``; ``"layer"``: of the whole ``Σ``.
        importance_scale: α of the ``"scaled"`` criterion (:func:`direction_scales`); its basis columns carry
            ``sqrt(1 − importance)`` and ``free_dims`` counts the directions whose scale exceeds 1/2.

    Returns:
        ``(basis, free_dims)``: ``basis`` of shape ``(groups, C/g, r)`` with orthonormal columns embedded in
        the selected channels (zero rows elsewhere; zero columns pad groups with fewer free directions), so
        that ``U Uᵀ`` projects onto the free part of ``Σ[S, S]`` (channel restriction uses ``Σ[S, S]``, never
        a mask after a full projection); ``free_dims`` of shape ``(groups,)``.

    Example:
        >>> cov = torch.tensor([[[2.0, 1.9, 0.0], [1.9, 2.0, 0.0], [0.0, 0.0, 0.1]]])
        >>> basis, free = layer_projector(cov, torch.tensor([True, True, False]), null_space_factor=1.0)
        >>> free.tolist(), basis.shape
        ([1], torch.Size([1, 3, 1]))
    """
    groups, cg, _ = cov.shape
    selected = selected.reshape(groups, cg).cpu()
    cov = cov.detach().cpu()
    decompositions = []
    for g in range(groups):
        index = selected[g].nonzero().squeeze(1)
        decompositions.append((index, *_eigh(cov[g][index][:, index])))
    values = torch.cat([d[1] for d in decompositions]).clamp_min(0)
    reference = None
    if criterion == "null_space" and null_space_reference == "layer":
        whole = torch.cat([torch.linalg.eigvalsh(cov[g].to(torch.float64)) for g in range(groups)]).clamp_min(0)
        reference = (whole.min().item(), whole.max().item())
    free = free_mask(values, criterion, null_space_factor, energy, reference, relative_threshold)
    sizes = [len(d[0]) for d in decompositions]
    scales = direction_scales(values, importance_scale).split(sizes) if criterion == "scaled" else None
    free_dims = torch.zeros(groups, dtype=torch.long)
    chunks = free.split(sizes)
    for g, mask in enumerate(chunks):
        free_dims[g] = int((scales[g] > 0.5).sum()) if scales is not None else int(mask.sum())
    width = max((int(mask.sum()) for mask in chunks), default=0)
    basis = torch.zeros(groups, cg, width, dtype=torch.float64)
    for g, ((index, _, vectors), mask) in enumerate(zip(decompositions, chunks)):
        count = int(mask.sum())
        if count:
            columns = vectors[:, mask]
            if scales is not None:
                columns = columns * scales[g][mask].sqrt()
            basis[g, index, :count] = columns
    return basis, free_dims


def project_update(update: Tensor, basis: Tensor) -> Tensor:
    """Project a center update ``(D, C/g)`` onto per-group free bases ``(groups, C/g, r)``: ``ΔW U Uᵀ``.

    Costs ``4·D·(C/g)·r`` multiply-adds instead of ``2·D·(C/g)²`` for a dense projector.
    """
    groups, cg, rank = basis.shape
    d = update.shape[0]
    if rank == 0:
        return torch.zeros_like(update)
    grouped = update.reshape(groups, d // groups, cg)
    basis = basis.to(update.dtype)
    return torch.bmm(torch.bmm(grouped, basis), basis.transpose(1, 2)).reshape(d, cg)


def project_taps(update: Tensor, basis: Tensor) -> Tensor:
    """Project the input-channel axis of every tap of a kernel update ``(D, C/g, *k)`` onto per-group free bases
    ``(groups, C/g, r)`` (:func:`project_update` applied tap by tap)."""
    d, cg = update.shape[:2]
    taps = update.movedim(1, -1).reshape(d, -1, cg)  # (D, taps, C/g): rows of one group stay contiguous
    projected = project_update(taps.reshape(-1, cg), basis).reshape(taps.shape)
    return projected.movedim(-1, 1).reshape(update.shape)
