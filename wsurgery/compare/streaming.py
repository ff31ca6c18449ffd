"""Streaming one tensor pair (``compare_flat``): raw bytes screened with ``memcmp``,
cosine sums of identical blocks summed on threads, pages released behind each chunk;
``l2_norm`` of one side. ``docs/compare.md`` "Streaming and screening"."""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from collections.abc import Callable

import numpy as np

from .arrays import UINT, dtype_name, itemsize, to_device
from .backends import DEFAULT_CHUNK_ELEMS, _any_finite_nonzero
from .float_kernel import PairStream, _compare, compare_arrays
from .stats import TensorStats, Tuning, _Acc, _cosine, _l2, _needs_rescale, _plan
from .threads import _float64_dot, _with_one_blas_thread, parallel_map

CHUNK_BYTES = 32 << 20  # per side: pages are released behind each chunk
SCREEN_BYTES = 512 << 10  # raw-bytes screening block per side (same-dtype pairs on CPU; stays in L2)
SCREEN_PIECE_BYTES = 64 << 10  # a differing block goes to the kernel in runs of such pieces
_SUMS_BLOCK = 1 << 16  # elements per float64 block of the cosine sums (stays in cache)
_SUMS_TASK = 4  # blocks per thread task of _identical_sums
_PENDING_STEP = 1 << 22  # elements re-read at once for the sums of an identical prefix


# ----------------------------------------------------------------- byte screening


@functools.cache
def _memcmp():
    """libc's ``memcmp`` through ctypes (it runs without the GIL), or None where the
    system has none: the screening then compares with numpy on one thread."""
    try:
        import ctypes

        libc = ctypes.CDLL(None) if os.name == "posix" else ctypes.cdll.msvcrt
        fn = libc.memcmp
    except (ImportError, OSError, AttributeError):  # pragma: no cover - no libc to call
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


