"""The real-float kernel on CPU (``_FloatKernel``: reused float64 buffers, threads),
``PairStream`` (a pair fed piece by piece) and ``compare_arrays`` (two whole arrays)."""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from ..errors import UsageError
from . import fused
from .arrays import UINT, dtype_name, itemsize
from .backends import (
    _CPU_STATS_ELEMS,
    DEFAULT_CHUNK_ELEMS,
    _Backend,
    _backend_for,
    _Cmp,
    _coerce_pair,
    _cpu_blocks,
    _namespace,
    _NumpyBackend,
)
from .stats import (
    TensorStats,
    Tuning,
    _Acc,
    _cosine,
    _l2,
    _needs_rescale,
    _plan,
    check_shapes,
    check_tolerances,
    resolve_tuning,
)
from .threads import _DOT_PIECE, ONE_THREAD_BLAS, _float64_dot, _fold, _with_one_blas_thread, parallel_map

_FAST_ELEMS = 1 << 16
_PARALLEL_MIN_BLOCKS = 4  # fewer kernel blocks than this run on the calling thread
_FUSED_GROUP = 8  # blocks per call of the fused pass where it takes the dot products too


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
      general path divides by ``|b| + 1`` to get 0; every other quotient is the same. At
      zero tolerance no ``|.|`` is taken: ``max |a - b|`` comes from the signed maximum
      and minimum, and ``|a - b| / |b|`` is ``|(a - b) / b|`` (a division rounds the same
      whatever the signs), which saves two passes that write;
    * ``|a - b|^2`` is one more dot product of the same pieces, on the difference.

    Same-dtype blocks whose bytes are identical only add their sum of squares.

    Where the fused C pass is built (``fused.py``) and reads both dtypes, one call per
    block does every element-wise pass above (the casts, the difference into a third
    buffer D, the count, the extremes and the quotients, with the same IEEE operations),
    and where it can call numpy's own BLAS ddot, the block's four dot products too, for
    ``_FUSED_GROUP`` blocks per call: the same decisions on the same sums, to the bit.

    Blocks run on up to ``workers`` threads (numpy and ctypes release the GIL), each with
    its own buffers. Every block gets its own partial statistics, merged in block order:
    the results do not depend on the number of threads or on their timing.
    """

    def __init__(self, cmp: _Cmp, dtype_a, dtype_b, size: int, workers: int = 1, *, use_fused: bool = True):
        self.cmp = cmp
        self.workers = workers
        self.dtypes = (np.dtype(dtype_a), np.dtype(dtype_b))
        self.size = max(1, int(size))
        self.A = np.empty(self.size, dtype=np.float64)
        self.B = np.empty(self.size, dtype=np.float64)
        # The fused C pass (fused.py) where the library is there and reads both dtypes:
        # one pass writes A, B and D = A - B and gives the counts and maxima; else the
        # numpy passes of _block.
        self._fused: fused.FusedPass | None = None
        self.D: np.ndarray | None = None
        lib = fused.library() if use_fused and fused.enabled() and all(map(fused.supported, self.dtypes)) else None
        if lib is not None and lib.fast:
            self.D = np.empty(self.size, dtype=np.float64)
            tol = (cmp.atol, cmp.rtol)
            self._fused = fused.FusedPass(lib, *self.dtypes, self.A, self.B, self.D, *tol, blocks=_FUSED_GROUP)
        # blocks per work item: a fused pass that takes the dot products too takes several
        self.group = self._fused.blocks if self._fused is not None else 1
        self._bufs = (self.A, self.B) if self.D is None else (self.A, self.B, self.D)
        # Where BLAS cannot be held on one thread, a whole block's dot products: the pieces'
        # matmul over reused views of the buffers (the same pieces, the same sums as
        # _float64_dot, fewer Python calls per block).
        self._pieces = None
        if not ONE_THREAD_BLAS.usable and self.size > _DOT_PIECE and self.size % _DOT_PIECE == 0:
            k = self.size // _DOT_PIECE
            rows = tuple(buf.reshape(k, 1, _DOT_PIECE) for buf in self._bufs)
            cols = tuple(buf.reshape(k, _DOT_PIECE, 1) for buf in self._bufs)
            self._pieces = (rows, cols, np.empty((k, 1, 1)))
        numpy_passes = self._fused is None
        self.T = np.empty(self.size, dtype=np.float64) if numpy_passes and not cmp.exact else None
        self.mask = np.empty(self.size if numpy_passes else 0, dtype=bool)
        self.ucode = UINT.get(self.dtypes[0].itemsize) if self.dtypes[0] == self.dtypes[1] else None
        self._local = threading.local()  # other threads' kernels: own buffers, own backend
        self._numpy: _FloatKernel | None = None  # the numpy passes, for strided inputs

    def _for_this_thread(self, caller: int) -> _FloatKernel:
        if threading.get_ident() == caller:
            return self
        kernel = getattr(self._local, "kernel", None)
        if kernel is None:
            c = self.cmp
            cmp = _Cmp(np, _NumpyBackend(np, "cpu"), c.plan, c.name_a, c.name_b, c.atol, c.rtol)
            use_fused = self._fused is not None
            kernel = self._local.kernel = _FloatKernel(cmp, *self.dtypes, self.size, use_fused=use_fused)
        return kernel

    def run(self, a, b, acc: _Acc) -> None:
        """Add the statistics of two 1-D numpy arrays of the same length to ``acc``."""
        if self._fused is not None and not (fused.usable_on(a) and fused.usable_on(b)):
            self._numpy_kernel().run(a, b, acc)  # strided pieces
            return
        caller, n = threading.get_ident(), a.shape[0]
        step = self.size * self.group

        def item(k: int) -> list[_Acc]:
            return self._for_this_thread(caller)._blocks(a[k * step : (k + 1) * step], b[k * step : (k + 1) * step])

        workers = self.workers if -(-n // self.size) >= _PARALLEL_MIN_BLOCKS else 1
        min_items = _PARALLEL_MIN_BLOCKS if self.group == 1 else 1
        for parts in parallel_map(item, -(-n // step), workers=workers, min_items=min_items):
            for part in parts:
                acc.merge(part)

    def _blocks(self, x, y) -> list[_Acc]:
        """The statistics of each block of ``x`` and ``y`` (at most ``group`` blocks), in order."""
        size, fp = self.size, self._fused
        starts = range(0, x.shape[0], size)
        parts = [_Acc() for _ in starts]
        if fp is None or not fp.blas:
            for part, i in zip(parts, starts, strict=True):
                self._block(x[i : i + size], y[i : i + size], part)
            return parts
        results = fp(x, y)  # every block: counts, maxima and the BLAS dot products
        for k, i in enumerate(starts):
            self._add_fused(results[k], x[i : i + size], y[i : i + size], parts[k], sums=True)
        return parts

    def _numpy_kernel(self) -> _FloatKernel:
        """A kernel of the same comparison that runs the numpy passes."""
        if self._numpy is None:
            self._numpy = _FloatKernel(self.cmp, *self.dtypes, self.size, self.workers, use_fused=False)
        return self._numpy

    def _dot(self, m: int, i: int, j: int) -> float:
        """The dot product of buffers ``i`` and ``j`` (0: A, 1: B, 2: D) over the first ``m`` elements."""
        if m == self.size and self._pieces is not None:
            rows, cols, parts = self._pieces
            return _fold(np.matmul(rows[i], cols[j], out=parts))
        return _float64_dot(self._bufs[i][:m], self._bufs[j][:m])

    def _general(self, a, b, acc: _Acc) -> None:
        """A block with a non-finite value or one above ~1e154: ``_Cmp``'s sub-blocks."""
        step = _CPU_STATS_ELEMS
        for i in range(0, a.shape[0], step):
            self.cmp.block(a[i : i + step], b[i : i + step], acc)

    def _block(self, a, b, acc: _Acc) -> None:
        if self._fused is not None:  # one block, its dot products from here
            self._add_fused(self._fused(a, b)[0], a, b, acc, sums=False)
            return
        cmp = self.cmp
        m = a.shape[0]
        mask = self.mask[:m]
        same = -1  # pairs that are equal at zero tolerance, once known
        if self.ucode is not None:
            same = int(np.count_nonzero(np.equal(a.view(self.ucode), b.view(self.ucode), out=mask)))
        A = self.A[:m]
        np.copyto(A, a, casting="unsafe")
        if same == m:
            s = self._dot(m, 0, 0)
            acc.add_identical(s if math.isfinite(s) else cmp.self_dot(a, cmp.name_a))
            return
        B = self.B[:m]
        np.copyto(B, b, casting="unsafe")
        na, nb = self._dot(m, 0, 0), self._dot(m, 1, 1)
        if not (math.isfinite(na) and math.isfinite(nb)):
            self._general(a, b, acc)
            return
        acc.dot += self._dot(m, 0, 1)
        acc.na += na
        acc.nb += nb
        if cmp.exact and same < 0:
            same = int(np.count_nonzero(np.equal(A.view(np.uint64), B.view(np.uint64), out=mask)))
        d = np.subtract(A, B, out=A)
        acc.dd += self._dot(m, 0, 0)  # |a - b|^2: the same pieces, folded in the same order
        if cmp.exact:
            # No |.| passes: max |d| from the signed extremes, and |d| / |b| is |d / b| (a
            # division rounds the same whatever the signs): fewer writes, the same values.
            acc.max_abs = max(acc.max_abs, float(d.max()), -float(d.min()))
            acc.mismatched += m - same
            q = np.divide(d, B, out=d)
            r = max(float(np.fmax.reduce(q)), -float(np.fmin.reduce(q)))
        else:
            diff = np.abs(d, out=d)
            acc.max_abs = max(acc.max_abs, float(diff.max()))
            absb = np.abs(B, out=B)
            assert self.T is not None  # allocated for a tolerance
            bound = self.T[:m]  # |a - b| <= atol + rtol * |b|, the operations of _float_block
            np.multiply(absb, cmp.rtol, out=bound)
            if cmp.atol:
                np.add(bound, cmp.atol, out=bound)
            acc.mismatched += m - int(np.count_nonzero(np.less_equal(diff, bound, out=mask)))
            r = float(np.fmax.reduce(np.divide(diff, absb, out=diff)))
        if r > acc.max_rel:  # NaN (every quotient 0 / 0) never is
            acc.max_rel = r

    def _add_fused(self, r: fused.Result, a, b, acc: _Acc, *, sums: bool) -> None:
        """Add the statistics of one block from the fused pass's results ``r``: the
        decisions of ``_block`` on the same sums. ``sums``: ``r`` holds the block's dot
        products, else they are taken here from the buffers (which hold this block)."""
        cmp = self.cmp
        m = a.shape[0]
        if r.identical:
            s = r.aa if sums else self._dot(m, 0, 0)
            acc.add_identical(s if math.isfinite(s) else cmp.self_dot(a, cmp.name_a))
            return
        na, nb = (r.aa, r.bb) if sums else (self._dot(m, 0, 0), self._dot(m, 1, 1))
        if not (math.isfinite(na) and math.isfinite(nb)):
            self._general(a, b, acc)
            return
        acc.dot += r.ab if sums else self._dot(m, 0, 1)
        acc.na += na
        acc.nb += nb
        acc.dd += r.dd if sums else self._dot(m, 2, 2)
        acc.max_abs = max(acc.max_abs, r.max_abs)
        acc.mismatched += m - (r.equal if cmp.exact else r.close)
        if r.max_rel > acc.max_rel:  # NaN (every quotient 0 / 0) never is
            acc.max_rel = r.max_rel


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

    For ``compare_flat``, which screens raw bytes itself and feeds the pieces whose bytes
    differ (and every piece of a pair whose dtypes differ). Per element the rules
    are exactly ``compare_arrays``'s; over pieces the statistics combine (counts add,
    maxima take the maximum). ``sums`` are the float64 ``(dot, |a|^2, |b|^2)`` over the
    finite pairs, not rescaled: non-finite sums mean the caller must rescale.
    """

    def __init__(self, dtype_a, dtype_b, *, atol: float = 0.0, rtol: float = 0.0, tuning: Tuning | None = None):
        atol, rtol = check_tolerances(atol, rtol)
        workers = resolve_tuning(tuning).workers
        name_a, name_b = dtype_name(dtype_a), dtype_name(dtype_b)
        plan = _plan(name_a, name_b)
        self._be = _NumpyBackend(np, "cpu")
        self._cmp = _Cmp(np, self._be, plan, name_a, name_b, atol, rtol)
        self._acc = _Acc()
        size = max(np.dtype(dtype_a).itemsize, np.dtype(dtype_b).itemsize)
        self._small = _cpu_blocks(DEFAULT_CHUNK_ELEMS, size)[1]
        self._kernel = _FloatKernel(self._cmp, dtype_a, dtype_b, _FAST_ELEMS, workers) if plan == "float" else None

    @_with_one_blas_thread
    def add(self, x, y) -> None:
        """Compare one piece: 1-D numpy arrays of the stream's dtypes and the same length."""
        if x.shape != y.shape:
            check_shapes(x.shape, y.shape)
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


