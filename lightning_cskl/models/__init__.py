"""Small reference backbones for examples, tests and benchmarks (our own, written for this package)."""

from .nets import MultiHead, SmallCNN, mobilenet_v2, resnet18

__all__ = ["MultiHead", "SmallCNN", "mobilenet_v2", "resnet18"]