def _blocks_equal(x: np.ndarray, y: np.ndarray, block: int, ucode, eq: np.ndarray, workers: int) -> list[bool]:
    """Whether the bytes of each ``block``-element block of ``x`` and ``y`` (same dtype,
    same length, 1-D) are identical.

    ``memcmp`` on up to ``workers`` threads where it can be called (it reads at
    memory bandwidth and stops at the first difference: measured 18-21 GB/s of input on
    two cores, against 12 for numpy's ``equal`` on one); numpy otherwise, with ``eq`` as
    scratch.
    """
    n = x.shape[0]
    count = -(-n // block)
    memcmp = _memcmp()
    if memcmp is not None and x.flags.c_contiguous and y.flags.c_contiguous:
        isz = x.dtype.itemsize
        pa, pb = x.__array_interface__["data"][0], y.__array_interface__["data"][0]

        def one(b: int) -> bool:
            start = b * block * isz
            return memcmp(pa + start, pb + start, min(block, n - b * block) * isz) == 0

        # x and y (the callers' views of the mapped files) stay alive until this returns
        return parallel_map(one, count, workers=workers, min_items=8)
    same = []
    for i in range(0, n, block):
        out = eq[: min(block, n - i)]
        same.append(bool(np.equal(x[i : i + block].view(ucode), y[i : i + block].view(ucode), out=out).all()))
    return same


def _runs(eq: np.ndarray, start: int, piece: int) -> list[list]:
    """Split a block into runs of ``piece``-element pieces that are all equal or all not:
    ``[[start, stop, equal], ...]`` (``eq``: elementwise byte equality of the block)."""
    runs: list[list] = []
    for k in range(0, eq.shape[0], piece):
        stop = min(k + piece, eq.shape[0])
        same = bool(eq[k:stop].all())
        if runs and runs[-1][2] == same:
            runs[-1][1] = start + stop
        else:
            runs.append([start + k, start + stop, same])
    return runs


# ------------------------------------------------------------------- cosine sums


class _Buffers:
    """Reused float64 / complex128 scratch blocks: no allocation per block."""

    def __init__(self):
        self._bufs: dict = {}

    def get(self, dtype, slot: int) -> np.ndarray:
        key = (np.dtype(dtype).str, slot)
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < _SUMS_BLOCK:
            buf = self._bufs[key] = np.empty(_SUMS_BLOCK, dtype=dtype)
        return buf


_LOCAL = threading.local()  # per-thread scratch of the identical sums


def _square_sum(w: np.ndarray) -> float:
    """Sum of |w|^2 over the finite values of a float64 / complex128 block."""
    s = _float64_dot(w, w)
    if not math.isfinite(s):
        w = np.where(np.isfinite(w), w, 0)
        s = _float64_dot(w, w)
    return s


def _identical_sums(x: np.ndarray, ranges: list[tuple[int, int]], workers: int) -> list[float]:
    """``_sums_numpy(x[i:j], None)[0]`` for each range, bit for bit: the same
    ``_SUMS_BLOCK`` blocks, folded in the same order, but computed on up to ``workers``
    threads (tasks of ``_SUMS_TASK`` blocks, little Python per block,
    so that the threads mostly run outside the GIL)."""
    cplx = x.dtype.kind == "c"
    wide = np.complex128 if cplx else np.float64
    blocks = [(r, k, min(k + _SUMS_BLOCK, j)) for r, (i, j) in enumerate(ranges) for k in range(i, j, _SUMS_BLOCK)]
    tasks = [blocks[t : t + _SUMS_TASK] for t in range(0, len(blocks), _SUMS_TASK)]

    def one(t: int) -> list[float]:
        bufs = getattr(_LOCAL, "bufs", None)
        if bufs is None:
            bufs = _LOCAL.bufs = _Buffers()
        buf = bufs.get(wide, 0)
        out = []
        for _, k, stop in tasks[t]:  # (an overflowing sum is handled: warnings are off)
            w = buf[: stop - k]
            np.copyto(w, x[k:stop], casting="unsafe")
            out.append(_square_sum(w))
        return out

    totals = [0.0] * len(ranges)
    for task, sums in zip(tasks, parallel_map(one, len(tasks), workers=workers), strict=True):
        for (r, _, _), v in zip(task, sums, strict=True):
            totals[r] += v  # block order within a range: the fold of _sums_numpy
    return totals


def _sums_numpy(x: np.ndarray, y: np.ndarray | None, bufs: _Buffers) -> tuple[float, float, float]:
    """(Re sum x conj(y), sum |x|^2, sum |y|^2) in float64 over positions where both are finite.

    ``y`` None: the caller knows both sides hold the same finite values (only x is read).
    Blocks whose bytes are identical are read once; values are only masked for
    finiteness when a sum comes out non-finite.
    """
    cplx = x.dtype.kind == "c" or (y is not None and y.dtype.kind == "c")
    wide = np.complex128 if cplx else np.float64
    ucode = UINT.get(x.dtype.itemsize) if y is not None and x.dtype == y.dtype else None
    wa, wb = bufs.get(wide, 0), bufs.get(wide, 1)
    dot = na = nb = 0.0
    with np.errstate(all="ignore"):
        for i in range(0, x.shape[0], _SUMS_BLOCK):
            xs = x[i : i + _SUMS_BLOCK]
            m = xs.shape[0]
            A = wa[:m]
            np.copyto(A, xs, casting="unsafe")
            ys = None if y is None else y[i : i + m]
            if ys is None or (ucode is not None and np.array_equal(xs.view(ucode), ys.view(ucode))):
                s = _square_sum(A)
                dot, na, nb = dot + s, na + s, nb + s
                continue
            B = wb[:m]
            np.copyto(B, ys, casting="unsafe")
            d, sa, sb = _float64_dot(B, A), _float64_dot(A, A), _float64_dot(B, B)
            if not (math.isfinite(d) and math.isfinite(sa) and math.isfinite(sb)):
                fin = np.isfinite(A) & np.isfinite(B)
                A, B = np.where(fin, A, 0), np.where(fin, B, 0)
                d, sa, sb = _float64_dot(B, A), _float64_dot(A, A), _float64_dot(B, B)
            dot, na, nb = dot + d, na + sa, nb + sb
    return dot, na, nb


def _sums_torch(x, y) -> tuple[float, float, float]:
    """``_sums_numpy`` for torch tensors on any device (``y`` None: identical values)."""
    import torch

    cplx = x.is_complex() or (y is not None and y.is_complex())
    wide = torch.complex128 if cplx else torch.float64

    def sq(w) -> float:
        return float(torch.vdot(w, w).real) if cplx else float(torch.dot(w, w))

    A = x.to(wide)
    fa = torch.isfinite(A)
    if y is None:
        s = sq(torch.where(fa, A, torch.zeros_like(A)))
        return s, s, s
    B = y.to(wide)
    fin = fa & torch.isfinite(B)
    A, B = torch.where(fin, A, torch.zeros_like(A)), torch.where(fin, B, torch.zeros_like(B))
    dot = float(torch.vdot(B, A).real) if cplx else float(torch.dot(A, B))
    return dot, sq(A), sq(B)


# --------------------------------------------------------------------------- streaming


class _Streaming:
    """One tensor pair compared piece by piece, in order (``compare_flat``).

    Mismatch statistics and cosine sums go to one ``_Acc``. The sums are only computed
    once some piece is not bit-identical: the identical pieces seen before are then read
    again, once."""

    def __init__(self, fa, fb, dev: str | None, release, atol: float, rtol: float, tuning: Tuning):
        self.fa, self.fb, self.dev, self.release = fa, fb, dev, release
        self.atol, self.rtol, self.tuning = atol, rtol, tuning
        self.acc = _Acc()
        self.summing = False  # the cosine sums have started
        self.nonzero = False  # some finite non-zero value in the identical pieces
        self.pending: list[list[int]] = []  # identical [start, stop) ranges not yet summed
        self.held: list[tuple[int, int]] = []  # identical ranges to add to the sums at flush()
        self.bufs = _Buffers()
        self.pieces: PairStream | None = None  # numpy pieces: statistics and sums in one pass

    def _add(self, x, y) -> None:
        self.acc.add_sums(*(_sums_numpy(x, y, self.bufs) if self.dev is None else _sums_torch(x, y)))

    def identical(self, i: int, j: int, x, nonzero=None) -> None:
        """Elements ``[i, j)`` hold the same finite values on both sides (``x``: side A).
        ``nonzero``: whether they hold a finite non-zero value, when the caller knows."""
        if self.summing:
            if self.dev is None:  # numpy: summed at flush(), on the worker threads
                self.held.append((i, j))
            else:
                self._add(x, None)
            return
        if self.pending and self.pending[-1][1] == i:
            self.pending[-1][1] = j
        else:
            self.pending.append([i, j])
        if not self.nonzero:
            self.nonzero = _any_finite_nonzero(x) if nonzero is None else nonzero

    def _add_identical(self, ranges: list[tuple[int, int]]) -> None:
        for s in _identical_sums(self.fa, ranges, self.tuning.workers):
            self.acc.add_identical(s)

    def flush(self) -> None:
        """Add the sums of the identical ranges held back (before their pages go)."""
        if self.held:
            held, self.held = self.held, []
            self._add_identical(held)

    def _start_sums(self) -> None:
        if not self.summing:
            self.summing = True
            for i, j in self.pending:
                for k in range(i, j, _PENDING_STEP):
                    stop = min(k + _PENDING_STEP, j)
                    if self.dev is None:
                        self._add_identical([(k, stop)])
                    else:
                        self._add(to_device(self.fa[k:stop], self.dev), None)
                    self.release(k, stop)
            self.pending = []

    def different(self, x, y) -> None:
        """A piece already compared on its own: only its cosine sums are still to add."""
        self._start_sums()
        self._add(x, y)

    def compare(self, x, y) -> None:
        """A numpy piece whose bytes (or dtypes) differ: ``PairStream`` gives its
        statistics and its cosine sums in one pass."""
        self._start_sums()
        if self.pieces is None:
            self.pieces = PairStream(x.dtype, y.dtype, atol=self.atol, rtol=self.rtol, tuning=self.tuning)
        self.pieces.add(x, y)

    def result(self, n: int) -> TensorStats:
        self.flush()
        acc = self.acc
        if self.pieces is not None:
            acc.merge(self.pieces._acc)
            self.pieces = None
        if not self.summing:  # bit-identical: nothing summed
            return acc.stats(n, 1.0 if self.nonzero else None, (0.0, None, None, 0.0))
        cosine = _cosine(acc.dot, acc.na, acc.nb)
        norms = _l2(acc.na, acc.nb, acc.dd, acc.unbounded)
        name_a, name_b = dtype_name(self.fa.dtype), dtype_name(self.fb.dtype)
        for_cosine, for_norms = _needs_rescale(_plan(name_a, name_b), {name_a, name_b}, acc)
        if for_cosine or for_norms:
            # float64 sums out of range: compare_arrays rescales (one whole-tensor pass)
            n_all = int(self.fa.shape[0])  # a strided input (StridedFlat) is read here whole
            fa, fb = to_device(self.fa[0:n_all], self.dev), to_device(self.fb[0:n_all], self.dev)
            whole = compare_arrays(fa, fb, tuning=self.tuning)
            if for_cosine:
                cosine = whole.cosine
            if for_norms:
                norms = (whole.rel_l2, whole.norm_a, whole.norm_b, whole.norm_diff)
        return acc.stats(n, cosine, norms)


def l2_norm(
    flat,
    *,
    device: str | None,
    tuning: Tuning,
    release: Callable[[int, int], None] | None = None,
    chunk_bytes: int | None = None,
) -> float:
    """``||x||`` of a flat array over its finite values, streamed chunk by chunk: float64
    sums of squares in the fixed blocks of the cosine sums (the same bits whatever the
    tuning), rescaled by the largest magnitude when they leave float64's range.

    Args:
        flat: a 1-D numpy array (``device`` None) or torch tensor (moved to ``device``
            chunk by chunk).
        device: None for numpy, else a torch device string.
        tuning: threads for the sums.
        release: ``release(start_byte, stop_byte)`` after each chunk.
        chunk_bytes: bytes per chunk (default ``CHUNK_BYTES``).
    """
    n = int(flat.shape[0])
    isz = itemsize(flat)
    step = max(_SUMS_BLOCK, (chunk_bytes or CHUNK_BYTES) // isz // _SUMS_BLOCK * _SUMS_BLOCK)

    def chunks():
        for c0 in range(0, n, step):
            c1 = min(c0 + step, n)
            yield c0, c1, (flat[c0:c1] if device is None else to_device(flat[c0:c1], device))
            if release is not None:
                release(c0 * isz, c1 * isz)

    total = 0.0
    for c0, c1, x in chunks():
        total += _identical_sums(flat, [(c0, c1)], tuning.workers)[0] if device is None else _sums_torch(x, None)[1]
    wide = dtype_name(flat.dtype) in ("float64", "complex128")
    if math.isfinite(total) and not (wide and total < sys.float_info.min):
        return math.sqrt(total)
    # out of float64's range: scale by the largest finite magnitude (two more passes)
    with np.errstate(all="ignore"):
        m = 0.0
        for _, _, x in chunks():
            m = max(m, _max_finite_abs(x))
        if m == 0:
            return 0.0
        s = 0.0
        for _, _, x in chunks():
            s += _scaled_square_sum(x, m)
    return m * math.sqrt(s)


def _max_finite_abs(x) -> float:
    if isinstance(x, np.ndarray):
        w = np.abs(x.astype(np.complex128 if x.dtype.kind == "c" else np.float64))
        w = w[np.isfinite(w)]
        return float(w.max()) if w.size else 0.0
    import torch

    w = x.abs().to(torch.float64)
    w = w[torch.isfinite(w)]
    return float(w.max()) if w.numel() else 0.0


def _scaled_square_sum(x, m: float) -> float:
    """Sum of |x / m|^2 over the finite values, in ``_SUMS_BLOCK`` blocks folded in order."""
    total = 0.0
    for i in range(0, int(x.shape[0]), _SUMS_BLOCK):
        piece = x[i : i + _SUMS_BLOCK]
        if isinstance(piece, np.ndarray):
            w = piece.astype(np.complex128 if piece.dtype.kind == "c" else np.float64)
            w = np.where(np.isfinite(w), w, 0) / m
            total += _float64_dot(w, w)
        else:
            import torch

            t = piece.to(torch.complex128 if piece.is_complex() else torch.float64)
            t = torch.where(torch.isfinite(t), t, torch.zeros_like(t)) / m
            total += float(torch.vdot(t, t).real)
    return total


@_with_one_blas_thread
def compare_flat(
    fa,
    fb,
    *,
    atol: float,
    rtol: float,
    device: str | None,
    tuning: Tuning,
    release_a: Callable[[int, int], None] | None = None,
    release_b: Callable[[int, int], None] | None = None,
    advance: Callable[[int], None] | None = None,
    chunk_bytes: int | None = None,
) -> TensorStats:
    """Compare two flat arrays of the same length chunk by chunk: ``compare_arrays``'s
    statistics with memory bounded by a chunk (``docs/compare.md``, "Streaming").

    Args:
        fa, fb: 1-D numpy arrays (``device`` None), or torch tensors (``device`` set:
            each chunk is moved there).
        atol, rtol: tolerances, already checked (``check_tolerances``).
        device: None to compare with numpy, else a torch device string.
        tuning: threads for the screening and the kernel.
        release_a, release_b: ``release(start_byte, stop_byte)`` of each side, called
            after each chunk (safetensors: unmap the pages compared).
        advance: ``advance(nbytes)`` after each chunk, in bytes of both sides.
        chunk_bytes: bytes per side and chunk (default ``CHUNK_BYTES``).

    Returns:
        `TensorStats`.

    Same-dtype numpy pairs are screened in ``SCREEN_BYTES`` blocks: a block whose bytes
    are identical is equal under every rule (no mismatch, zero differences), so only the
    blocks whose bytes differ are compared element by element. Other pairs are compared
    chunk by chunk.
    """
    n = int(fa.shape[0])
    if int(fb.shape[0]) != n:  # pragma: no cover - shapes are checked by the callers
        raise AssertionError(f"{n} vs {fb.shape[0]} elements")
    isz_a, isz_b = itemsize(fa), itemsize(fb)

    def release(i: int, j: int) -> None:
        if release_a is not None:
            release_a(i * isz_a, j * isz_a)
        if release_b is not None:
            release_b(i * isz_b, j * isz_b)

    def done(i: int, j: int) -> None:
        release(i, j)
        if advance is not None:
            advance((j - i) * (isz_a + isz_b))

    dev = device
    if n == 0:
        return compare_arrays(to_device(fa, dev), to_device(fb, dev), atol=atol, rtol=rtol, tuning=tuning)
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    st = _Streaming(fa, fb, dev, release, atol, rtol, tuning)
    screened = dev is None and fa.dtype == fb.dtype
    block = max(1, SCREEN_BYTES // isz_a) if screened else 1
    step = max(block, chunk_bytes // max(isz_a, isz_b) // block * block)
    if screened:
        ucode = UINT[isz_a]
        eq = np.empty(min(block, n), dtype=bool)
        piece = max(1, SCREEN_PIECE_BYTES // isz_a)
    for c0 in range(0, n, step):
        c1 = min(c0 + step, n)
        if dev is None and not screened:  # numpy, dtypes differ: every element is compared
            st.compare(fa[c0:c1], fb[c0:c1])
        elif not screened:
            x, y = to_device(fa[c0:c1], dev), to_device(fb[c0:c1], dev)
            stats, part = _compare(x, y, atol, rtol, DEFAULT_CHUNK_ELEMS, tuning.workers)
            st.acc.add_piece(part)
            if stats.equal and atol == 0 and rtol == 0 and dtype_name(fa.dtype) == dtype_name(fb.dtype):
                st.identical(c0, c1, x, nonzero=stats.cosine is not None)  # same finite values
            else:
                st.different(x, y)
            del x, y
        else:
            bytes_equal = _blocks_equal(fa[c0:c1], fb[c0:c1], block, ucode, eq, tuning.workers)
            for b, i in enumerate(range(c0, c1, block)):
                j = min(i + block, c1)
                x, y = fa[i:j], fb[i:j]
                if bytes_equal[b]:
                    st.identical(i, j, x)
                    continue
                out = eq[: j - i]
                np.equal(x.view(ucode), y.view(ucode), out=out)
                # Bytes differ. In most pieces (a fine-tune): the rest of the chunk goes
                # to the kernel in one call (it skips identical sub-blocks itself, and
                # spreads its blocks over threads). Sparsely: only the runs of pieces
                # whose bytes differ do.
                runs = _runs(out, i, piece)
                if 2 * sum(stop - k for k, stop, same in runs if not same) >= j - i:
                    st.compare(fa[i:c1], fb[i:c1])
                    break
                for k, stop, same in runs:
                    if same:
                        st.identical(k, stop, fa[k:stop])
                    else:
                        st.compare(fa[k:stop], fb[k:stop])
            st.flush()
        done(c0, c1)
    return st.result(n)