# ------------------------------------------------------------------------ compare_arrays


@_with_one_blas_thread
def compare_arrays(
    a: Any,
    b: Any,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    tuning: Tuning | None = None,
) -> TensorStats:
    """Compare two same-shape arrays or tensors element by element.

    ``a`` is close to ``b`` where ``|a - b| <= atol + rtol * |b|`` (as ``torch.isclose``);
    with zero tolerances (the default) that means equal, signed zeros and all, NaN
    matching NaN. Dtypes may differ (compared after upcasting). A CPU tensor is compared
    through a numpy view of its memory; a numpy array against an accelerator tensor goes
    to that device; two tensors on different devices meet on the first non-CPU one. The
    exact rules are in ``docs/compare.md``.

    Args:
        a (`np.ndarray`, `torch.Tensor` or anything `numpy.asarray` takes):
            The first array (``ml_dtypes`` bfloat16 / float8 numpy arrays too).
        b (same as ``a``):
            The second array, the reference of ``rtol``.
        atol (`float`, *optional*, defaults to 0.0):
            Absolute tolerance: finite and >= 0.
        rtol (`float`, *optional*, defaults to 0.0):
            Tolerance relative to ``|b|``: finite and >= 0.
        chunk_elems (`int`, *optional*, defaults to 2**24):
            The most elements processed at once: bounds the memory, never the result.
        tuning (`Tuning`, *optional*):
            Threads to use; None detects them now (``Tuning.detect()``). The result is
            the same to the bit whatever the tuning.

    Returns:
        `TensorStats`: ``equal``, ``numel``, ``mismatched``, ``max_abs_diff``,
        ``max_rel_diff`` and ``cosine``.

    Raises:
        SurgeryError: the shapes differ (both are named) or a dtype cannot be compared.
        UsageError: a tolerance that is not a finite number >= 0 (``param`` ``"atol"`` or
            ``"rtol"``), ``chunk_elems < 1``, or a ``tuning`` that is no ``Tuning``.

    Example:

    ```python
    import numpy as np
    from wsurgery.compare import compare_arrays

    stats = compare_arrays(np.array([1.0, 2.0]), np.array([1.0, 2.5]), atol=0.1)
    assert stats.mismatched == 1 and stats.max_abs_diff == 0.5
    ```
    """
    atol, rtol = check_tolerances(atol, rtol)
    if int(chunk_elems) < 1:
        raise UsageError(f"chunk_elems must be >= 1, got {chunk_elems}", param="chunk_elems")
    return _compare(a, b, atol, rtol, int(chunk_elems), resolve_tuning(tuning).workers)[0]


