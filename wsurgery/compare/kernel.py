"""Tensor-level compare engine: equality and statistics for one pair of tensors.

One implementation, written against the array API (through ``array_api_compat``),
serves numpy arrays (CPU, no torch: ``bfloat16`` and ``float8_*`` through
``ml_dtypes``) and torch tensors on any device. A small backend class adds what the
array API lacks (raw-bytes equality, flattening, device moves, buffer reuse). CPU
tensors are compared through zero-copy numpy views of their memory (several times
faster than torch's per-op overhead on small blocks); tensors on an accelerator are
compared there, in torch. Importing this module, or comparing numpy arrays, never
imports torch.

Semantics (``compare_arrays``):

* **Within tolerance** means ``|a - b| <= atol + rtol * |b|`` (``torch.isclose``),
  evaluated in float64 (complex128 for complex inputs). Non-finite values are close
  only when they are equal: ``+inf`` vs ``+inf`` is equal, ``+inf`` vs ``-inf`` or vs
  any finite value is not, whatever the tolerance.
* **NaN**: a NaN on both sides at the same position counts as equal, whatever its
  payload or sign; a NaN against a number is a mismatch.
* **Zero tolerance** (``atol == rtol == 0``, the default) is exact: two values are
  equal iff they are the same value *and* zeros carry the same sign (or both are NaN).
  For same-dtype inputs this is bitwise equality, except that NaN payloads are not
  compared. So ``-0.0`` vs ``+0.0`` is a mismatch at zero tolerance (with
  ``max_abs_diff`` 0.0), and equal within any ``atol > 0`` or ``rtol > 0``.
* **Different dtypes** are compared by value after casting both to float64 (complex128
  if either is complex), or, for two integer/bool dtypes, exactly as integers. An
  integer compared with a float goes through float64 and so is rounded above 2**53.
* **Integers** (int8..int64, uint8..uint64, bool as 0/1) compare exactly; the
  difference ``|a - b|`` is computed exactly in 64-bit unsigned arithmetic
  (``int64.min`` vs ``int64.max`` gives 2**64 - 1, no overflow) and ``max_abs_diff`` is
  that exact integer rounded once to float. Tolerance tests and ``max_rel_diff`` use
  the float64 value of the difference. Only a signed value below zero against a
  uint64 value takes its difference in float64.

Statistics (``TensorStats``):

* ``mismatched``: elements not equal / not within tolerance; ``equal`` iff it is 0.
* ``max_abs_diff``: max of ``|a - b|`` over all elements. Pairs that are equal count
  0 (also NaN/NaN and inf/inf); a mismatched pair with a non-finite side (NaN vs
  number, inf vs -inf, inf vs finite) makes it ``inf`` (the difference is unbounded).
* ``max_rel_diff``: max of ``|a - b| / |b|`` with the same rules; ``b == 0`` with
  ``a != 0`` gives ``inf``, equal elements give 0.
* ``cosine``: cosine similarity of the flattened tensors, accumulated in float64 over
  the positions where both values are finite; ``None`` when either of those norms is
  0 (all zeros, no finite pair) or ``numel == 0``; 1.0 for identical tensors with a
  non-zero finite value. Complex: ``Re(sum a * conj(b)) / (|a| |b|)``. Huge (or tiny)
  float64 values are rescaled so that the sums never overflow (or underflow). A block
  whose bytes are identical on both sides adds its sum of squares to the dot product
  and to both norms.

Streaming: the flattened tensors are processed block by block, at most
``chunk_elems`` elements at once (on an accelerator, blocks of exactly that size; on
CPU, 1 MiB per side for the raw-bytes pass and 8 Ki elements for statistics, so that
temporaries stay in cache), so extra memory is a few blocks whatever the tensor size.
Same-dtype inputs are first compared as raw bytes up to the first differing block;
identical tensors cost that one pass. After that, bit-identical (sub-)blocks only add
their sum of squares (for the cosine), and full statistics are computed for the
sub-blocks whose bytes differ. Different dtypes get full statistics everywhere. A
non-contiguous input is copied once to flatten it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import array_api_compat as aac
import numpy as np

from ..errors import SurgeryError, UsageError
from ..numpy_apply import numpy_view

__all__ = ["PairStream", "TensorStats", "compare_arrays", "numpy_view", "to_device"]

DEFAULT_CHUNK_ELEMS = 1 << 24
_CPU_BLOCK_BYTES = 1 << 20  # raw-bytes block per side on CPU
# Statistics sub-block on CPU. Its float64 temporaries (64 KiB) stay under glibc's mmap
# threshold: bigger ones are mapped and unmapped (or trimmed) on every block and then
# page-fault at every use, which costs 3x.
_CPU_STATS_ELEMS = 1 << 13
_SUMSQ_PIECE = 1 << 15  # identical blocks (torch on CPU): sum of squares via one reused buffer
_NUMPY_DOT_PIECE = 1 << 13  # identical blocks (numpy): below OpenBLAS's threading threshold
# Real-float kernel block on CPU (numpy): two reused float64 buffers of this many elements
# (1 MiB, in L2), about 12 numpy calls per block. Measured on a float32 pair that differs
# everywhere: 8 Ki -> 0.9, 32 Ki -> 2.0, 64 Ki -> 2.2, 128 Ki -> 2.2 GB/s.
_FAST_ELEMS = 1 << 16
# OpenBLAS runs a dot product of fewer than 10000 elements on one thread; a longer one on
# all of them, which stalls for milliseconds per call on a busy machine. The CLI pins
# OPENBLAS_NUM_THREADS=1 before numpy starts: then one call per block is fastest.
_DOT_PIECE = 1 << 16 if os.environ.get("OPENBLAS_NUM_THREADS") == "1" else 9984
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# Threads for the float kernel (numpy releases the GIL in its loops; 2 threads: 1.7 -> 3.0
# GB/s on a float32 pair that differs everywhere). Capped: memory bandwidth is the limit.
_MAX_WORKERS = 4
_PARALLEL_MIN_BLOCKS = 4  # fewer kernel blocks than this run on the calling thread
_TORCH_CPU_VIA_NUMPY = True  # tests turn it off to run the torch namespace on CPU
_INT64_MIN = -(1 << 63)
_TWO64 = float(1 << 64)


# --------------------------------------------------------------------------- result


def _json_float(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


@dataclass(frozen=True)
class TensorStats:
    """Equality and difference statistics of one tensor pair (see the module doc)."""

    equal: bool
    numel: int
    mismatched: int
    max_abs_diff: float
    max_rel_diff: float
    cosine: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; inf / nan floats become the strings ``"inf"`` / ``"nan"``."""
        return {
            "equal": self.equal,
            "numel": self.numel,
            "mismatched": self.mismatched,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "max_rel_diff": _json_float(self.max_rel_diff),
            "cosine": None if self.cosine is None else _json_float(self.cosine),
        }


