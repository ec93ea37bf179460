"""xception-ops: fused depthwise-separable convolution kernels for PyTorch, and the paper's Xception on them."""

from . import _library, backend, batchnorm, models, nn, ops
from .fuse import fuse
from .ops import depthwise_conv2d, separable_conv2d
from .version import __version__

__all__ = ["__version__", "backend", "batchnorm", "depthwise_conv2d", "fuse", "models", "nn", "ops",
           "separable_conv2d"]
