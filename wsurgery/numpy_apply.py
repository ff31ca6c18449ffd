"""Transform chains on numpy arrays: the torch-free path for safetensors data.

``apply`` runs a chain on a numpy array (``bfloat16`` / ``float8`` through ml_dtypes) and
gives the same bytes as ``Transform.apply`` on the same data in torch, for the steps
``supports`` accepts:

* every view step (``transpose``, ``permute``, ``reshape``, ``slice``), on any dtype:
  elements are only moved;
* ``scale`` on float16, bfloat16, float32 and float64, computed as torch does: natively
  in float32/float64 (the factor rounded to the tensor's dtype), and in float32 rounded
  back for float16/bfloat16;
* ``cast`` between those four float dtypes, except float64 -> float16 and float64 ->
  bfloat16 (torch rounds through float32 there), and ``cast`` to the same dtype (a copy).

Everything else (integer, bool, complex and float8 arithmetic, every other cast) is left
to torch: its results there are undefined behaviour or rounding that numpy does not copy.

NaN bits are the exception: torch's kernels produce NaN payloads and signs that depend on
the kernel it picks (vectorised or not, the CPU's instruction set, the position in the
tensor): float32 -> bfloat16 gives 0xFFFF from the AVX2 kernel and 0x7FC0 from the
scalar one, float16 -> float32 quiets signalling NaNs, numpy keeps them. So a computed
result that holds a NaN (``has_nan``) is not known to match; callers that need torch's
bytes recompute it with torch (``needs_nan_check`` says when). Moved elements keep their
bits, so a view-only chain never needs it.

Importing this module imports numpy, never torch.
"""

from __future__ import annotations

import math

import numpy as np

from . import dtypes as _dtypes
from .errors import InputError, TransformError
from .transforms import Cast, Permute, Reshape, Scale, Slice, Step, Transform, Transpose

__all__ = ["apply", "has_nan", "needs_nan_check", "numpy_view", "supports"]

_FLOATS = frozenset({"float16", "bfloat16", "float32", "float64"})
# (from, to) casts measured bit-identical to torch for every non-NaN value.
_CASTS = frozenset(
    {(a, b) for a in _FLOATS for b in _FLOATS if a != b} - {("float64", "float16"), ("float64", "bfloat16")}
)
_NAN_CHUNK = 1 << 16  # elements per block of the NaN scan (stays in L2)


def _step_supported(step: Step, dtype: str) -> bool:
    if step.is_view:
        return True
    if isinstance(step, Scale):
        return dtype in _FLOATS
    if isinstance(step, Cast):
        return step.dtype == dtype or (dtype, step.dtype) in _CASTS
    return False


def supports(transform: Transform, dtype: str) -> bool:
    """True when every step of ``transform``, applied to a ``dtype`` tensor, runs in numpy
    with torch's results. Pure Python: imports nothing, touches no data."""
    for step in transform.steps:
        if not _step_supported(step, dtype):
            return False
        if isinstance(step, Cast):
            dtype = step.dtype
    return True


def needs_nan_check(transform: Transform, dtype: str) -> bool:
    """True when the chain computes new values (a ``scale``, or a ``cast`` that changes the
    dtype): a NaN in its result may differ from torch's NaN bits."""
    for step in transform.steps:
        if isinstance(step, Scale) or (isinstance(step, Cast) and step.dtype != dtype):
            return True
        if isinstance(step, Cast):
            dtype = step.dtype
    return False