# ------------------------------------------------------------------------ dtypes


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kind(name: str) -> str:
    if name == "bool":
        return "bool"
    if name.startswith("complex"):
        return "complex"
    if name.startswith("uint"):
        return "uint"
    if name.startswith("int"):
        return "int"
    if "float" in name:  # float*, bfloat16, float8_*
        return "float"
    raise SurgeryError(f"cannot compare tensors of dtype {name}")


def _plan(name_a: str, name_b: str) -> str:
    """How to compare: 'float', 'complex', or an integer plan ('int', 'ubias', 'mixed')."""
    kinds = {_kind(name_a), _kind(name_b)}
    if "complex" in kinds:
        return "complex"
    if "float" in kinds:
        return "float"
    if "uint64" not in (name_a, name_b):
        return "int"  # both fit int64 exactly
    return "mixed" if "int" in kinds else "ubias"


# ---------------------------------------------------------------------- backends


class _Backend:
    """The few primitives the array API lacks: flattening, raw-bytes equality, devices."""

    can_bits = False

    def __init__(self, xp, device):
        self.xp = xp
        self.device = device

    def flat(self, x):
        return self.xp.reshape(x, (-1,))

    def block_elems(self, chunk_elems: int, itemsize: int) -> tuple[int, int]:
        """(raw-compare block, statistics sub-block) sizes in elements."""
        return chunk_elems, chunk_elems

    def take(self, flat, start: int, stop: int):
        return flat[start:stop]

    def bits_equal(self, x, y) -> bool:  # pragma: no cover - only for can_bits backends
        raise NotImplementedError

    def errstate(self):
        return contextlib.nullcontext()

    def dot(self, x, y) -> float:
        """Re(sum x * conj(y)) of two 1-D float64 / complex128 arrays.

        Not ``vecdot`` / BLAS dot: over ~10000 elements a float64 BLAS dot (numpy's or
        torch's CPU one) wakes its worker threads on every call and runs up to 50x
        slower on a busy machine, and numpy has no fast float64 ``vecdot`` loop.
        """
        xp = self.xp
        if xp.isdtype(x.dtype, "complex floating"):
            return float(xp.real(xp.sum(x * xp.conj(y))))
        return float(xp.sum(x * y))

    def sumsq(self, x, wide) -> float:
        """Sum of squares (|x|^2) of a 1-D block, in ``wide`` (float64 / complex128)."""
        w = self.xp.astype(x, wide, copy=False)
        return self.dot(w, w)


