"""Full-kernel representations for the GPM / Adam-NSCL baselines: unfolded k×k input patches.

A 2-d convolution with weight ``W ∈ R^{D×C/g×k×k}`` computes, at every output position, ``W_g · x`` where
``x ∈ R^{C/g·k²}`` is the unfolded input patch of group ``g`` (channel-major, then kernel row, then column:
the order of ``W.reshape(D, -1)``). Protecting old tasks for the whole kernel therefore needs the
``(C/g·k²)×(C/g·k²)`` covariance of those patches, against ``C/g × C/g`` for the center alone (METHOD.md §3):
this module is the expensive side of that comparison, written with the same conventions as
:mod:`~lightning_cskl.core.covariance` and reusing :mod:`~lightning_cskl.core.projection` for the math.

Example:
    >>> conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    >>> patches = unfold_patches(torch.randn(4, 2, 5, 5), conv)
    >>> patches.shape                                 # (N·positions, groups, C/g·k²)
    torch.Size([100, 1, 18])
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.covariance import CovarianceCollector
from ..core.projection import ProjectionCriterion, layer_projector, project_update

__all__ = [
    "FullKernelCovariance",
    "change_bound",
    "conv_output_change",
    "full_kernel_projector",
    "patch_covariance",
    "project_kernel_update",
    "protected_basis",
    "unfold_patches",
    "validate_full_kernel_conv",
]


def validate_full_kernel_conv(name: str, module: nn.Module) -> nn.Conv2d:
    """Return ``module`` if its input patches can be unfolded (a zero-padded ``nn.Conv2d`` with int padding).

    Raises:
        ValueError: naming the layer, what it is, and what is allowed.
    """
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"layer {name!r} is a {type(module).__name__}: full-kernel projection needs an nn.Conv2d")
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise ValueError(
            f"layer {name!r} has padding={module.padding!r}, padding_mode={module.padding_mode!r}: full-kernel "
            "projection needs integer zero padding"
        )
    return module


def unfold_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The input patch of every output position, per group: shape ``(N·L, groups, C/g·k²)``.

    ``conv(x)`` without bias equals ``einsum("ngm,gdm->ngd", patches, W.reshape(groups, D/g, -1))``.
    """
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, C·k², L)
    n, ck, positions = cols.shape
    return cols.transpose(1, 2).reshape(n * positions, conv.groups, ck // conv.groups)


def patch_covariance(x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, int]:
    """Sum of ``p pᵀ`` over the patches ``p`` of ``x`` (``(groups, m, m)``, float64) and their number."""
    patches = unfold_patches(x.detach(), conv).to(torch.float64)
    return torch.einsum("ngi,ngj->gij", patches, patches), patches.shape[0]


class FullKernelCovariance(CovarianceCollector):
    """Collects the mean patch covariance ``(1/N) Σ p pᵀ`` of named convolutions with forward hooks: the
    C·k²-dimensional representation of full-kernel GPM / Adam-NSCL, where CsKO keeps only the center's C.

    Args:
        layers: qualified name -> ``nn.Conv2d``.

    Example:
        >>> conv = nn.Conv2d(1, 2, 3, bias=False)
        >>> collector = FullKernelCovariance({"conv": conv})
        >>> with collector.hooked():
        ...     _ = conv(torch.randn(3, 1, 4, 4))
        >>> collector.covariances()["conv"].shape
        torch.Size([1, 9, 9])
    """

    def __init__(self, layers: dict[str, nn.Conv2d]) -> None:
        super().__init__({name: validate_full_kernel_conv(name, conv) for name, conv in layers.items()})

    def statistic(self, name: str, module: nn.Module, x: Tensor, output: Tensor) -> tuple[Tensor, int]:
        return patch_covariance(x, self.layers[name])

    def covariances(self) -> dict[str, Tensor]:
        """Mean covariance per layer (float32 as CsKO's, on the CPU); layers that saw no input are left out.

        Accumulated in float64, stored in float32 like :class:`CovarianceCollector`'s, so that the projection
        state of the GPM / Adam-NSCL baselines and of CsKO is counted alike (the free_bases decompose in float64).
        """
        return {name: (self.sums[name] / self.counts[name]).to(torch.float32).cpu()
                for name in self.sums if self.counts[name]}


def full_kernel_projector(
    cov: Tensor,
    criterion: ProjectionCriterion = "null_space",
    null_space_factor: float = 5.0,
    energy: float = 0.97,
) -> tuple[Tensor, Tensor]:
    """Free bases ``(groups, m, r)`` of a full-kernel covariance ``(groups, m, m)``, every coordinate selected.

    The criteria are those of :func:`~lightning_cskl.core.projection.layer_projector`.
    """
    selected = torch.ones(cov.shape[0] * cov.shape[1], dtype=torch.bool)
    return layer_projector(cov, selected, criterion, null_space_factor, energy, "selected")


def protected_basis(free: Tensor) -> Tensor:
    """The orthonormal complement ``(groups, m, m − r)`` of free bases ``(groups, m, r)`` (zero-padded columns
    allowed): the directions old tasks use. ``ΔW − ΔW B Bᵀ`` with it equals ``ΔW U Uᵀ`` with the free bases,
    and is the cheaper product when ``r > m / 2`` (GPM's published code projects this way).

    Example:
        >>> free = torch.eye(4)[:, :3].unsqueeze(0)            # 3 free directions of 4
        >>> protected_basis(free).abs().squeeze().tolist()       # the one direction left
        [0.0, 0.0, 0.0, 1.0]
    """
    groups, m, _ = free.shape
    identity = torch.eye(m, dtype=torch.float64)
    complements = []
    for g in range(groups):
        u = free[g].to(torch.float64)
        values, vectors = torch.linalg.eigh(identity - u @ u.T)
        complements.append(vectors[:, values > 0.5])
    width = max((c.shape[1] for c in complements), default=0)
    out = torch.zeros(groups, m, width, dtype=torch.float64)
    for g, c in enumerate(complements):
        out[g, :, : c.shape[1]] = c
    return out.to(free.dtype)


def project_kernel_update(update: Tensor, basis: Tensor, protected: bool = False) -> Tensor:
    """Project a whole-kernel update ``(D, C/g, kh, kw)`` onto free bases ``(groups, C/g·kh·kw, r)``: ``ΔW U Uᵀ``;
    with ``protected=True`` ``basis`` holds the directions to remove instead (:func:`protected_basis`):
    ``ΔW − ΔW B Bᵀ``."""
    flat = update.reshape(update.shape[0], -1)
    projected = flat - project_update(flat, basis) if protected else project_update(flat, basis)
    return projected.reshape(update.shape)


def conv_output_change(old_inputs: Tensor, conv: nn.Conv2d, update: Tensor) -> float:
    """Mean over patches of ``‖ΔW_g p‖²`` (summed over output channels): how much ``update`` changes the
    conv's output on ``old_inputs``. Equals ``tr(ΔW Σ ΔWᵀ)`` with ``Σ`` the mean patch covariance."""
    patches = unfold_patches(old_inputs.detach(), conv).to(torch.float64)
    g = conv.groups
    delta = update.detach().to(torch.float64).reshape(g, update.shape[0] // g, -1)
    return float(torch.einsum("ngm,gdm->ngd", patches, delta).pow(2).sum(dim=(1, 2)).mean())


def change_bound(cov: Tensor, basis: Tensor, update: Tensor) -> float:
    """``λ_max(free) · ‖ΔW‖²``: the largest mean-square output change a projected update may cause, where
    ``λ_max(free)`` is the largest eigenvalue of ``Σ`` restricted to the free bases (per group)."""
    b = basis.to(torch.float64)
    restricted = b.transpose(1, 2) @ cov.to(torch.float64) @ b  # (groups, r, r)
    top = max((torch.linalg.eigvalsh(r).max().item() if r.numel() else 0.0) for r in restricted)
    return top * float(update.detach().to(torch.float64).pow(2).sum())
