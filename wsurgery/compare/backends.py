"""The per-element rules of one block pair, on numpy (CPU, no torch) or on torch (any
device): ``_Backend`` gives the primitives the array API lacks, ``_Cmp`` the statistics
of a block (floats, complex, exact integers) and the rescaled sums."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import array_api_compat as aac
import numpy as np

from .arrays import UINT, is_cpu_tensor, numpy_to_torch, torch_to_numpy
from .stats import _Acc, _kind
from .threads import _DOT_PIECE, _float64_dot

DEFAULT_CHUNK_ELEMS = 1 << 24
_CPU_BLOCK_BYTES = 1 << 20  # raw-bytes block per side on CPU
_CPU_STATS_ELEMS = 1 << 13
_SUMSQ_PIECE = 1 << 15  # identical blocks (torch on CPU): sum of squares via one reused buffer
_TORCH_CPU_VIA_NUMPY = True  # tests turn it off to run the torch namespace on CPU
_INT64_MIN = -(1 << 63)
_TWO64 = float(1 << 64)
_NONZERO_BLOCK = 1 << 16  # elements per test of _any_finite_nonzero


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
        u: Any
        if nbytes % 8 == 0:
            u = np.uint64
        else:
            u = UINT.get(x.dtype.itemsize, np.uint8)
        ux, uy = x.view(u), y.view(u)
        if self._buf.size < ux.size:
            self._buf = np.empty(ux.size, dtype=bool)
        out = self._buf[: ux.size]
        np.equal(ux, uy, out=out)
        return bool(out.all())

    def errstate(self):
        return np.errstate(all="ignore")

    def dot(self, x, y) -> float:
        if x.shape[0] > _DOT_PIECE:
            return super().dot(x, y)
        return _float64_dot(y, x)  # short: one BLAS call on the calling thread, no temporary

    def sumsq(self, x, wide) -> float:
        # The hot path for bit-identical blocks. One reused, cache-sized float64 buffer
        # (fresh multi-MiB temporaries page-fault on every block once glibc trims its
        # heap), and a BLAS dot per piece: ~2x the speed of square + pairwise sum.
        if x.dtype.kind == "c":
            return super().sumsq(x, wide)
        n = x.shape[0]
        step = min(n, _DOT_PIECE)
        if self._f64.size < step:
            self._f64 = np.empty(step, dtype=np.float64)
        total = 0.0
        for i in range(0, n, step):
            piece = x[i : i + step]
            w = self._f64[: piece.shape[0]]
            np.copyto(w, piece, casting="unsafe")  # exact: float dtypes fit float64 (ints round)
            total += _float64_dot(w, w)
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
        return 0.0 if total is None else float(total)


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
        na = torch_to_numpy(a) if is_cpu_tensor(a) else a
        nb = torch_to_numpy(b) if is_cpu_tensor(b) else b
        if isinstance(na, np.ndarray) and isinstance(nb, np.ndarray):
            return na, nb
    if aac.is_torch_array(a) and isinstance(b, np.ndarray):
        b = numpy_to_torch(b)
    elif aac.is_torch_array(b) and isinstance(a, np.ndarray):
        a = numpy_to_torch(a)
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
        if isinstance(self.be, _NumpyBackend):
            return _any_finite_nonzero(x)
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
            assert fin is not None  # set where values are not all finite
            if bad and self._count(~ok & ~fin):  # unbounded difference
                acc.max_abs = math.inf
                acc.max_rel = math.inf
                acc.unbounded = True
            diff = xp.where(fin, diff, xp.zeros_like(diff))
            absb = xp.where(fin, absb, xp.zeros_like(absb))
        acc.dd += self._dot(diff, diff)
        acc.max_abs = max(acc.max_abs, self._max(diff))
        # |a-b| / |b|, with 0 where the difference is 0 (also when b == 0)
        r = diff / (absb + xp.astype(diff == 0, xp.float64))
        acc.max_rel = max(acc.max_rel, self._max(r))

    def _key(self, x):
        """int64 keys whose wrapped differences are exact (``docs/compare.md``, "Integers")."""
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
        acc.dd += self._dot(Df, Df)  # the exact difference, rounded once

    # -- cosine with rescaling (rare: float64 overflow / underflow)

    def rescaled_sums(self, blocks) -> tuple[float, ...]:
        """``(dot, na, nb, dd, ma, mb, s)``: the sums over the finite pairs of ``a / ma``
        and ``b / mb`` (``ma``, ``mb``: the largest finite magnitudes), and ``dd`` of
        ``a / s - b / s`` with ``s = max(ma, mb)``: in range whatever the values."""
        xp = self.xp
        ma = mb = 0.0
        for a, b in blocks():
            A, B = self._wide(a), self._wide(b)
            fin = xp.isfinite(A) & xp.isfinite(B)
            z = xp.zeros(A.shape, dtype=xp.float64, device=aac.device(A))
            ma = max(ma, self._max(xp.where(fin, xp.abs(A), z)))
            mb = max(mb, self._max(xp.where(fin, xp.abs(B), z)))
        s = max(ma, mb)
        if s == 0:
            return 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0
        ma, mb = ma or 1.0, mb or 1.0  # a side that is all zeros stays all zeros
        dot = na = nb = dd = 0.0
        for a, b in blocks():
            A, B = self._wide(a), self._wide(b)
            fin = xp.isfinite(A) & xp.isfinite(B)
            zero = xp.zeros_like(A)
            A, B = xp.where(fin, A, zero), xp.where(fin, B, zero)
            Af, Bf = A / ma, B / mb
            dot += self._dot(Af, Bf)
            na += self._dot(Af, Af)
            nb += self._dot(Bf, Bf)
            D = A / s - B / s
            dd += self._dot(D, D)
        return dot, na, nb, dd, ma, mb, s


def _any_finite_nonzero(x: np.ndarray) -> bool:
    """Whether ``x`` holds a finite non-zero value (any dtype)."""
    kind = x.dtype.kind
    for i in range(0, x.shape[0], _NONZERO_BLOCK):
        xs = x[i : i + _NONZERO_BLOCK]
        if kind == "b":
            hit = xs.any()
        elif kind in "iu":
            hit = np.any(xs != 0)
        else:  # float, complex, ml_dtypes (kind "V")
            w = xs if kind in "fc" else xs.astype(np.float32)
            hit = np.any(np.isfinite(w) & (w != 0))
        if hit:
            return True
    return False