def _cpu_blocks(chunk_elems: int, itemsize: int) -> tuple[int, int]:
    big = max(1, min(chunk_elems, _CPU_BLOCK_BYTES // itemsize))
    return big, min(big, _CPU_STATS_ELEMS)


class _NumpyBackend(_Backend):
    can_bits = True

    def __init__(self, xp, device):
        super().__init__(xp, device)
        self._buf = np.empty(0, dtype=bool)
        self._f64 = np.empty(0, dtype=np.float64)

    def flat(self, x):
        return np.ascontiguousarray(x).reshape(-1)

    def block_elems(self, chunk_elems, itemsize):
        return _cpu_blocks(chunk_elems, itemsize)

    def bits_equal(self, x, y) -> bool:
        nbytes = x.size * x.dtype.itemsize
        if nbytes % 8 == 0:
            u = np.uint64
        else:
            u = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(x.dtype.itemsize, np.uint8)
        ux, uy = x.view(u), y.view(u)
        if self._buf.size < ux.size:
            self._buf = np.empty(ux.size, dtype=bool)
        out = self._buf[: ux.size]
        np.equal(ux, uy, out=out)
        return bool(out.all())

    def errstate(self):
        return np.errstate(all="ignore")

    def dot(self, x, y) -> float:
        if x.shape[0] > _NUMPY_DOT_PIECE:
            return super().dot(x, y)
        if x.dtype.kind == "c":
            return float(np.vdot(y, x).real)  # vdot conjugates its first argument
        return float(np.dot(x, y))  # short: single-threaded BLAS, no temporary

    def sumsq(self, x, wide) -> float:
        # The hot path for bit-identical blocks. One reused, cache-sized float64 buffer
        # (fresh multi-MiB temporaries page-fault on every block once glibc trims its
        # heap), and np.dot on pieces short enough (< 10000) that OpenBLAS runs its dot
        # single-threaded: ~2x the speed of square + pairwise sum.
        if x.dtype.kind == "c":
            return super().sumsq(x, wide)
        n = x.shape[0]
        step = min(n, _NUMPY_DOT_PIECE)
        if self._f64.size < step:
            self._f64 = np.empty(step, dtype=np.float64)
        total = 0.0
        for i in range(0, n, step):
            piece = x[i : i + step]
            w = self._f64[: piece.shape[0]]
            np.copyto(w, piece, casting="unsafe")  # exact: float dtypes fit float64 (ints round)
            total += float(np.dot(w, w))
        return total


class _TorchBackend(_Backend):
    can_bits = True

    def __init__(self, xp, device):
        super().__init__(xp, device)
        import torch  # the inputs are torch tensors: torch is loaded already

        self.torch = torch
        self._f64 = None
        self._views = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

    def flat(self, x):
        return x.detach().resolve_conj().resolve_neg().reshape(-1)  # lazy conj/neg bits

    def block_elems(self, chunk_elems, itemsize):
        if self.device.type == "cpu":
            return _cpu_blocks(chunk_elems, itemsize)
        return chunk_elems, chunk_elems

    def take(self, flat, start, stop):
        block = flat[start:stop]
        if block.device != self.device:
            block = block.to(self.device)
        return block

    def bits_equal(self, x, y) -> bool:
        size = x.element_size()
        view = self._views.get(size, self.torch.int64 if size % 8 == 0 else self.torch.uint8)
        return bool(self.torch.equal(x.contiguous().view(view), y.contiguous().view(view)))

    def sumsq(self, x, wide) -> float:
        if x.is_complex():
            return super().sumsq(x, wide)
        torch = self.torch
        n = x.shape[0]
        step = min(n, _SUMSQ_PIECE) if self.device.type == "cpu" else n
        buf = self._f64
        if buf is None or buf.shape[0] < step or buf.device != x.device:
            buf = self._f64 = torch.empty(step, dtype=torch.float64, device=x.device)
        total = None
        for i in range(0, n, step):
            piece = x[i : i + step]
            w = buf[: piece.shape[0]]
            w.copy_(piece)
            w.mul_(w)
            s = w.sum()
            total = s if total is None else total + s
        return float(total)


def _numpy_to_torch(arr):
    import torch

    arr = np.ascontiguousarray(arr)
    name = _dtype_name(arr.dtype)
    with warnings.catch_warnings():  # read-only (mmap) arrays: torch warns, we never write
        warnings.simplefilter("ignore")
        if arr.dtype.isbuiltin != 1:  # ml_dtypes (bfloat16, float8_*): numpy user dtypes
            raw = arr.view({1: np.uint8, 2: np.int16}[arr.dtype.itemsize])
            return torch.from_numpy(raw).view(getattr(torch, name))
        return torch.from_numpy(arr)


def _torch_to_numpy(t):
    """Zero-copy numpy view of a CPU tensor (ml_dtypes for bfloat16 / float8), or None."""
    import torch

    t = t.detach().resolve_conj().resolve_neg()
    name = _dtype_name(t.dtype)
    try:
        if t.dtype.is_floating_point and name not in ("float16", "float32", "float64"):
            import ml_dtypes

            np_dtype = np.dtype(getattr(ml_dtypes, name))
            raw = t.view({1: torch.uint8, 2: torch.int16}[np_dtype.itemsize]).numpy()
            return raw.view(np_dtype)
        return t.numpy()
    except (AttributeError, KeyError, RuntimeError, TypeError):
        return None  # no numpy twin (e.g. complex32): stay in torch


def _is_cpu_tensor(x) -> bool:
    return aac.is_torch_array(x) and x.device.type == "cpu"


def _coerce_pair(a, b):
    """Bring both inputs into one namespace, zero-copy where possible.

    CPU torch tensors are compared through numpy views of their memory (same code,
    several times faster on CPU than torch's per-op overhead); a numpy array against a
    tensor on an accelerator becomes a torch tensor. Non-arrays go through numpy.
    """
    ta, tb = aac.is_torch_array(a), aac.is_torch_array(b)
    if not ta and not aac.is_array_api_obj(a) or isinstance(a, np.generic):
        a = np.asarray(a)
    if not tb and not aac.is_array_api_obj(b) or isinstance(b, np.generic):
        b = np.asarray(b)
    if _TORCH_CPU_VIA_NUMPY and (ta or tb):
        na = _torch_to_numpy(a) if _is_cpu_tensor(a) else a
        nb = _torch_to_numpy(b) if _is_cpu_tensor(b) else b
        if isinstance(na, np.ndarray) and isinstance(nb, np.ndarray):
            return na, nb
    if aac.is_torch_array(a) and isinstance(b, np.ndarray):
        b = _numpy_to_torch(b)
    elif aac.is_torch_array(b) and isinstance(a, np.ndarray):
        a = _numpy_to_torch(a)
    return a, b


def _namespace(a, b):
    """The array namespace of the pair. NumPy 2 is itself an array-API namespace, so plain
    ndarrays use ``numpy`` directly: the compat wrapper costs ~0.2 s of imports per process
    (numpy.testing, numpy.ma), a fifth of a whole 1 GiB diff."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and hasattr(np, "isdtype"):
        return np
    return aac.array_namespace(a, b)


def _backend_for(xp, a, b) -> _Backend:
    if aac.is_numpy_namespace(xp):
        return _NumpyBackend(xp, "cpu")
    if aac.is_torch_namespace(xp):
        dev = a.device
        if dev.type == "cpu" and b.device.type != "cpu":
            dev = b.device  # compute on the accelerator
        return _TorchBackend(xp, dev)
    return _Backend(xp, aac.device(a))


# ------------------------------------------------------------------------ blocks


class _Acc:
    """Running statistics over blocks."""

    def __init__(self):
        self.mismatched = 0
        self.max_abs = 0.0
        self.max_abs_int = 0  # exact, integer plans
        self.max_rel = 0.0
        self.dot = 0.0
        self.na = 0.0
        self.nb = 0.0

    def add_identical(self, sq: float):
        self.dot += sq
        self.na += sq
        self.nb += sq

    def merge(self, o: _Acc) -> None:
        self.mismatched += o.mismatched
        self.max_abs = max(self.max_abs, o.max_abs)
        self.max_abs_int = max(self.max_abs_int, o.max_abs_int)
        if o.max_rel > self.max_rel:
            self.max_rel = o.max_rel
        self.dot += o.dot
        self.na += o.na
        self.nb += o.nb


def _worker_count() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_WORKERS))


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:  # noqa: SLF001 - our own pool
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsurgery-compare")
        return _POOL


def parallel_map(fn, n: int, min_items: int = 2) -> list:
    """``[fn(k) for k in range(n)]``, spread over up to ``_worker_count()`` threads.

    Only worth it where ``fn`` spends its time outside the GIL (numpy loops, BLAS,
    ctypes calls). Items are taken in turn from one counter and every result lands at
    its own index, so the list is the same whatever the number of threads. Fewer than
    ``min_items`` items run on the calling thread. numpy's floating-point warnings are
    off while ``fn`` runs (on every thread): the callers handle non-finite results.
    """
    workers = min(_worker_count(), n // min_items) if n >= min_items > 0 else 1
    out: list = [None] * n
    counter = itertools.count()  # next() is atomic: threads take items in turn

    def work() -> None:
        with np.errstate(all="ignore"):  # thread-local
            while (k := next(counter)) < n:
                out[k] = fn(k)

    if workers <= 1:
        work()
        return out

    futures = [_pool(workers - 1).submit(work) for _ in range(workers - 1)]
    try:
        work()
    finally:
        for f in futures:
            f.result()
    return out


class _Cmp:
    """Per-call settings and the block computations (array API, plus ``be.dot``)."""

    def __init__(self, xp, be, plan, name_a, name_b, atol, rtol):
        self.xp = xp
        self.be = be
        self.plan = plan
        self.name_a, self.name_b = name_a, name_b
        self.atol, self.rtol = atol, rtol
        self.exact = atol == 0 and rtol == 0
        self.complex = plan == "complex"
        self.wide = xp.complex128 if self.complex else xp.float64

    # -- helpers

    def _wide(self, x):
        return self.xp.astype(x, self.wide, copy=False)

    def _f64(self, x):
        return self.xp.astype(x, self.xp.float64, copy=False)

    def _count(self, mask) -> int:
        xp = self.xp
        if hasattr(xp, "count_nonzero"):  # array API 2024.12
            return int(xp.count_nonzero(mask))
        return int(xp.sum(xp.astype(mask, xp.int64)))

    def _max(self, x) -> float:
        return float(self.xp.max(x))

    def _dot(self, x, y) -> float:
        """Re(sum x * conj(y)) in float64 (complex128)."""
        return self.be.dot(x, y)

    def _exact_eq(self, x, y, all_finite: bool):
        """Same value and same zero sign, or both NaN (real inputs)."""
        xp = self.xp
        same = (x == y) & (xp.signbit(x) == xp.signbit(y))
        if all_finite:
            return same
        return same | (xp.isnan(x) & xp.isnan(y))

    # -- identical blocks

    def self_dot(self, x, name: str) -> float:
        """Sum of squares of a block over its finite values, in float64 (inf on overflow)."""
        xp = self.xp
        kind = _kind(name)
        wide = xp.complex128 if kind == "complex" else xp.float64
        s = self.be.sumsq(x, wide)
        if math.isfinite(s) or kind not in ("float", "complex"):
            return s
        w = xp.astype(x, wide, copy=False)
        w = xp.where(xp.isfinite(w), w, xp.zeros_like(w))
        return self.be.dot(w, w)

    def any_nonzero(self, x, name: str) -> bool:
        """Whether a block holds a finite non-zero value (the cosine of an identical pair)."""
        xp = self.xp
        kind = _kind(name)
        wide = xp.complex128 if kind == "complex" else xp.float64
        s = self.be.sumsq(x, wide)  # no temporaries on the common path
        if 0 < s < math.inf:
            return True
        if s == 0 and name not in ("float64", "complex128"):  # no underflow possible
            return False
        if kind not in ("float", "complex"):
            return s > 0
        w = xp.astype(x, wide, copy=False)
        return bool(xp.any(xp.isfinite(w) & (w != 0)))

    # -- differing blocks

    def block(self, a, b, acc: _Acc):
        if self.plan in ("float", "complex"):
            self._float_block(a, b, acc)
        else:
            self._int_block(a, b, acc)

    def _float_block(self, a, b, acc: _Acc):
        xp = self.xp
        n = a.shape[0]
        A, B = self._wide(a), self._wide(b)
        na, nb = self._dot(A, A), self._dot(B, B)
        # Finite sums of squares <=> every value is finite (and not huge): the common
        # case needs no masks.
        all_fin = math.isfinite(na) and math.isfinite(nb)
        if all_fin:
            fin = None
            acc.dot += self._dot(A, B)
        else:
            fin = xp.isfinite(A) & xp.isfinite(B)
            all_fin = self._count(fin) == n  # huge finite values: sums overflowed
            zero = xp.zeros_like(A)
            Af, Bf = xp.where(fin, A, zero), xp.where(fin, B, zero)
            na, nb = self._dot(Af, Af), self._dot(Bf, Bf)
            acc.dot += self._dot(Af, Bf)
        acc.na += na
        acc.nb += nb

        diff = xp.abs(A - B)  # float64 also for complex (modulus)
        absb = xp.abs(B)
        if self.exact:
            if self.complex:
                ok = self._exact_eq(xp.real(A), xp.real(B), all_fin)
                ok = ok & self._exact_eq(xp.imag(A), xp.imag(B), all_fin)
            else:
                ok = self._exact_eq(A, B, all_fin)
        else:
            bound = self.rtol * absb if self.rtol else xp.zeros_like(absb)
            if self.atol:
                bound = bound + self.atol
            ok = diff <= bound
            if not all_fin:  # non-finite values are close only when equal (or both NaN)
                ok = (ok & fin) | (A == B) | (xp.isnan(A) & xp.isnan(B))
        bad = n - self._count(ok)
        acc.mismatched += bad
        if not all_fin:
            if bad and self._count(~ok & ~fin):  # unbounded difference
                acc.max_abs = math.inf
                acc.max_rel = math.inf
            diff = xp.where(fin, diff, xp.zeros_like(diff))
            absb = xp.where(fin, absb, xp.zeros_like(absb))
        acc.max_abs = max(acc.max_abs, self._max(diff))
        # |a-b| / |b|, with 0 where the difference is 0 (also when b == 0)
        r = diff / (absb + xp.astype(diff == 0, xp.float64))
        acc.max_rel = max(acc.max_rel, self._max(r))

    def _key(self, x):
        """int64 keys whose wrapped differences are exact (see module doc)."""
        xp = self.xp
        k = xp.astype(x, xp.int64, copy=False)  # uint64 wraps
        if self.plan == "int":
            return k
        return xp.bitwise_xor(k, _INT64_MIN)  # value - 2**63: unsigned order as signed

    def _int_block(self, a, b, acc: _Acc):
        xp = self.xp
        n = a.shape[0]
        KA, KB = self._key(a), self._key(b)
        VA, VB = self._f64(a), self._f64(b)
        D = KA - KB  # wraps; read as unsigned, the exact |a - b| after the sign fix
        D = xp.where(KA >= KB, D, -D)
        eq = KA == KB
        high = D < 0  # |a - b| >= 2**63
        Df = self._f64(D) + xp.astype(high, xp.float64) * _TWO64
        neg = None
        if self.plan == "mixed":  # a negative signed value vs uint64: 65-bit territory
            neg = (a < 0) if _kind(self.name_a) == "int" else (b < 0)
            eq = eq & ~neg
            Df = xp.where(neg, xp.abs(VA - VB), Df)
            D = xp.where(neg, xp.zeros_like(D), D)
            high = high & ~neg
        absb = xp.abs(VB)
        if self.exact:
            ok = eq
        else:
            ok = eq | (Df <= self.atol + self.rtol * absb)
        acc.mismatched += n - self._count(ok)
        if bool(xp.any(high)):
            m = int(xp.max(xp.where(high, D, xp.full_like(D, _INT64_MIN)))) + (1 << 64)
        else:
            m = int(xp.max(D))
        acc.max_abs_int = max(acc.max_abs_int, m)
        if neg is not None and bool(xp.any(neg)):
            acc.max_abs = max(acc.max_abs, self._max(xp.where(neg, Df, xp.zeros_like(Df))))
        r = Df / (absb + xp.astype(Df == 0, xp.float64))
        acc.max_rel = max(acc.max_rel, self._max(r))
        acc.dot += self._dot(VA, VB)
        acc.na += self._dot(VA, VA)
        acc.nb += self._dot(VB, VB)

    # -- cosine with rescaling (rare: float64 overflow / underflow)

    def rescaled_sums(self, blocks) -> tuple[float, float, float]:
        xp = self.xp
        ma = mb = 0.0
        for a, b in blocks():
            A, B = self._wide(a), self._wide(b)
            fin = xp.isfinite(A) & xp.isfinite(B)
            z = xp.zeros(A.shape, dtype=xp.float64, device=aac.device(A))
            ma = max(ma, self._max(xp.where(fin, xp.abs(A), z)))
            mb = max(mb, self._max(xp.where(fin, xp.abs(B), z)))
        if ma == 0 or mb == 0:
            return 0.0, 0.0, 0.0
        dot = na = nb = 0.0
        for a, b in blocks():
            A, B = self._wide(a), self._wide(b)
            fin = xp.isfinite(A) & xp.isfinite(B)
            zero = xp.zeros_like(A)
            Af = xp.where(fin, A, zero) / ma
            Bf = xp.where(fin, B, zero) / mb
            dot += self._dot(Af, Bf)
            na += self._dot(Af, Af)
            nb += self._dot(Bf, Bf)
        return dot, na, nb


def _ddot(x, y) -> float:
    """sum(x * y) of two 1-D float64 numpy arrays, in pieces OpenBLAS runs on one thread."""
    n = x.shape[0]
    if n <= _DOT_PIECE:
        return float(np.dot(x, y))
    total = 0.0
    for i in range(0, n, _DOT_PIECE):
        total += float(np.dot(x[i : i + _DOT_PIECE], y[i : i + _DOT_PIECE]))
    return total


class _FloatKernel:
    """Statistics of real-float numpy blocks in two reused float64 buffers.

    Per block of at most ``size`` elements, each side is cast once into its float64
    buffer. Finite float64 sums of squares mean that every value is finite and below
    ~1e154 (no difference can overflow): such a block needs no masks and every pass runs
    in place. Its results are exactly those of ``_Cmp._float_block``, which takes the
    other blocks (NaN, inf, huge values) in ``_CPU_STATS_ELEMS`` sub-blocks:

    * zero tolerance: a finite pair is equal iff its float64 values are bit-identical
      (same value and same zero sign); for same-dtype inputs iff the input bytes are
      (the cast to float64 is exact and one to one on non-NaN values);
    * ``max_rel``: ``fmax`` over ``|a - b| / |b|`` skips the NaN of 0 / 0, where the
      general path divides by ``|b| + 1`` to get 0; every other quotient is the same.

    Same-dtype blocks whose bytes are identical only add their sum of squares.

    Blocks run on up to ``_worker_count()`` threads (numpy releases the GIL), each with
    its own buffers. Every block gets its own partial statistics, merged in block order:
    the results do not depend on the number of threads or on their timing.
    """

    def __init__(self, cmp: _Cmp, dtype_a, dtype_b, size: int):
        self.cmp = cmp
        self.dtypes = (np.dtype(dtype_a), np.dtype(dtype_b))
        self.size = max(1, int(size))
        self.A = np.empty(self.size, dtype=np.float64)
        self.B = np.empty(self.size, dtype=np.float64)
        self.T = None if cmp.exact else np.empty(self.size, dtype=np.float64)
        self.mask = np.empty(self.size, dtype=bool)
        self.ucode = _UINT.get(self.dtypes[0].itemsize) if self.dtypes[0] == self.dtypes[1] else None
        self._local = threading.local()  # other threads' kernels: own buffers, own backend

    def _for_this_thread(self, caller: int) -> _FloatKernel:
        if threading.get_ident() == caller:
            return self
        kernel = getattr(self._local, "kernel", None)
        if kernel is None:
            c = self.cmp
            cmp = _Cmp(np, _NumpyBackend(np, "cpu"), c.plan, c.name_a, c.name_b, c.atol, c.rtol)
            kernel = self._local.kernel = _FloatKernel(cmp, *self.dtypes, self.size)
        return kernel

    def run(self, a, b, acc: _Acc) -> None:
        """Add the statistics of two 1-D numpy arrays of the same length to ``acc``."""
        size, caller = self.size, threading.get_ident()

        def block(k: int) -> _Acc:
            part = _Acc()
            self._for_this_thread(caller)._block(a[k * size : (k + 1) * size], b[k * size : (k + 1) * size], part)
            return part

        for part in parallel_map(block, -(-a.shape[0] // size), min_items=_PARALLEL_MIN_BLOCKS):
            acc.merge(part)

    def _block(self, a, b, acc: _Acc) -> None:
        cmp = self.cmp
        m = a.shape[0]
        mask = self.mask[:m]
        same = -1  # pairs that are equal at zero tolerance, once known
        if self.ucode is not None:
            same = int(np.count_nonzero(np.equal(a.view(self.ucode), b.view(self.ucode), out=mask)))
        A = self.A[:m]
        np.copyto(A, a, casting="unsafe")
        if same == m:
            s = _ddot(A, A)
            acc.add_identical(s if math.isfinite(s) else cmp.self_dot(a, cmp.name_a))
            return
        B = self.B[:m]
        np.copyto(B, b, casting="unsafe")
        na, nb = _ddot(A, A), _ddot(B, B)
        if not (math.isfinite(na) and math.isfinite(nb)):
            step = _CPU_STATS_ELEMS
            for i in range(0, m, step):
                cmp.block(a[i : i + step], b[i : i + step], acc)
            return
        acc.dot += _ddot(A, B)
        acc.na += na
        acc.nb += nb
        if cmp.exact and same < 0:
            same = int(np.count_nonzero(np.equal(A.view(np.uint64), B.view(np.uint64), out=mask)))
        diff = np.abs(np.subtract(A, B, out=A), out=A)
        acc.max_abs = max(acc.max_abs, float(diff.max()))
        absb = np.abs(B, out=B)
        if not cmp.exact:  # |a - b| <= atol + rtol * |b|, the operations of _float_block
            bound = self.T[:m]
            np.multiply(absb, cmp.rtol, out=bound)
            if cmp.atol:
                np.add(bound, cmp.atol, out=bound)
            same = int(np.count_nonzero(np.less_equal(diff, bound, out=mask)))
        acc.mismatched += m - same
        r = float(np.fmax.reduce(np.divide(diff, absb, out=diff)))
        if r > acc.max_rel:  # NaN (every quotient 0 / 0) never is
            acc.max_rel = r


def _differing(cmp: _Cmp, be: _Backend, kernel: _FloatKernel | None, x, y, acc: _Acc, small: int) -> None:
    """Statistics of a block whose bytes differ somewhere; identical sub-blocks only add
    their sum of squares."""
    if kernel is not None:
        kernel.run(x, y, acc)
        return
    same_dtype = cmp.name_a == cmp.name_b and be.can_bits
    for i in range(0, x.shape[0], small):
        xs, ys = x[i : i + small], y[i : i + small]
        if same_dtype and xs.shape[0] < x.shape[0] and be.bits_equal(xs, ys):
            acc.add_identical(cmp.self_dot(xs, cmp.name_a))
        else:
            cmp.block(xs, ys, acc)


class PairStream:
    """Statistics of one pair of flat numpy arrays fed piece by piece, with cosine sums.

    For ``wsurgery.compare``, which screens raw bytes itself and feeds the pieces whose
    bytes differ (and every piece of a pair whose dtypes differ). Per element the rules
    are exactly ``compare_arrays``'s; over pieces the statistics combine (counts add,
    maxima take the maximum). ``sums`` are the float64 ``(dot, |a|^2, |b|^2)`` over the
    finite pairs, not rescaled: non-finite sums mean the caller must rescale.
    """

    def __init__(self, dtype_a, dtype_b, *, atol=0.0, rtol=0.0):
        atol, rtol, _ = _check_args(atol, rtol, 1)
        name_a, name_b = _dtype_name(dtype_a), _dtype_name(dtype_b)
        plan = _plan(name_a, name_b)
        self._be = _NumpyBackend(np, "cpu")
        self._cmp = _Cmp(np, self._be, plan, name_a, name_b, atol, rtol)
        self._acc = _Acc()
        itemsize = max(np.dtype(dtype_a).itemsize, np.dtype(dtype_b).itemsize)
        self._small = _cpu_blocks(DEFAULT_CHUNK_ELEMS, itemsize)[1]
        self._kernel = _FloatKernel(self._cmp, dtype_a, dtype_b, _FAST_ELEMS) if plan == "float" else None

    def add(self, x, y) -> None:
        """Compare one piece: 1-D numpy arrays of the stream's dtypes and the same length."""
        if x.shape[0] != y.shape[0]:
            raise SurgeryError(f"shape mismatch: {list(x.shape)} vs {list(y.shape)}")
        with np.errstate(all="ignore"):
            _differing(self._cmp, self._be, self._kernel, x, y, self._acc, self._small)

    @property
    def mismatched(self) -> int:
        return self._acc.mismatched

    @property
    def max_abs_diff(self) -> float:
        return max(self._acc.max_abs, float(self._acc.max_abs_int))

    @property
    def max_rel_diff(self) -> float:
        return self._acc.max_rel

    @property
    def sums(self) -> tuple[float, float, float]:
        return self._acc.dot, self._acc.na, self._acc.nb


def _cosine(dot: float, na: float, nb: float) -> float | None:
    if not (na > 0 and nb > 0):
        return None
    p = na * nb  # one rounding less than sqrt(na) * sqrt(nb), unless out of range
    norm = math.sqrt(p) if sys.float_info.min <= p < math.inf else math.sqrt(na) * math.sqrt(nb)
    c = dot / norm
    return min(1.0, max(-1.0, c))


# -------------------------------------------------------------------------- API


def _check_args(atol, rtol, chunk_elems) -> tuple[float, float, int]:
    try:
        atol, rtol = float(atol), float(rtol)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"atol and rtol must be numbers, got {atol!r}, {rtol!r}") from exc
    if not (atol >= 0 and rtol >= 0):  # also rejects NaN
        raise UsageError(
            f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}",
            hint="pass a non-negative tolerance",
        )
    if int(chunk_elems) < 1:
        raise UsageError(f"chunk_elems must be >= 1, got {chunk_elems}")
    return atol, rtol, int(chunk_elems)


