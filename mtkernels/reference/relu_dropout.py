"""Reference `relu_dropout`: ReLU then inverted dropout whose keep decision is a hash of the
element's index and a seed (the spec of csrc/relu_dropout; readable int64 torch ops).

Element i (row-major index in x's shape) is kept when
``h(i) = fmix32(fmix32(lo(i) + lo(seed)) ^ (hi(i) + hi(seed))) >= threshold``, with
``threshold = min(round(p * 2**32), 2**32 - 1)``, fmix32 the 32-bit finaliser of MurmurHash3
(Appleby) and all sums and products modulo 2**32; kept values are scaled by
``2**32 / (2**32 - threshold)``, so ``E[y] = relu(x)`` exactly.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, constant: int) -> torch.Tensor:
    """``h * constant mod 2**32`` for int64 ``h`` in [0, 2**32), split so no int64 product overflows."""
    low = (h * (constant & 0xFFFF)) & _MASK32
    high = ((h * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    """The drop threshold on the 32-bit hash: ``min(round(p * 2**32), 2**32 - 1)`` (0 for p <= 0)."""
    t = float(p) * 4294967296.0
    if not t > 0.0:
        return 0
    return min(int(t + 0.5), _MASK32)


def dropout_scale(p: float) -> float:
    """The scale of kept values: ``2**32 / (2**32 - threshold)`` = 1 / (1 - the exact drop probability)."""
    return 4294967296.0 / (4294967296.0 - dropout_threshold(p))


def keep_mask(shape, seed: int, p: float, device=None) -> torch.Tensor:
    """Bool tensor of ``shape``: which elements `relu_dropout` keeps for this ``seed`` and ``p``."""
    n = 1
    for s in shape:
        n *= int(s)
    index = torch.arange(n, dtype=torch.int64, device=device)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    seed_lo, seed_hi = seed & _MASK32, seed >> 32
    h = _fmix32((index & _MASK32) + seed_lo & _MASK32)
    h = _fmix32(h ^ (((index >> 32) + seed_hi) & _MASK32))
    return (h >= dropout_threshold(p)).reshape(tuple(shape))


def relu_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``relu(x) * keep_mask(x.shape, seed, p) * dropout_scale(p)``; same shape and dtype as x."""
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    keep = keep_mask(x.shape, seed, p, x.device)
    return torch.where(keep, torch.relu(x) * dropout_scale(p), torch.zeros_like(x))


def relu_dropout_backward(grad_output: torch.Tensor, result: torch.Tensor, p: float) -> torch.Tensor:
    """Gradient of `relu_dropout` from its output alone: ``grad * scale`` where ``result > 0``, else 0."""
    return torch.where(result > 0, grad_output * dropout_scale(p), torch.zeros_like(grad_output))
