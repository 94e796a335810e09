"""Checkpoints: one file per run, written atomically, that resumes training and serves requests.

A checkpoint is a dict saved with ``torch.save``:

    format            "mtkernels.checkpoint/1"
    model_class       "module:QualName" of the model (rebuilt with ``from_config(model_config)``)
    model_config      the model's plain, JSON-serialisable ``config``
    model_state       the latest weights (``state_dict``; fused-optimizer state included)
    best_model_state  the weights of the best validation epoch (what evaluate/recommend use; with
                      weight averaging, the averaged weights)
    train_config      the TrainConfig as a dict
    trainer           optimiser, loss weighting, RNG, early-stopping and weight-average state (to
                      resume exactly; `weight_average`: {decay, num_updates, parameters by name})
    history           per-epoch records (loss, validation metrics, seconds)
    tasks             [{"name", "kind"}, ...]
    serving           id maps, seen items, titles, popularity, user/item feature tables (the Ranker)

The write goes to a temporary file in the destination folder, is flushed to disk and then renamed
over the destination with ``os.replace``, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import pickle
import tempfile
from typing import Any, Dict

import torch

FORMAT = "mtkernels.checkpoint/1"


def strict_json(value: Any) -> str:
    """``value`` as strict JSON text (what jq and JavaScript read; indent 2): NaN and infinite floats
    (an undefined metric) become null; NumPy and 0-d tensor scalars their Python values; tuples
    lists; anything else JSON cannot hold goes through ``float``."""
    def clean(v):
        if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # NumPy scalar, 0-d array or tensor
            v = v.item()
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, numbers.Integral):
            return int(v)
        if isinstance(v, numbers.Real):
            v = float(v)
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), indent=2, allow_nan=False, default=float)


def atomic_write(path: str, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    # mkstemp creates the file 0600; give the final file the usual permissions (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~umask)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path: str, checkpoint: Dict[str, Any]) -> None:
    """Write ``checkpoint`` (see the module docstring) to ``path`` atomically."""
    checkpoint = dict(checkpoint)
    checkpoint["format"] = FORMAT
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not an mtkernels checkpoint (another file, or a truncated or corrupt one).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # weights_only=False: the file holds plain configs and RNG states besides tensors; only load
    # checkpoints you wrote (as with any torch.save file).
    # A truncated zip archive fails with OSError, text that legacy unpickling half-parses with ValueError.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except PermissionError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not an mtkernels checkpoint (not a torch.save file, or a truncated one: "
                         f"{exc})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mtkernels checkpoint (expected format {FORMAT!r})")
    return checkpoint


def class_path(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def build_model(checkpoint: Dict[str, Any], best: bool = True) -> torch.nn.Module:
    """Rebuild the model of a checkpoint in eval mode, with its best (or latest) weights."""
    module_name, _, qualname = checkpoint["model_class"].partition(":")
    cls = importlib.import_module(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    model = cls.from_config(checkpoint["model_config"])
    state = checkpoint.get("best_model_state") if best else None
    model.load_state_dict(state if state is not None else checkpoint["model_state"])
    model.eval()
    return model
