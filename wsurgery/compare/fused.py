"""The fused element-wise pass of the float kernel: ``_fused.c``, compiled at install into
a plain shared library (``hatch_build.py``) and loaded here with ``ctypes``.

One call per block replaces the numpy passes of ``_FloatKernel._block`` (raw-bytes
equality and count, two casts to float64, the difference, its extremes, the quotients
and theirs): it writes the float64 buffers A, B and D = A - B that the BLAS dot products
then read, and returns the count and the maxima. Every operation is an exact IEEE one, so
the statistics are those of the numpy passes to the bit (``docs/compare-performance.md``).
ctypes releases the GIL during the call: the kernel's worker threads run it in parallel.

Without the library (no C compiler at install, another platform) or with
``WSURGERY_NO_FUSED=1`` in the environment, the kernel runs its numpy passes.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path

import numpy as np

from .threads import ONE_THREAD_BLAS

__all__ = ["ABI", "DISABLE_ENV", "FusedPass", "Result", "enabled", "library", "library_path", "supported", "usable_on"]

ABI = 3  # WS_ABI of _fused.c: a library built from another version of the file is not used
DISABLE_ENV = "WSURGERY_NO_FUSED"
_KINDS = {"float64": 0, "float32": 1, "float16": 2, "bfloat16": 3}
_TOLERANCE, _PORTABLE, _DOT_ILP64 = 1, 2, 4

# Tests: the portable C loops even where the vector ones could run; the dot products from
# Python (numpy) even where the C loop could call BLAS itself.
FORCE_PORTABLE = False
BLAS_FROM_C = True

# The cblas_ddot of the BLAS numpy loaded, by the names its builds give it (64-bit sizes
# first): scipy-openblas wheels, OpenBLAS and MKL ILP64 builds, then the 32-bit ones.
_DDOT_NAMES = (
    ("scipy_cblas_ddot64_", True),
    ("cblas_ddot64_", True),
    ("cblas_ddot_64", True),
    ("scipy_cblas_ddot", False),
    ("cblas_ddot", False),
)


class Result(ctypes.Structure):
    """``ws_result`` of ``_fused.c``: one block's counts, maxima and dot products."""

    _fields_ = [
        ("equal", ctypes.c_int64),
        ("close", ctypes.c_int64),
        ("max_abs", ctypes.c_double),
        ("max_rel", ctypes.c_double),
        ("aa", ctypes.c_double),
        ("bb", ctypes.c_double),
        ("ab", ctypes.c_double),
        ("dd", ctypes.c_double),
        ("identical", ctypes.c_int32),
        ("vector", ctypes.c_int32),
    ]


def library_path() -> Path:
    """Where the install puts the library: beside this module."""
    return Path(__file__).with_name("_fused.dll" if sys.platform == "win32" else "_fused.so")


class _Library:
    """The loaded library: ``blocks`` (``wsurgery_fused_blocks``, argument types set) and
    ``dot`` (``wsurgery_fused_dot``)."""

    def __init__(self, lib: ctypes.CDLL):
        p, d, i, i64 = ctypes.c_void_p, ctypes.c_double, ctypes.c_int, ctypes.c_int64
        lib.wsurgery_fused_fast.restype = i
        self.fast = bool(lib.wsurgery_fused_fast())  # vectorized here: faster than numpy's passes
        self.blocks = lib.wsurgery_fused_blocks
        self.blocks.argtypes = [i, i, p, p, i64, i64, p, p, p, d, d, i, p, p]
        self.blocks.restype = i
        self.dot = lib.wsurgery_fused_dot
        self.dot.argtypes = [p, i, i64, p, p]
        self.dot.restype = d
        self._blas: list = []  # [(address, flags) or None], once looked for

    def blas_dot(self) -> tuple[int, int] | None:
        """``(address, flags)`` of the cblas_ddot that ``np.dot`` calls on float64 vectors,
        checked against ``np.dot`` to the bit on one BLAS thread; None where none is found
        or BLAS cannot be held on one thread (``ONE_THREAD_BLAS``)."""
        if not ONE_THREAD_BLAS.usable:
            return None
        if not self._blas:
            with _LOCK:
                if not self._blas:
                    self._blas.append(self._find_blas_dot())
        return self._blas[0]

    def _find_blas_dot(self) -> tuple[int, int] | None:
        x, y = _probe_vectors()
        for path in ONE_THREAD_BLAS.library_paths():
            try:
                blas = ctypes.CDLL(path)  # loaded already: the same library
            except OSError:
                continue
            for name, ilp64 in _DDOT_NAMES:
                fn = getattr(blas, name, None)
                if fn is None:
                    continue
                address = ctypes.cast(fn, ctypes.c_void_p).value
                flags = _DOT_ILP64 if ilp64 else 0
                if address and self._same_as_numpy(address, flags, x, y):
                    return address, flags
        return None

    def _same_as_numpy(self, address: int, flags: int, x: np.ndarray, y: np.ndarray) -> bool:
        zeros, ones = np.array([-0.0, -0.0]), np.array([1.0, 1.0])
        pairs = [(u[:n], v[:n]) for n in (1, 2, 5, 17, 1000, 4099, x.shape[0]) for u, v in ((x, y), (x, x), (y, x))]
        pairs += [(zeros[:1], ones[:1]), (zeros, ones)]
        with ONE_THREAD_BLAS:
            for u, v in pairs:
                want = float(np.dot(u, v))
                got = self.dot(address, flags, u.shape[0], _address(u), _address(v))
                if got.hex() != want.hex():
                    return False
        return True


