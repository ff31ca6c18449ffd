"""Array helpers shared by the compare kernel and the checkpoint report: dtype names,
item sizes, and zero-copy moves between torch and numpy.

Importing this module, or calling it on numpy arrays, never imports torch.
"""

from __future__ import annotations

import warnings

import array_api_compat as aac
import numpy as np

__all__ = ["UINT", "dtype_name", "is_cpu_tensor", "itemsize", "numpy_to_torch", "to_device", "torch_to_numpy"]

# The unsigned integer type of each item size: raw-bytes views of any dtype.
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def dtype_name(dtype) -> str:
    """The wsurgery name of a numpy or torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def itemsize(x) -> int:
    """Bytes per element of a numpy array or a torch tensor."""
    size = getattr(x, "itemsize", None)
    if size is None:
        size = x.element_size() if hasattr(x, "element_size") else x.dtype.itemsize
    return int(size)


def is_cpu_tensor(x) -> bool:
    """Whether ``x`` is a torch tensor in CPU memory."""
    return aac.is_torch_array(x) and x.device.type == "cpu"


def torch_to_numpy(t, *, flat: bool = False) -> np.ndarray | None:
    """A numpy view of a torch tensor's memory (``ml_dtypes`` for bfloat16 and float8), or
    None for a dtype numpy has no twin of (complex32, ...).

    Args:
        t: a torch tensor. Without ``flat`` it must be in CPU memory, and the view has
            its shape and strides (zero-copy).
        flat: return a 1-D view; a tensor on another device is copied to the CPU, and a
            non-contiguous one is made contiguous, first.

    Returns:
        The numpy array, or None.
    """
    import torch  # the input is a torch tensor: torch is loaded already

    t = t.detach()
    if flat and t.device.type != "cpu":
        t = t.to("cpu")
    t = t.resolve_conj().resolve_neg()  # lazy conjugate / negative bits
    if flat:
        t = t.contiguous().reshape(-1)
    name = dtype_name(t.dtype)
    try:
        if t.dtype.is_floating_point and name not in ("float16", "float32", "float64"):
            import ml_dtypes

            np_dtype = np.dtype(getattr(ml_dtypes, name))
            raw = t.view({1: torch.uint8, 2: torch.int16}[np_dtype.itemsize]).numpy()
            return raw.view(np_dtype)
        return t.numpy()
    except (AttributeError, KeyError, RuntimeError, TypeError):
        return None  # no numpy twin: the caller stays in torch


def numpy_to_torch(arr):
    """A CPU torch tensor over a numpy array's memory (copied only if not contiguous);
    ``ml_dtypes`` arrays become the torch dtypes of the same name. Imports torch."""
    import torch

    arr = np.ascontiguousarray(arr)
    name = dtype_name(arr.dtype)
    with warnings.catch_warnings():  # read-only (mmap) arrays: torch warns, we never write
        warnings.simplefilter("ignore")
        if arr.dtype.isbuiltin != 1:  # ml_dtypes (bfloat16, float8_*): numpy user dtypes
            raw = arr.view({1: np.uint8, 2: np.int16}[arr.dtype.itemsize])
            return torch.from_numpy(raw).view(getattr(torch, name))
        return torch.from_numpy(arr)


def to_device(x, device: str | None):
    """Place ``x`` for comparison on ``device``.

    torch tensors move to ``device`` (unchanged for ``None``). numpy arrays stay numpy
    for ``None`` / ``"cpu"``; for any other device they become torch tensors there
    (this imports torch; ``bfloat16`` / ``float8`` numpy arrays map to the torch dtypes).
    """
    if aac.is_torch_array(x):
        return x if device is None else x.to(device)
    if device is None or str(device).split(":")[0] == "cpu":
        return x
    return numpy_to_torch(np.asarray(x)).to(device)
