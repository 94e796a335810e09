"""Loading the native extension and reporting what was built.

The compiled ops register themselves with the PyTorch dispatcher when `mtkernels._C` is imported.
When the extension is missing (not built, or built against another torch), every op falls back to
its pure-PyTorch reference in `mtkernels.reference`; `info()` says which path is active.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

__version__ = "0.1.0"

try:
    from . import _C  # noqa: F401  (registers torch.ops.mtkernels.*)

    NATIVE = True
    _IMPORT_ERROR = None
except ImportError as exc:  # not built, or an ABI mismatch with the installed torch
    _C = None
    NATIVE = False
    _IMPORT_ERROR = str(exc)
    if os.environ.get("MTKERNELS_REQUIRE_NATIVE", "0") == "1":
        raise
    warnings.warn(
        f"mtkernels: native extension not available ({exc}); using the pure-PyTorch reference ops",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernel(op: str, device: str = "cpu") -> bool:
    """True when the native op `mtkernels::<op>` has a kernel for `device` ("cpu" or "cuda")."""
    if not NATIVE:
        return False
    return _has_kernel(op, torch.device(device).type)


@functools.lru_cache(maxsize=None)
def _has_kernel(op: str, device_type: str) -> bool:
    # cached: the kernels are registered once, when the extension loads, and the training ops ask
    # on every call (a dispatcher lookup each time was ~4 per training step)
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"mtkernels::{op}", key)
    except RuntimeError:
        return False


OPS = ("catalogue_score", "embedding_bags", "ensemble_topk", "expert_gate_mixture", "gated_mixture", "multi_task_score", "relu_dropout")
# Ops with no CUDA kernel by design (their reference runs on a GPU): the CUDA build check skips them.
CPU_ONLY_OPS = ("catalogue_score", "expert_gate_mixture", "gated_mixture", "relu_dropout")


def info() -> dict:
    """Build and runtime facts: version, torch version, native ops and CUDA built in, threads.

    Returns:
        dict with keys ``version``, ``torch``, ``native`` (extension loaded), ``cuda_built``
        (CUDA kernels compiled in), ``cuda_available``, ``openmp``, ``threads``, and ``ops``
        mapping each op to the devices it has a native kernel for (``[]``: reference fallback),
        ``cpu_only_ops``: the ops that have no CUDA kernel by design.
    """
    return {
        "version": __version__,
        "torch": torch.__version__,
        "native": NATIVE,
        "native_error": _IMPORT_ERROR,
        "torch_built_against": _C.torch_version_built_against() if NATIVE else None,
        "cuda_built": bool(NATIVE and _C.built_with_cuda()),
        "cuda_available": torch.cuda.is_available(),
        "openmp": bool(NATIVE and _C.built_with_openmp()),
        "threads": torch.get_num_threads(),
        "ops": {op: [d for d in ("cpu", "cuda") if has_kernel(op, d)] for op in OPS},
        "cpu_only_ops": list(CPU_ONLY_OPS),
    }
