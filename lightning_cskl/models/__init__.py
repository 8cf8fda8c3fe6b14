"""Small reference backbones for examples, tests and benchmarks (our own, written for this package)."""

from .nets import MultiHead, ResNetFeatures, SmallCNN, mobilenet_v2, resnet18

__all__ = ["MultiHead", "ResNetFeatures", "SmallCNN", "mobilenet_v2", "resnet18"]
