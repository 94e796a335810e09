"""mtkernels: fused CPU/CUDA kernels for multi-task recommendation, as PyTorch ops.

- `mtkernels.ops`: `embedding_bags`, `multi_task_score`, `ensemble_topk` (native, with autograd
  and fake kernels); `mtkernels.reference`: their pure-PyTorch specifications (also the fallback).
- `mtkernels.info()`: what was built and which path runs.
"""

from ._extension import __version__, info
from . import ops, reference
from .jagged import KeyedJaggedTensor

__all__ = ["__version__", "info", "ops", "reference", "KeyedJaggedTensor"]
