"""What a compare reads: its inputs opened as checkpoints (paths, loaded checkpoints, state
dicts, modules), and each value's data as a flat array (numpy for CPU, torch on a device),
viewed in place where it can be (``docs/compare.md``, "Where the data comes from")."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .. import numpy_apply
from ..checkpoint import Checkpoint, Derived, FileStored, Stored, TensorStored
from ..errors import SurgeryError, UsageError
from ..readers import from_tensors, load
from .arrays import dtype_name, torch_to_numpy

Progress = Callable[[int, int], None]  # progress(done_bytes, total_bytes)
# A checkpoint argument: a path of any readable format, a loaded Checkpoint, a state dict,
# or a torch.nn.Module (its state_dict()).
CheckpointLike = str | os.PathLike | Checkpoint | Mapping | Any


def _device(device) -> str | None:
    """None for CPU (numpy), else a validated torch device string (``UsageError`` if unusable)."""
    if device is None or str(device) == "cpu":
        return None
    from ..surgery import check_device

    return check_device(str(device))


def _is_module(x) -> bool:
    torch = sys.modules.get("torch")  # a module exists only once torch is imported
    return torch is not None and isinstance(x, torch.nn.Module)


def _from_state_dict(sd: Mapping, label: str, what: str) -> Checkpoint:
    """A checkpoint over a state dict's tensors; other entries are listed as skipped."""
    torch = sys.modules.get("torch")
    is_tensor = torch.is_tensor if torch is not None else (lambda v: False)
    for k, v in sd.items():
        if not is_tensor(v) and hasattr(v, "shape") and hasattr(v, "dtype"):
            raise UsageError(
                f"{label}: {str(k)!r} is a {type(v).__name__}; a state dict holds torch tensors",
                param=what,
            )
    tensors = {str(k): v for k, v in sd.items() if is_tensor(v)}
    ckpt = from_tensors(tensors, path=label)
    ckpt.skipped = [f"{k}: {type(v).__name__}" for k, v in sd.items() if not is_tensor(v)]
    return ckpt


def _open(x, what: str, stack: contextlib.ExitStack) -> tuple[Checkpoint, str]:
    """(checkpoint, a label for reports); a checkpoint opened here closes with ``stack``."""
    if isinstance(x, Checkpoint):
        return x, x.path or "<checkpoint>"
    if isinstance(x, Mapping):
        return _from_state_dict(x, f"<{what}>", what), f"<{what}>"
    if _is_module(x):
        label = f"<{what}: {type(x).__name__}>"
        return _from_state_dict(x.state_dict(), label, what), label
    if isinstance(x, (str, os.PathLike)):
        ckpt = load(x)
        stack.callback(ckpt.close)
        return ckpt, os.fspath(x)
    raise UsageError(
        f"{what}: expected a path, a Checkpoint, a state dict or a torch.nn.Module, got {type(x).__name__}",
        param=what,
    )


# ----------------------------------------------------------------- values and arrays


def _on_cpu(s: Stored) -> bool:
    """Whether a stored tensor's data is in CPU memory (a file's, or a CPU tensor's)."""
    return not isinstance(s, TensorStored) or s.t.device.type == "cpu"


def _cpu_flat(t) -> np.ndarray:
    """A flat numpy view of a torch tensor (copied to the CPU, or made contiguous, if needed)."""
    arr = torch_to_numpy(t, flat=True)
    if arr is None:
        raise SurgeryError(f"cannot compare tensors of dtype {dtype_name(t.dtype)} on the CPU")
    return arr


def _flat(v: Derived, dev: str | None):
    """``(flat array, release)`` of a value: numpy for CPU (``dev`` None), else torch.

    ``release(start_byte, stop_byte)`` unmaps pages already compared (safetensors only).
    An untransformed stored tensor is viewed in place; anything else is materialised.
    """
    s = v.base
    if v.transform.is_identity and isinstance(s, FileStored):
        return numpy_apply.numpy_view(s.raw(), s.dtype, s.shape).reshape(-1), s.release
    if v.transform.is_identity and isinstance(s, TensorStored):
        return (_cpu_flat(s.t) if dev is None else s.t.detach().reshape(-1)), None
    if dev is None and isinstance(s, FileStored) and v.transform.is_view:
        view = numpy_apply.numpy_view(s.raw(), s.dtype, s.shape)
        arr = numpy_apply.apply(v.transform, view, s.dtype, views_only=True)
        flat = np.ascontiguousarray(arr).reshape(-1)
        s.release()
        return flat, None
    t = s.tensor(dev or "cpu")
    out = v.transform.apply(t, allow_copy=True)
    return (_cpu_flat(out) if dev is None else out.reshape(-1)), None



def _effective_device(dev: str | None, *ckpts: Checkpoint) -> str | None:
    """With no device asked for, tensors that live on an accelerator are compared there."""
    if dev is not None:
        return dev
    for c in ckpts:
        for s in c.stored.values():
            if not _on_cpu(s):
                return str(s.t.device)
    return None

