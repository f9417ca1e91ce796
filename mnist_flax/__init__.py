"""MNIST transfer learning from an ImageNet-pretrained MobileNetV2, in JAX and Flax NNX."""

__version__ = "0.1.0"