def _numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a wsurgery dtype name (little-endian; ml_dtypes for bfloat16 and
    float8)."""
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name).newbyteorder("<")


def numpy_view(buffer, dtype_name: str, shape) -> np.ndarray:
    """Zero-copy numpy view of raw little-endian bytes (``bytes``, ``memoryview``, an
    ``mmap`` slice) as the wsurgery dtype ``dtype_name`` (``bfloat16`` and ``float8_*``
    through ``ml_dtypes``; those assume a little-endian host). The buffer must hold
    exactly ``prod(shape)`` elements; raises ``InputError`` otherwise or for an unknown
    dtype. Read-only buffers give read-only arrays.
    """
    dt = _dtypes.lookup(dtype_name)
    if dt is None:
        raise InputError(f"unknown dtype {dtype_name!r}")
    np_dtype = _numpy_dtype(dt.name)
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    with memoryview(buffer) as mv:  # released at once: an mmap can still be closed later
        nbytes = mv.nbytes
    if nbytes != numel * np_dtype.itemsize:
        raise InputError(
            f"{nbytes} bytes cannot hold a {dt.name} tensor of shape {list(shape)} "
            f"({numel * np_dtype.itemsize} bytes expected)"
        )
    if numel == 0:
        return np.empty(shape, dtype=np_dtype)
    return np.frombuffer(buffer, dtype=np_dtype, count=numel).reshape(shape)


def _view_step(step: Step, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(step, Transpose):
        if arr.ndim == 0:  # torch accepts transpose(0,0) / (-1,0) on a 0-d tensor: a no-op
            return arr
        d0, d1 = (0, 1) if step.dims is None else step.dims
        return np.swapaxes(arr, d0, d1)
    if isinstance(step, Permute):
        return np.transpose(arr, step.dims)
    if isinstance(step, Reshape):
        return arr.reshape(shape)
    if isinstance(step, Slice):
        index = [slice(None)] * arr.ndim
        index[step.dim] = slice(step.start, step.stop)
        return arr[tuple(index)]
    raise AssertionError(f"not a view step: {step}")  # pragma: no cover - every view step is above


def _scale(arr: np.ndarray, dtype: str, factor: float, owned: bool) -> np.ndarray:
    if dtype in ("float32", "float64"):
        k = arr.dtype.type(factor)  # torch rounds the factor to the tensor's dtype
        return np.multiply(arr, k, out=arr) if owned else np.multiply(arr, k)
    # float16 / bfloat16: computed in float32 and rounded back, as Scale._apply does
    wide = arr.astype(np.float32)
    np.multiply(wide, np.float32(factor), out=wide)
    return wide.astype(arr.dtype)


def apply(transform: Transform, arr: np.ndarray, dtype: str, *, views_only: bool = False) -> np.ndarray:
    """``transform`` applied to ``arr`` (of wsurgery dtype ``dtype``), step by step as
    torch does. View steps return views of ``arr``; the result may be non-contiguous.

    Each step is checked with the step's own ``infer`` (``TransformError``). A step that
    ``supports`` refuses raises ``TransformError``; with ``views_only`` so does any
    ``cast`` or ``scale``. Floating-point warnings are silenced (overflow to inf is the
    result torch gives too)."""
    owned = False  # whether ``arr`` is a buffer of our own (may be written in place)
    with np.errstate(all="ignore"):
        for i, step in enumerate(transform.steps, 1):
            shape, out_dtype = step._infer_at(arr.shape, dtype, i)
            if step.is_view:
                arr = _view_step(step, arr, shape)
            elif views_only or not _step_supported(step, dtype):
                what = "a view step" if views_only else f"a step numpy computes like torch for {dtype}"
                raise TransformError(f"step {i} '{step.spec()}': not {what}")
            elif isinstance(step, Scale):
                arr, owned = _scale(arr, dtype, step.factor, owned), True
            elif out_dtype != dtype:  # Cast to another dtype; to the same one it is a no-op
                arr, owned = arr.astype(_numpy_dtype(out_dtype)), True
            dtype = out_dtype
            if tuple(arr.shape) != tuple(shape):  # pragma: no cover - an invariant
                raise AssertionError(f"step {step} gave shape {arr.shape}, inferred {shape}")
    return arr


def has_nan(arr: np.ndarray) -> bool:
    """True when a float16/bfloat16/float32/float64 array holds a NaN (any sign or payload).

    Scans the bits in blocks: no full-size temporary, fast for ml_dtypes' bfloat16 too."""
    size = arr.dtype.itemsize
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
    exp = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000, "float64": 0x7FF0000000000000}
    inf = bits(exp[str(arr.dtype)])
    magnitude = np.asarray((1 << (8 * size - 1)) - 1, dtype=bits)  # every bit but the sign
    flat = np.ascontiguousarray(arr).reshape(-1).view(bits)
    buf = np.empty(min(flat.size, _NAN_CHUNK), dtype=bits)
    for start in range(0, flat.size, _NAN_CHUNK):
        block = flat[start : start + _NAN_CHUNK]
        out = buf[: block.size]
        np.bitwise_and(block, magnitude, out=out)
        if out.max() > inf:
            return True
    return False