def _probe_vectors() -> tuple[np.ndarray, np.ndarray]:
    """Two 64 Ki float64 vectors whose sums round differently in any other order: values
    of both signs spread over 80 binary orders of magnitude (an integer hash, repeated
    with a prime period)."""
    h = (np.arange(1021, dtype=np.int64) * 2654435761) % 4294967291
    x = ((h % 2001) - 1000.0) * np.exp2((h % 81) - 40.0)
    y = (((h // 7) % 1999) - 999.5) * np.exp2(((h // 3) % 61) - 30.0)
    n = 1 << 16
    return np.resize(x, n), np.resize(y[::-1], n)


_LOCK = threading.Lock()
_LIB: list = []  # [the _Library, or None], once looked for


def library() -> _Library | None:
    """The library, or None where it is missing, cannot be loaded or is of another
    ``ABI``. Looked for once per process."""
    if not _LIB:
        with _LOCK:
            if not _LIB:
                _LIB.append(_load())
    return _LIB[0]


def _load() -> _Library | None:
    path = library_path()
    if not path.is_file():
        return None
    try:
        lib = ctypes.CDLL(str(path))
        lib.wsurgery_fused_abi.restype = ctypes.c_int
        if lib.wsurgery_fused_abi() != ABI:
            return None
        return _Library(lib)
    except (OSError, AttributeError):
        return None


def enabled() -> bool:
    """Whether kernels made now may use the library (not switched off by ``WSURGERY_NO_FUSED``)."""
    return os.environ.get(DISABLE_ENV, "") in ("", "0")


def supported(dtype) -> bool:
    """Whether the fused pass reads this numpy dtype (native-order float64, float32,
    float16, bfloat16)."""
    dt = np.dtype(dtype)
    return dt.isnative and dt.name in _KINDS and dt.itemsize == (8, 4, 2, 2)[_KINDS[dt.name]]


def usable_on(x: np.ndarray) -> bool:
    """Whether the pass can read a 1-D array: its elements contiguous."""
    return x.ndim == 1 and (x.shape[0] <= 1 or x.strides[0] == x.itemsize)


def _address(x: np.ndarray) -> int:
    return x.__array_interface__["data"][0]


class FusedPass:
    """The fused pass over one kernel's buffers and dtypes. Not shared between threads
    (its results are reused): each thread's kernel has its own.

    ``blas``: whether each call also takes the blocks' dot products (the BLAS ddot that
    ``np.dot`` calls, ``_Library.blas_dot``); else a call takes one block, and the
    caller takes the dot products from the buffers.
    """

    def __init__(self, lib: _Library, dtype_a, dtype_b, A, B, D, atol: float, rtol: float, *, blocks: int = 1):
        self._fn = lib.blocks
        self._kinds = (_KINDS[np.dtype(dtype_a).name], _KINDS[np.dtype(dtype_b).name])
        self.size = A.shape[0]
        self._bufs = (_address(A), _address(B), _address(D))
        self._tol = (float(atol), float(rtol))
        flags = _TOLERANCE if (atol or rtol) else 0
        dot = lib.blas_dot() if BLAS_FROM_C else None
        self.blas = dot is not None
        self._dot: int | None = None
        self._flags = flags
        if dot is not None:
            self._dot, self._flags = dot[0], flags | dot[1]
        self.blocks = blocks if self.blas else 1  # the most blocks one call takes
        self._results = (Result * self.blocks)()

    def __call__(self, a: np.ndarray, b: np.ndarray):
        """The results of the blocks of the contiguous 1-D arrays ``a`` and ``b`` (at most
        ``blocks`` buffers long), in order; the buffers hold the last block."""
        n = a.shape[0]
        if n > self.blocks * self.size:
            raise ValueError(f"{n} elements for {self.blocks} blocks of {self.size}")
        flags = self._flags | (_PORTABLE if FORCE_PORTABLE else 0)
        ka, kb = self._kinds
        A, B, D = self._bufs
        lo, hi = self._tol
        if self._fn(ka, kb, _address(a), _address(b), n, self.size, A, B, D, lo, hi, flags, self._dot, self._results):
            raise ValueError("fused pass: bad arguments")  # pragma: no cover - checked above
        return self._results
