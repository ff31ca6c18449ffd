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
from ..errors import InputError, SurgeryError, UsageError
from ..io.registry import open as load
from ..io.safetensors import FileStored
from ..io.torch_format import from_tensors
from ..model import Checkpoint, Derived, Stored, TensorStored
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
    for name, t in tensors.items():
        problem = _not_comparable(t)
        if problem is not None:
            raise InputError(
                f"{label}: tensor {name!r} is {problem}; only dense tensors holding data can be compared",
                hint="convert it first (t.to_dense(), a real device, t.dequantize(), or one tensor per component)",
            )
    skipped = [f"{k}: {type(v).__name__}" for k, v in sd.items() if not is_tensor(v)]
    return from_tensors(tensors, path=label, skipped=skipped)


def _not_comparable(t: Any) -> str | None:
    """What makes a tensor of a state dict impossible to compare, or None."""
    if getattr(t, "is_nested", False):
        return "a nested tensor"
    layout = str(getattr(t, "layout", "torch.strided")).removeprefix("torch.")
    if layout != "strided":
        return f"a sparse tensor ({layout})"
    if getattr(t, "is_meta", False) or t.device.type == "meta":
        return "on the meta device (it holds no data)"
    if getattr(t, "is_quantized", False):
        return "a quantized tensor"
    return None


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


def _cpu_flat(t: Any) -> Any:
    """A flat numpy view of a CPU torch tensor's memory (zero-copy when contiguous; a
    strided tensor, e.g. an ``expand``-ed one, is read by stride chunk by chunk through
    ``StridedFlat``, never materialised whole); a tensor on another device is copied."""
    if t.device.type == "cpu" and not t.is_contiguous():
        arr = torch_to_numpy(t)
        if arr is not None:
            return StridedFlat(arr)
    arr = torch_to_numpy(t, flat=True)
    if arr is None:
        raise SurgeryError(f"cannot compare tensors of dtype {dtype_name(t.dtype)} on the CPU")
    return arr


def _device_flat(t: Any) -> Any:
    """A flat torch view for a device compare; a strided tensor is read chunk by chunk."""
    t = t.detach()
    return t.reshape(-1) if t.is_contiguous() else StridedFlat(t)


class StridedFlat:
    """A strided N-d array (numpy, or a torch tensor) read as a flat C-order 1-D array, one
    slice at a time: ``flat[i:j]`` copies just those elements, so an ``expand``-ed tensor
    of a billion elements over one stored value costs a chunk, never its whole size.

    Each slice is cut into the end of one row (last axis), whole rows (gathered by
    their leading indices), and the start of another: its cost is its own size plus one
    index per row it covers.
    """

    def __init__(self, arr: Any):
        self.arr = arr
        self.torch = not isinstance(arr, np.ndarray)
        self.dtype = arr.dtype
        self.itemsize = int(arr.element_size() if self.torch else arr.dtype.itemsize)
        self.size = int(np.prod([int(d) for d in arr.shape], dtype=np.int64)) if arr.ndim else 1
        self.shape = (self.size,)
        self.ndim = 1
        self.device = arr.device if self.torch else None

    def __len__(self) -> int:
        return self.size

    def _index(self, rows: np.ndarray) -> tuple:
        idx = np.unravel_index(rows, tuple(int(d) for d in self.arr.shape[:-1]))
        if self.torch:
            import torch

            return tuple(torch.as_tensor(i, device=self.arr.device) for i in idx)
        return idx

    def __getitem__(self, key: slice) -> Any:
        if not isinstance(key, slice):
            raise TypeError("StridedFlat takes slices only")
        i, j, step = key.indices(self.size)
        if step != 1:
            raise ValueError("StridedFlat takes contiguous slices only")
        a = self.arr
        j = max(i, j)
        if a.ndim <= 1:
            part = a.reshape(-1)[i:j] if a.ndim == 0 else a[i:j]
            return part.contiguous() if self.torch else np.ascontiguousarray(part)
        width = int(a.shape[-1])
        parts = []
        row, col = divmod(i, width)
        if col and i < j:  # the end of a row
            take = min(width - col, j - i)
            parts.append(a[self._index(np.array([row])) + (slice(col, col + take),)].reshape(-1))
            i += take
            row += 1
        full = (j - i) // width
        if full:  # whole rows
            parts.append(a[self._index(np.arange(row, row + full))].reshape(-1))
            i += full * width
            row += full
        if i < j:  # the start of a row
            parts.append(a[self._index(np.array([row])) + (slice(0, j - i),)].reshape(-1))
        if self.torch:
            import torch

            return torch.cat(parts) if parts else a.reshape(-1)[:0].contiguous()
        return np.concatenate(parts) if parts else np.empty(0, dtype=a.dtype)


def _flat(v: Derived, dev: str | None):
    """``(flat array, release)`` of a value: numpy for CPU (``dev`` None), else torch.

    ``release(start_byte, stop_byte)`` unmaps pages already compared (safetensors only).
    An untransformed stored tensor is viewed in place; anything else is materialised.
    """
    s = v.base
    raw = s.raw() if v.transform.is_identity else None  # bytes in a file (or chunks), read without torch
    if raw is not None:
        return numpy_apply.numpy_view(raw, s.dtype, s.shape).reshape(-1), s.release
    if v.transform.is_identity and isinstance(s, TensorStored):
        return (_cpu_flat(s.t) if dev is None else _device_flat(s.t)), None
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
            if isinstance(s, TensorStored) and not _on_cpu(s):
                return str(s.t.device)
    return None