def compare_arrays(a, b, *, atol=0.0, rtol=0.0, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> TensorStats:
    """Compare two same-shape arrays / tensors (numpy, or torch on any device).

    ``a`` and ``b`` may be numpy arrays (also ``ml_dtypes`` bfloat16 / float8), torch
    tensors, or anything ``numpy.asarray`` takes; dtypes may differ. A CPU tensor is
    compared through a numpy view; a numpy array against an accelerator tensor goes to
    that device; two tensors on different devices meet on the first non-CPU one.
    ``chunk_elems`` bounds the elements processed at once (memory), not the result.

    See the module docstring for the exact semantics. Raises ``SurgeryError`` when the
    shapes differ (both shapes in the message) or a dtype cannot be compared, and
    ``UsageError`` for a negative or NaN tolerance or ``chunk_elems < 1``.
    """
    atol, rtol, chunk_elems = _check_args(atol, rtol, chunk_elems)
    a, b = _coerce_pair(a, b)
    shape_a, shape_b = tuple(int(s) for s in a.shape), tuple(int(s) for s in b.shape)
    if shape_a != shape_b:
        raise SurgeryError(
            f"shape mismatch: {list(shape_a)} vs {list(shape_b)}",
            hint="only tensors of the same shape can be compared element by element",
        )
    name_a, name_b = _dtype_name(a.dtype), _dtype_name(b.dtype)
    plan = _plan(name_a, name_b)
    numel = math.prod(shape_a)
    if numel == 0:
        return TensorStats(True, 0, 0, 0.0, 0.0, None)

    xp = _namespace(a, b)
    be = _backend_for(xp, a, b)
    cmp = _Cmp(xp, be, plan, name_a, name_b, atol, rtol)
    fa, fb = be.flat(a), be.flat(b)
    big, small = be.block_elems(chunk_elems, max(_itemsize(a), _itemsize(b)))
    kernel = None
    if plan == "float" and isinstance(be, _NumpyBackend):
        kernel = _FloatKernel(cmp, fa.dtype, fb.dtype, min(chunk_elems, _FAST_ELEMS, numel))

    def blocks(start: int = 0, stop: int = numel, step: int = small):
        for i in range(start, stop, step):
            j = min(i + step, stop)
            yield be.take(fa, i, j), be.take(fb, i, j)

    acc = _Acc()
    with be.errstate():
        if name_a == name_b and be.can_bits:
            # Phase 1: raw bytes, until the first differing block.
            start = 0
            for x, y in blocks(step=big):
                if not be.bits_equal(x, y):
                    break
                start += x.shape[0]
            if start >= numel:
                any_nz = any(cmp.any_nonzero(x, name_a) for x, _ in blocks(step=big))
                return TensorStats(True, numel, 0, 0.0, 0.0, 1.0 if any_nz else None)
            # Phase 2: the identical prefix only feeds the cosine; from there on,
            # statistics for the sub-blocks whose bytes differ.
            for x, _ in blocks(0, start, big):
                acc.add_identical(cmp.self_dot(x, name_a))
            if kernel is not None:  # skips identical sub-blocks itself; threads
                kernel.run(fa[start:], fb[start:], acc)
                start = numel
            for x, y in blocks(start, numel, big):
                if be.bits_equal(x, y):
                    acc.add_identical(cmp.self_dot(x, name_a))
                else:
                    _differing(cmp, be, kernel, x, y, acc, small)
        elif kernel is not None:
            kernel.run(fa, fb, acc)
        else:
            for x, y in blocks():
                cmp.block(x, y, acc)

        dot, na, nb = acc.dot, acc.na, acc.nb
        wide_inputs = {name_a, name_b} & {"float64", "complex128"}
        if plan in ("float", "complex") and (
            not all(math.isfinite(v) for v in (dot, na, nb)) or (wide_inputs and (na == 0 or nb == 0))
        ):
            dot, na, nb = cmp.rescaled_sums(blocks)

    max_abs = max(acc.max_abs, float(acc.max_abs_int))
    return TensorStats(
        equal=acc.mismatched == 0,
        numel=numel,
        mismatched=acc.mismatched,
        max_abs_diff=max_abs,
        max_rel_diff=acc.max_rel,
        cosine=_cosine(dot, na, nb),
    )


def _itemsize(x) -> int:
    size = getattr(x, "itemsize", None)
    if size is None:
        size = x.element_size() if hasattr(x, "element_size") else x.dtype.itemsize
    return int(size)


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
    return _numpy_to_torch(np.asarray(x)).to(device)
