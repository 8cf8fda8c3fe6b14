"""A small conv net and low-rank data shared by the engine tests on the CPU and on CUDA (plain torch)."""

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.head(x.mean((2, 3)))


def low_rank_data(n: int, seed: int, rank: int = 2) -> torch.Tensor:
    """Images whose channel vectors live in a `rank`-dimensional subspace: old tasks leave a null space."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(3, rank, generator=g)
    coeff = torch.randn(n, rank, 6, 6, generator=g)
    return torch.einsum("cr,nrhw->nchw", basis, coeff)


def tiny_net() -> nn.Sequential:
    """Three conv-BN-ReLU blocks and a linear head: what the cost-accounting tests measure."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