def _compare(a, b, atol: float, rtol: float, chunk_elems: int, workers: int) -> tuple[TensorStats, _Acc]:
    """``compare_arrays`` on checked arguments, with its accumulated sums."""
    a, b = _coerce_pair(a, b)
    check_shapes(a.shape, b.shape)
    name_a, name_b = dtype_name(a.dtype), dtype_name(b.dtype)
    plan = _plan(name_a, name_b)
    numel = math.prod(int(s) for s in a.shape)
    acc = _Acc()
    if numel == 0:
        return TensorStats(True, 0, 0, 0.0, 0.0, None, 0.0, 0.0, 0.0, 0.0), acc

    xp = _namespace(a, b)
    be = _backend_for(xp, a, b)
    cmp = _Cmp(xp, be, plan, name_a, name_b, atol, rtol)
    fa, fb = be.flat(a), be.flat(b)
    big, small = be.block_elems(chunk_elems, max(itemsize(a), itemsize(b)))
    kernel = None
    if plan == "float" and isinstance(be, _NumpyBackend):
        kernel = _FloatKernel(cmp, fa.dtype, fb.dtype, min(chunk_elems, _FAST_ELEMS, numel), workers)

    def blocks(start: int = 0, stop: int = numel, step: int = small):
        for i in range(start, stop, step):
            j = min(i + step, stop)
            yield be.take(fa, i, j), be.take(fb, i, j)

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
                return TensorStats(True, numel, 0, 0.0, 0.0, 1.0 if any_nz else None, 0.0, None, None, 0.0), acc
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

        cosine = _cosine(acc.dot, acc.na, acc.nb)
        norms = _l2(acc.na, acc.nb, acc.dd, acc.unbounded)
        for_cosine, for_norms = _needs_rescale(plan, {name_a, name_b}, acc)
        if for_cosine or for_norms:
            dot, na, nb, dd, ma, mb, s = cmp.rescaled_sums(blocks)
            if for_cosine:
                cosine = _cosine(dot, na, nb)
            if for_norms:
                norms = _l2(na, nb, dd, acc.unbounded, ma, mb, s)

    return acc.stats(numel, cosine, norms), acc
