"""Backbones sized for CPU work: a small CNN for 8×8 digits, and slim ResNet-18 / MobileNetV2 for 28-32 px."""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Three 3×3 conv blocks with BatchNorm and a linear head.

    Args:
        num_classes: outputs of the head.
        in_channels: image channels.
        width: channels of the first block (the next two use 2× width).

    Example:
        >>> import torch
        >>> SmallCNN(10)(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(in_channels, width, 1), block(width, 2 * width, 2), block(2 * width, 2 * width, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = 2 * width
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MultiHead(nn.Module):
    """A backbone with one linear head per task (task-incremental learning).

    ``forward(x, task)`` uses head ``task``; every head sees the backbone's features.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, classes_per_task: list[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Linear(feature_dim, n) for n in classes_per_task)

    def forward(self, x: Tensor, task: int = 0) -> Tensor:
        return self.heads[task](self.backbone(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, nf: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        self.relu = nn.ReLU()
        stages, cin = [], nf
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = nf * 2**i
            stages.append(nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.pool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def resnet18(num_classes: int = 10, in_channels: int = 3, nf: int = 64) -> nn.Module:
    """CIFAR-style ResNet-18 (3×3 stem, no max-pool); ``nf=20`` is the slim variant of GPM.

    Example:
        >>> import torch
        >>> resnet18(5, nf=8)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 5])
    """
    return _ResNet(num_classes, in_channels, nf)


class ResNetFeatures(nn.Module):
    """A ResNet of :func:`resnet18` without its head, its layers under their own names (a backbone for the heads
    of :mod:`lightning_cskl.avalanche`).

    Example:
        >>> import torch
        >>> ResNetFeatures(resnet18(5, nf=8))(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 64])
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer4", "pool"):
            self.add_module(name, getattr(net, name))

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.pool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.residual else self.block(x)


def _divisible(value: float, divisor: int = 8) -> int:
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class _MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride) for 32×32 inputs: the first two strides of ImageNet's are 1
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int, in_channels: int, width: float) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, cin, 3, 1, 1, bias=False),
                                                 nn.BatchNorm2d(cin), nn.ReLU6())]
        for expand, channels, repeats, stride in self.SETTINGS:
            cout = _divisible(channels * width)
            for i in range(repeats):
                layers.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        last = _divisible(1280 * max(1.0, width))
        layers += [nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6())]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = last
        self.head = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """MobileNetV2 for 32×32 inputs (stride 1 stem).

    Example:
        >>> import torch
        >>> mobilenet_v2(4, width=0.25)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 4])
    """
    return _MobileNetV2(num_classes, in_channels, width)
