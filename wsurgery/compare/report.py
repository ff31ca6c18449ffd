"""Checkpoint-level compare: a streaming ``diff`` of two checkpoints and ``check`` of one
tensor (or module) against another.

Both stream: tensors are compared one pair at a time, in chunks of ``CHUNK_BYTES``
(32 MiB per side), and every mismatch statistic comes from
``compare_engine.compare_arrays`` (see that module for the exact per-element
semantics: tolerance, NaN, signed zeros, integers, mixed dtypes). Memory stays bounded
whatever the size of the checkpoint or of its largest tensor.

Same-dtype pairs on CPU are first screened as raw bytes, ``SCREEN_BYTES`` at a time: a
block whose bytes are identical is equal under every rule of the engine (no mismatch,
zero differences: also NaN against the same NaN, and within any tolerance), so only the
runs of ``SCREEN_PIECE_BYTES`` pieces whose bytes differ are handed to the engine. Other
pairs (dtypes that differ, ``device="cuda"``) go to the engine chunk by chunk. The
screening calls libc's ``memcmp`` on one thread per core, up to four (it runs without
the GIL, at memory bandwidth); the float64 sums of the identical blocks of a tensor that
differs somewhere are spread the same way and folded in a fixed order, so every result
is the same whatever the number of threads.

Where the data comes from
-------------------------
* On CPU (``device`` None or ``"cpu"``) everything is compared as numpy arrays.
  safetensors tensors are zero-copy views of the file's memory map; after each chunk
  the pages already compared are unmapped again (``MADV_DONTNEED``; the data stays in
  the page cache), so the resident set stays near two chunks plus the interpreter.
  A diff of safetensors checkpoints on CPU never imports torch. torch tensors (``.pt``
  inputs, loaded with ``mmap=True``, or in-memory checkpoints) are viewed as numpy;
  torch maps a ``.pt`` privately, so its pages are not released and the resident set
  of a ``.pt`` diff grows with the data read (the page cache's, not a copy).
* With ``device="cuda[:N]"`` each chunk is moved to the device and compared there.
  Tensors held by a checkpoint on an accelerator are compared on that accelerator
  when ``device`` is None.
* A value that needs computing (an alias whose transform is not the identity, a
  ``check`` transform, a computed entry) is materialised whole: its memory is that
  tensor's size. View transforms on safetensors data are applied with numpy (no
  torch); anything else goes through torch.

Per-name rules of ``diff`` (names in both checkpoints)
------------------------------------------------------
A changed name gets exactly one ``reason``, the most severe that applies:

1. ``shape``: the shapes differ. No value statistics (they are ``None``).
2. ``dtype``: the dtypes differ. Values are still compared, after upcasting (float64,
   or exactly as integers), so the statistics show what the cast cost.
3. ``alias``: the tie relation differs: one side is an alias and the other a stored
   tensor (a lost or added tie), or both are aliases of different sources or with
   different transforms. Values are still compared (transforms applied), so one sees
   whether the values agree anyway.
4. ``value``: same shape, dtype and relation, but some elements differ (beyond
   tolerance).

Ties are compared as relations, whatever the file format:

* Two aliases with identical records (same source name, same transform steps) have the
  same relation, and their values are those of their sources: when the sources compare
  equal, the aliases are equal without reading any data; when they do not, an alias
  whose transform only rearranges elements (transpose, permute, reshape) reports the
  source's statistics (the same numbers, by construction), and any other transform
  (slice) is compared on its own values.
* A tie recorded in the other direction is the same relation: ``b = transpose(a)`` in one
  file and ``a = transpose(b)`` in the other, or ``a``/``b`` tied with no transform and
  either one stored. Precisely: when the records differ, the relations are still equal
  when the name's tie group (its stored source and every alias of it) holds the same
  names in both files, every transform in both groups is a pure axis permutation
  (identity, ``transpose``, ``permute``), and every member's permutation relative to the
  group's first name (natural order) is the same on both sides. Such names are compared
  by value. Any other difference is reported as ``alias`` (also a reversed tie whose
  transform reshapes or slices: conservative, the values are still shown).
* A stored tensor that is the source of ties on one side only is compared by value:
  the lost or added tie is reported once, on the alias name.

Statistics of a tensor compared piece by piece combine exactly: ``mismatched`` and
``numel`` add up, ``max_abs_diff`` / ``max_rel_diff`` take the maximum, ``equal`` means
no mismatch. The cosine (the engine's definition) is combined from float64 sums (dot
product and both squared norms over the positions where both sides are finite),
computed only once a tensor turns out not to be bit-identical (the identical pieces
before that are read again, once); a bit-identical tensor has cosine 1.0, or None when
it holds no finite non-zero value. The combined cosine equals the whole-tensor one up
to float64 rounding. For float64 inputs whose sums overflow or underflow, the whole
tensor is handed to the engine once (which rescales) to get the cosine.

``diff`` raises ``UsageError`` for a ``filter`` that matches no name in either
checkpoint (a mistyped filter must not pass as "equal"), and propagates every input
error: it never reports "equal" for work it could not do.

``check(ckpt, src, dst, transform)`` compares ``transform(src)`` with ``dst`` (in
``ckpt``, or in ``other``); module prefixes check every pair under them (the pairing of
copies). A pair is equal when shapes and dtypes agree and every element is
within tolerance; a dtype mismatch is a difference (``reason`` ``dtype``), with values
compared after upcasting; a shape mismatch is a difference without statistics.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import numpy_apply
from ..checkpoint import Alias, Checkpoint, FileStored, Stored, TensorStored, from_tensors, load, natural_key
from ..dtypes import BY_NAME
from ..errors import UnknownNameError, UsageError
from ..transforms import IDENTITY, Permute, Reshape, Transform, Transpose, parse
from .kernel import PairStream, TensorStats, compare_arrays, numpy_view, parallel_map, to_device

__all__ = [
    "CHUNK_BYTES",
    "REASONS",
    "Change",
    "CheckReport",
    "DiffReport",
    "check",
    "compare_tensors",
    "diff",
]

CHUNK_BYTES = 32 << 20  # per side: pages are released behind each chunk
REASONS = ("shape", "dtype", "alias", "value")  # most severe first
SCREEN_BYTES = 512 << 10  # raw-bytes screening block per side (same-dtype pairs on CPU; stays in L2)
SCREEN_PIECE_BYTES = 64 << 10  # a differing block goes to the engine in runs of such pieces
_SUMS_BLOCK = 1 << 16  # elements per float64 block of the cosine sums (stays in cache)
_PENDING_STEP = 1 << 22  # elements re-read at once for the sums of an identical prefix
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# OpenBLAS runs a dot product of fewer than 10000 elements on one thread; a longer one on
# all of them, which stalls for milliseconds per call on a busy machine (measured 0.15 vs
# 3.7 GB/s). The CLI pins OPENBLAS_NUM_THREADS=1 before numpy starts: then long is faster.
_DOT_PIECE = 1 << 16 if os.environ.get("OPENBLAS_NUM_THREADS") == "1" else 9984
_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")

Progress = Callable[[int, int], None]  # progress(done_bytes, total_bytes)


# --------------------------------------------------------------------------- reports


def _stats_dict(stats: TensorStats | None) -> dict[str, Any]:
    if stats is None:
        return {"max_abs_diff": None, "max_rel_diff": None, "mismatched": None, "numel": None, "cosine": None}
    d = stats.to_dict()
    return {k: d[k] for k in ("max_abs_diff", "max_rel_diff", "mismatched", "numel", "cosine")}


@dataclass(frozen=True)
class Change:
    """One name whose tensors differ. ``a`` / ``b``: ``{dtype, shape, alias_of}`` of each side."""

    name: str
    reason: str
    a: dict[str, Any]
    b: dict[str, Any]
    stats: TensorStats | None

    @property
    def mismatched_fraction(self) -> float:
        s = self.stats
        return s.mismatched / s.numel if s is not None and s.numel else 0.0

    def severity(self) -> tuple:
        """Sort key, most severe first: reason, then fraction mismatched, then max |a - b|."""
        s = self.stats
        max_abs = s.max_abs_diff if s is not None and not math.isnan(s.max_abs_diff) else 0.0
        return (REASONS.index(self.reason), -self.mismatched_fraction, -max_abs, natural_key(self.name))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason, "a": self.a, "b": self.b, **_stats_dict(self.stats)}


@dataclass(frozen=True)
class DiffReport:
    """Result of :func:`diff`. ``equal`` iff no name is only on one side and none changed."""

    a: str
    b: str
    only_in_a: list[str]
    only_in_b: list[str]
    changed: list[Change]  # most severe first
    same: int
    atol: float = 0.0
    rtol: float = 0.0
    bytes_compared: int = 0

    @property
    def equal(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.changed)

    def to_dict(self) -> dict[str, Any]:
        """The ``wsurgery.diff/1`` JSON object (valid JSON: inf / nan become strings)."""
        return {
            "schema": "wsurgery.diff/1",
            "a": self.a,
            "b": self.b,
            "equal": self.equal,
            "atol": self.atol,
            "rtol": self.rtol,
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "changed": [c.to_dict() for c in self.changed],
            "same": self.same,
        }


@dataclass(frozen=True)
class PairResult:
    """One ``transform(src)`` vs ``dst`` pair of :func:`check`."""

    src: str
    dst: str
    reason: str | None  # None when equal
    src_info: dict[str, Any]  # dtype and shape of transform(src)
    dst_info: dict[str, Any]
    stats: TensorStats | None

    @property
    def equal(self) -> bool:
        return self.reason is None

    def severity(self) -> tuple:
        return Change(self.dst, self.reason or "value", {}, {}, self.stats).severity()

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "equal": self.equal,
            "reason": self.reason,
            "src_tensor": self.src_info,
            "dst_tensor": self.dst_info,
            **_stats_dict(self.stats),
        }


@dataclass(frozen=True)
class CheckReport:
    """Result of :func:`check`; the statistics aggregate every pair that has them."""

    path: str
    other: str | None
    src: str
    dst: str
    transform: list[str]
    pairs: list[PairResult]
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def equal(self) -> bool:
        return all(p.equal for p in self.pairs)

    def _with_stats(self) -> list[TensorStats]:
        return [p.stats for p in self.pairs if p.stats is not None]

    def _aggregate(self, field: str, combine):
        """``combine`` (sum or max) of one statistic over the pairs that have statistics."""
        s = self._with_stats()
        return combine(getattr(x, field) for x in s) if s else None

    @property
    def mismatched(self) -> int | None:
        return self._aggregate("mismatched", sum)

    @property
    def numel(self) -> int | None:
        return self._aggregate("numel", sum)

    @property
    def max_abs_diff(self) -> float | None:
        return self._aggregate("max_abs_diff", max)

    @property
    def max_rel_diff(self) -> float | None:
        return self._aggregate("max_rel_diff", max)

    def to_dict(self) -> dict[str, Any]:
        """The ``wsurgery.check/1`` JSON object."""
        agg = None
        if self._with_stats():
            agg = TensorStats(self.equal, self.numel, self.mismatched, self.max_abs_diff, self.max_rel_diff, None)
        stats = _stats_dict(agg)
        stats.pop("cosine")
        return {
            "schema": "wsurgery.check/1",
            "path": self.path,
            "other": self.other,
            "src": self.src,
            "dst": self.dst,
            "transform": list(self.transform),
            "atol": self.atol,
            "rtol": self.rtol,
            "equal": self.equal,
            **stats,
            "pairs": [p.to_dict() for p in self.pairs],
        }


# --------------------------------------------------------------------------- arguments


def _tolerances(atol, rtol) -> tuple[float, float]:
    try:
        atol, rtol = float(atol), float(rtol)
    except (TypeError, ValueError):
        raise UsageError(f"atol and rtol must be numbers, got {atol!r}, {rtol!r}") from None
    if not (math.isfinite(atol) and math.isfinite(rtol) and atol >= 0 and rtol >= 0):
        raise UsageError(
            f"atol and rtol must be finite and >= 0, got atol={atol}, rtol={rtol}",
            param="atol" if not (math.isfinite(atol) and atol >= 0) else "rtol",
            hint="pass a finite, non-negative tolerance such as 1e-6",
        )
    return atol, rtol


def _device(device) -> str | None:
    """None for CPU (numpy), else a validated torch device string (exit 2 if unusable)."""
    if device is None or str(device) == "cpu":
        return None
    from ..surgery import check_device

    return check_device(str(device))


def _open(x, what: str) -> tuple[Checkpoint, bool, str]:
    """(checkpoint, whether we opened it and must close it, a label for reports)."""
    if isinstance(x, Checkpoint):
        return x, False, x.path or "<checkpoint>"
    if isinstance(x, dict):
        return from_tensors(dict(x), path=f"<{what}>"), False, f"<{what}>"
    if isinstance(x, (str, os.PathLike)):
        return load(x), True, os.fspath(x)
    raise UsageError(f"{what}: expected a path, a Checkpoint or a state dict, got {type(x).__name__}")


# ----------------------------------------------------------------- values and arrays


@dataclass(frozen=True)
class _Value:
    """One side's value: ``transform(stored)``."""

    stored: Stored
    transform: Transform
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return BY_NAME[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def _value_of(ckpt: Checkpoint, name: str, extra: Transform = IDENTITY) -> _Value:
    e = ckpt.entry(name)
    if isinstance(e, Alias):
        stored, t = ckpt.stored[e.source], e.transform.then(extra)
    else:
        stored, t = e, extra
    shape, dtype = t.infer(stored.shape, stored.dtype)
    return _Value(stored, t, tuple(shape), dtype)


def _torch_to_numpy(t) -> np.ndarray:
    """A flat numpy view of a torch tensor (copied to the CPU, or made contiguous, if needed)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
    name = str(t.dtype).removeprefix("torch.")
    if name in _ML_DTYPES:
        import ml_dtypes

        raw = t.view(torch.int16 if t.element_size() == 2 else torch.uint8).numpy()
        return raw.view(np.dtype(getattr(ml_dtypes, name)))
    return t.numpy()


def _is_cpu_tensor(s: Stored) -> bool:
    return not isinstance(s, TensorStored) or s.t.device.type == "cpu"


def _flat(v: _Value, dev: str | None):
    """``(flat array, release)`` of a value: numpy for CPU (``dev`` None), else torch.

    ``release(start_byte, stop_byte)`` unmaps pages already compared (safetensors only).
    An untransformed stored tensor is viewed in place; anything else is materialised.
    """
    s = v.stored
    if v.transform.is_identity and isinstance(s, FileStored):
        return numpy_view(s.raw(), s.dtype, s.shape).reshape(-1), s.release
    if v.transform.is_identity and isinstance(s, TensorStored):
        return (_torch_to_numpy(s.t) if dev is None else s.t.detach().reshape(-1)), None
    if dev is None and isinstance(s, FileStored) and v.transform.is_view:
        arr = numpy_apply.apply(v.transform, numpy_view(s.raw(), s.dtype, s.shape), s.dtype, views_only=True)
        flat = np.ascontiguousarray(arr).reshape(-1)
        s.release()
        return flat, None
    t = s.tensor(dev or "cpu")
    out = v.transform.apply(t, allow_copy=True)
    return (_torch_to_numpy(out) if dev is None else out.reshape(-1)), None


def _put(x, dev: str | None):
    return x if dev is None else to_device(x, dev)


# ---------------------------------------------------------------------- cosine sums


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


_SUMS_TASK = 4  # blocks per thread task of _identical_sums


def _vdot(u: np.ndarray, v: np.ndarray, cplx: bool) -> float:
    """Re sum conj(u) v of float64 / complex128 arrays, in pieces OpenBLAS runs on one thread."""
    total = 0.0
    for k in range(0, u.shape[0], _DOT_PIECE):
        pu, pv = u[k : k + _DOT_PIECE], v[k : k + _DOT_PIECE]
        total += float(np.vdot(pu, pv).real) if cplx else float(np.dot(pu, pv))
    return total


def _square_sum(w: np.ndarray, cplx: bool) -> float:
    """Sum of |w|^2 over the finite values of a float64 / complex128 block."""
    s = _vdot(w, w, cplx)
    if not math.isfinite(s):
        w = np.where(np.isfinite(w), w, 0)
        s = _vdot(w, w, cplx)
    return s


def _identical_sums(x: np.ndarray, ranges: list[tuple[int, int]]) -> list[float]:
    """``_sums_numpy(x[i:j], None)[0]`` for each range, bit for bit: the same
    ``_SUMS_BLOCK`` blocks, folded in the same order, but computed on up to
    ``_worker_count()`` threads (tasks of ``_SUMS_TASK`` blocks, little Python per block,
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
            out.append(_square_sum(w, cplx))
        return out

    totals = [0.0] * len(ranges)
    for task, sums in zip(tasks, parallel_map(one, len(tasks), min_items=2), strict=True):
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
    ucode = _UINT.get(x.dtype.itemsize) if y is not None and x.dtype == y.dtype else None
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
                s = _square_sum(A, cplx)
                dot, na, nb = dot + s, na + s, nb + s
                continue
            B = wb[:m]
            np.copyto(B, ys, casting="unsafe")
            d, sa, sb = _vdot(B, A, cplx), _vdot(A, A, cplx), _vdot(B, B, cplx)
            if not (math.isfinite(d) and math.isfinite(sa) and math.isfinite(sb)):
                fin = np.isfinite(A) & np.isfinite(B)
                A, B = np.where(fin, A, 0), np.where(fin, B, 0)
                d, sa, sb = _vdot(B, A, cplx), _vdot(A, A, cplx), _vdot(B, B, cplx)
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


def _cosine(dot: float, na: float, nb: float) -> float | None:
    """The engine's cosine from the sums (None when a norm is 0)."""
    if not (na > 0 and nb > 0):
        return None
    p = na * nb
    norm = math.sqrt(p) if 2.2250738585072014e-308 <= p < math.inf else math.sqrt(na) * math.sqrt(nb)
    return min(1.0, max(-1.0, dot / norm))


# ------------------------------------------------------------------ streaming compare


class _Acc:
    """Running statistics of one tensor pair compared piece by piece (see the module doc).

    Mismatch statistics come from the engine; the cosine from float64 sums that are only
    computed once some piece is not bit-identical (the identical pieces seen before are
    then read again, once)."""

    def __init__(self, fa, fb, dev: str | None, release, atol: float = 0.0, rtol: float = 0.0):
        self.fa, self.fb, self.dev, self.release = fa, fb, dev, release
        self.atol, self.rtol = atol, rtol
        self.mismatched, self.max_abs, self.max_rel = 0, 0.0, 0.0
        self.nonzero = False  # some finite non-zero value in the identical pieces
        self.sums: list[float] | None = None  # (dot, na, nb)
        self.pending: list[list[int]] = []  # identical [start, stop) ranges not yet summed
        self.held: list[tuple[int, int]] = []  # identical ranges to add to the sums at flush()
        self.bufs = _Buffers()
        self.stream: PairStream | None = None  # numpy pieces: statistics and sums in one pass

    def _add(self, x, y) -> None:
        got = _sums_numpy(x, y, self.bufs) if self.dev is None else _sums_torch(x, y)
        for k in range(3):
            self.sums[k] += got[k]

    def engine(self, stats: TensorStats) -> None:
        self.mismatched += stats.mismatched
        self.max_abs = max(self.max_abs, stats.max_abs_diff)
        self.max_rel = max(self.max_rel, stats.max_rel_diff)

    def identical(self, i: int, j: int, x, nonzero=None) -> None:
        """Elements ``[i, j)`` hold the same finite values on both sides (``x``: side A).
        ``nonzero``: whether they hold a finite non-zero value, when the caller knows."""
        if self.sums is not None:
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
        for s in _identical_sums(self.fa, ranges):
            for k in range(3):
                self.sums[k] += s

    def flush(self) -> None:
        """Add the sums of the identical ranges held back (before their pages go)."""
        if self.held:
            held, self.held = self.held, []
            self._add_identical(held)

    def _start_sums(self) -> None:
        if self.sums is None:
            self.sums = [0.0, 0.0, 0.0]
            for i, j in self.pending:
                for k in range(i, j, _PENDING_STEP):
                    stop = min(k + _PENDING_STEP, j)
                    if self.dev is None:
                        self._add_identical([(k, stop)])
                    else:
                        self._add(_put(self.fa[k:stop], self.dev), None)
                    self.release(k, stop)
            self.pending = []

    def different(self, x, y) -> None:
        """A piece already given to ``engine``: only its cosine sums are still to add."""
        self._start_sums()
        self._add(x, y)

    def compare(self, x, y) -> None:
        """A numpy piece whose bytes (or dtypes) differ: the engine's ``PairStream`` gives
        its statistics and its cosine sums in one pass."""
        self._start_sums()
        if self.stream is None:
            self.stream = PairStream(x.dtype, y.dtype, atol=self.atol, rtol=self.rtol)
        self.stream.add(x, y)

    def result(self, n: int) -> TensorStats:
        self.flush()
        if self.stream is not None:
            st, self.stream = self.stream, None
            self.mismatched += st.mismatched
            self.max_abs = max(self.max_abs, st.max_abs_diff)
            self.max_rel = max(self.max_rel, st.max_rel_diff)
            for k, v in enumerate(st.sums):
                self.sums[k] += v
        if self.sums is None:
            cosine = 1.0 if self.nonzero else None
        else:
            dot, na, nb = self.sums
            wide = "float64" in (_dtype_text(self.fa), _dtype_text(self.fb))
            if not all(math.isfinite(v) for v in self.sums) or (wide and (na == 0 or nb == 0)):
                # float64 sums out of range: the engine rescales (one whole-tensor pass)
                cosine = compare_arrays(_put(self.fa, self.dev), _put(self.fb, self.dev)).cosine
            else:
                cosine = _cosine(dot, na, nb)
        return TensorStats(self.mismatched == 0, n, self.mismatched, self.max_abs, self.max_rel, cosine)


def _dtype_text(x) -> str:
    return str(x.dtype).removeprefix("torch.")


def _any_finite_nonzero(x: np.ndarray) -> bool:
    """Whether ``x`` holds a finite non-zero value (any dtype)."""
    kind = x.dtype.kind
    for i in range(0, x.shape[0], _SUMS_BLOCK):
        xs = x[i : i + _SUMS_BLOCK]
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


def _progress_counter(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None]:
    """An ``advance(nbytes)`` that reports ``progress(done, total)`` in bytes of both sides."""
    done = 0
    if progress is not None:
        progress(0, total)

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    return advance


def _compare_flat(
    fa,
    fb,
    *,
    atol: float,
    rtol: float,
    dev: str | None,
    release_a=None,
    release_b=None,
    advance: Callable[[int], None] | None = None,
    chunk_bytes: int | None = None,
) -> TensorStats:
    """Compare two flat arrays (numpy, or torch for ``dev``) chunk by chunk; see the module doc.

    Same-dtype numpy pairs are screened in ``SCREEN_BYTES`` blocks: a block whose bytes
    are identical is equal under every rule of the engine (no mismatch, zero
    differences), so only the blocks whose bytes differ go to the engine. Other pairs
    go to the engine chunk by chunk.
    """
    n = int(fa.shape[0])
    if int(fb.shape[0]) != n:  # pragma: no cover - shapes are checked by the callers
        raise AssertionError(f"{n} vs {fb.shape[0]} elements")
    isz_a, isz_b = _itemsize(fa), _itemsize(fb)

    def release(i: int, j: int) -> None:
        if release_a is not None:
            release_a(i * isz_a, j * isz_a)
        if release_b is not None:
            release_b(i * isz_b, j * isz_b)

    def done(i: int, j: int) -> None:
        release(i, j)
        if advance is not None:
            advance((j - i) * (isz_a + isz_b))

    if n == 0:
        return compare_arrays(_put(fa, dev), _put(fb, dev), atol=atol, rtol=rtol)
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    acc = _Acc(fa, fb, dev, release, atol, rtol)
    screened = dev is None and fa.dtype == fb.dtype
    block = max(1, SCREEN_BYTES // isz_a) if screened else 1
    step = max(block, chunk_bytes // max(isz_a, isz_b) // block * block)
    if screened:
        ucode = _UINT[isz_a]
        eq = np.empty(min(block, n), dtype=bool)
        piece = max(1, SCREEN_PIECE_BYTES // isz_a)
    for c0 in range(0, n, step):
        c1 = min(c0 + step, n)
        if dev is None and not screened:  # numpy, dtypes differ: every element is compared
            acc.compare(fa[c0:c1], fb[c0:c1])
        elif not screened:
            x, y = _put(fa[c0:c1], dev), _put(fb[c0:c1], dev)
            stats = compare_arrays(x, y, atol=atol, rtol=rtol)
            acc.engine(stats)
            if stats.equal and atol == 0 and rtol == 0 and _dtype_text(fa) == _dtype_text(fb):
                acc.identical(c0, c1, x, nonzero=stats.cosine is not None)  # same finite values
            else:
                acc.different(x, y)
            del x, y
        else:
            bytes_equal = _blocks_equal(fa[c0:c1], fb[c0:c1], block, ucode, eq)
            for b, i in enumerate(range(c0, c1, block)):
                j = min(i + block, c1)
                x, y = fa[i:j], fb[i:j]
                if bytes_equal[b]:
                    acc.identical(i, j, x)
                    continue
                out = eq[: j - i]
                np.equal(x.view(ucode), y.view(ucode), out=out)
                # Bytes differ. In most pieces (a fine-tune): the rest of the chunk goes
                # to the engine in one call (it skips identical sub-blocks itself, and
                # spreads its blocks over threads). Sparsely: only the runs of pieces
                # whose bytes differ do.
                runs = _runs(out, i, piece)
                if 2 * sum(stop - k for k, stop, same in runs if not same) >= j - i:
                    acc.compare(fa[i:c1], fb[i:c1])
                    break
                for k, stop, same in runs:
                    if same:
                        acc.identical(k, stop, fa[k:stop])
                    else:
                        acc.compare(fa[k:stop], fb[k:stop])
            acc.flush()
        done(c0, c1)
    return acc.result(n)


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


def _blocks_equal(x: np.ndarray, y: np.ndarray, block: int, ucode, eq: np.ndarray) -> list[bool]:
    """Whether the bytes of each ``block``-element block of ``x`` and ``y`` (same dtype,
    same length, 1-D) are identical.

    ``memcmp`` on up to ``_worker_count()`` threads where it can be called (it reads at
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
        return parallel_map(one, count, min_items=8)
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


def _itemsize(x) -> int:
    if isinstance(x, np.ndarray):
        return x.dtype.itemsize
    return int(x.element_size())


def _compare_values(va: _Value, vb: _Value, *, atol, rtol, dev, advance=None) -> TensorStats:
    fa, rel_a = _flat(va, dev)
    fb, rel_b = _flat(vb, dev)
    return _compare_flat(fa, fb, atol=atol, rtol=rtol, dev=dev, release_a=rel_a, release_b=rel_b, advance=advance)


def _effective_device(dev: str | None, *ckpts: Checkpoint) -> str | None:
    """With no device asked for, tensors that live on an accelerator are compared there."""
    if dev is not None:
        return dev
    for c in ckpts:
        for s in c.stored.values():
            if not _is_cpu_tensor(s):
                return str(s.t.device)
    return None


def compare_tensors(a, b, *, atol=0.0, rtol=0.0, device=None, chunk_bytes: int | None = None) -> TensorStats:
    """Compare two same-shape tensors (torch on any device, or numpy) chunk by chunk.

    ``device``: where to compute (``"cuda:0"``...); None keeps the inputs where they are
    (a CPU input against an accelerator one is compared on the accelerator). Shapes must
    agree (``SurgeryError`` otherwise); dtypes may differ (compared after upcasting).
    """
    from ..errors import SurgeryError

    atol, rtol = _tolerances(atol, rtol)
    dev = _device(device)
    if tuple(a.shape) != tuple(b.shape):
        raise SurgeryError(
            f"shape mismatch: {list(a.shape)} vs {list(b.shape)}",
            hint="only tensors of the same shape can be compared element by element",
        )
    flats = []
    for x in (a, b):
        if isinstance(x, np.ndarray):
            flats.append(x.reshape(-1))
        elif dev is None and hasattr(x, "device") and x.device.type == "cpu":
            flats.append(_torch_to_numpy(x))
        else:
            flats.append(x.detach().reshape(-1))
    if dev is None and any(not isinstance(f, np.ndarray) for f in flats):
        dev = next(str(f.device) for f in flats if not isinstance(f, np.ndarray))
    return _compare_flat(flats[0], flats[1], atol=atol, rtol=rtol, dev=dev, chunk_bytes=chunk_bytes)


# ----------------------------------------------------------------------------- ties


def _info(ckpt: Checkpoint, name: str) -> dict[str, Any]:
    e = ckpt.entry(name)
    return {
        "dtype": e.dtype,
        "shape": list(e.shape),
        "alias_of": e.record() if isinstance(e, Alias) else None,
    }


def _record(ckpt: Checkpoint, name: str) -> tuple[str, tuple[str, ...]] | None:
    a = ckpt.aliases.get(name)
    return None if a is None else (a.source, tuple(a.specs))


def _axis_perm(t: Transform, rank: int) -> tuple[int, ...] | None:
    """The axis permutation ``p`` with ``t(x) == x.permute(p)``, or None if ``t`` is not one."""
    perm = list(range(rank))
    for step in t.steps:
        if isinstance(step, Transpose):
            if step.dims is None:
                if rank != 2:
                    return None
                d0, d1 = 0, 1
            else:
                d0, d1 = (d % rank for d in step.dims) if rank else (0, 0)
            p = list(range(rank))
            p[d0], p[d1] = p[d1], p[d0]
        elif isinstance(step, Permute):
            if len(step.dims) != rank:
                return None
            p = [d % rank for d in step.dims]
        else:
            return None
        perm = [perm[p[i]] for i in range(rank)]
    return tuple(perm)


class _Ties:
    """Tie groups of one checkpoint: stored source -> {member: transform from the source}."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.groups: dict[str, dict[str, Transform]] = {}
        for name, a in ckpt.aliases.items():
            self.groups.setdefault(a.source, {a.source: IDENTITY})[name] = a.transform

    def group(self, name: str) -> dict[str, Transform] | None:
        a = self.ckpt.aliases.get(name)
        return self.groups.get(a.source if a is not None else name)

    def relation(self, name: str) -> tuple | None:
        """The tie group of ``name`` as ``(names, ((member, axis permutation relative to the
        group's first name), ...))``: the same whatever member is stored. None when ``name``
        is untied or a transform in its group is no pure axis permutation."""
        g = self.group(name)
        if g is None:
            return None
        a = self.ckpt.aliases.get(name)
        rank = len(self.ckpt.stored[a.source if a is not None else name].shape)
        perms = {m: _axis_perm(t, rank) for m, t in g.items()}
        if any(p is None for p in perms.values()):
            return None
        first = min(g, key=natural_key)
        inv = [0] * rank
        for i, d in enumerate(perms[first]):
            inv[d] = i
        rel = {m: tuple(inv[p[i]] for i in range(rank)) for m, p in perms.items()}
        return (frozenset(g), tuple(sorted(rel.items())))


def _same_relation(ta: _Ties, tb: _Ties, name: str) -> bool:
    if _record(ta.ckpt, name) == _record(tb.ckpt, name):
        return True
    ra, rb = ta.relation(name), tb.relation(name)
    return ra is not None and ra == rb


def _rearranges(t: Transform) -> bool:
    """True when ``t`` maps elements one to one (no slice): statistics are unchanged by it."""
    return all(isinstance(s, (Transpose, Permute, Reshape)) for s in t.steps)


# ------------------------------------------------------------------------------ diff


@dataclass
class _Job:
    """Values to compare for one name (or a hidden alias source)."""

    key: str
    va: _Value
    vb: _Value
    stats: TensorStats | None = None


@dataclass
class _Entry:
    name: str
    reason: str | None  # shape / dtype / alias decided without data; None = by value
    job: str | None = None  # key of the job whose stats this name takes


def _plan_diff(A: Checkpoint, B: Checkpoint, common: list[str]) -> tuple[list[_Entry], dict[str, _Job]]:
    ta, tb = _Ties(A), _Ties(B)
    entries: list[_Entry] = []
    jobs: dict[str, _Job] = {}

    def stored_job(name: str) -> str | None:
        """The job comparing stored tensor ``name`` of both sides, if shapes agree."""
        key = "stored:" + name
        if key not in jobs:
            sa, sb = A.stored[name], B.stored[name]
            if sa.shape != sb.shape:
                return None
            jobs[key] = _Job(key, _value_of(A, name), _value_of(B, name))
        return key

    for name in common:
        ea, eb = A.entry(name), B.entry(name)
        if tuple(ea.shape) != tuple(eb.shape):
            entries.append(_Entry(name, "shape"))
            continue
        reason = None
        if ea.dtype != eb.dtype:
            reason = "dtype"
        elif not _same_relation(ta, tb, name):
            reason = "alias"
        ra, rb = _record(A, name), _record(B, name)
        key = None
        if ra is None and rb is None:
            key = stored_job(name)
        elif ra is not None and ra == rb and _rearranges(A.aliases[name].transform):
            key = stored_job(ra[0])  # the source's statistics are the alias's
        if key is None:
            key = "value:" + name
            jobs[key] = _Job(key, _value_of(A, name), _value_of(B, name))
        entries.append(_Entry(name, reason, key))
    return entries, jobs


def diff(
    a,
    b,
    atol=0.0,
    rtol=0.0,
    device=None,
    filter=None,  # noqa: A002 - a glob on names
    progress: Progress | None = None,
) -> DiffReport:
    """Compare two checkpoints tensor by tensor, streaming; see the module doc.

    ``a``, ``b``: paths (any readable format), loaded ``Checkpoint``s or state dicts.
    ``filter``: a glob on names. ``device``: None / ``"cpu"`` (numpy, no torch for
    safetensors) or ``"cuda[:N]"``. ``progress(done_bytes, total_bytes)`` is called
    before the first tensor and after each chunk.
    """
    atol, rtol = _tolerances(atol, rtol)
    dev = _device(device)
    opened: list[Checkpoint] = []
    try:
        A, own, label_a = _open(a, "a")
        if own:
            opened.append(A)
        B, own, label_b = _open(b, "b")
        if own:
            opened.append(B)
        dev = _effective_device(dev, A, B)

        def keep(name: str) -> bool:
            return filter is None or fnmatch.fnmatchcase(name, filter)

        names_a = [n for n in A.names() if keep(n)]
        names_b = [n for n in B.names() if keep(n)]
        if filter is not None and not names_a and not names_b:
            raise UsageError(
                f"filter {filter!r} matches no tensor in {label_a} or {label_b}",
                param="filter",
                hint="check the glob (e.g. 'encoder.*')",
            )
        only_a = [n for n in names_a if n not in B]
        only_b = [n for n in names_b if n not in A]
        common = [n for n in names_a if n in B]

        entries, jobs = _plan_diff(A, B, common)
        total = sum(j.va.nbytes + j.vb.nbytes for j in jobs.values())
        advance = _progress_counter(progress, total)

        for job in jobs.values():
            job.stats = _compare_values(job.va, job.vb, atol=atol, rtol=rtol, dev=dev, advance=advance)

        changed: list[Change] = []
        same = 0
        for e in entries:
            stats = jobs[e.job].stats if e.job is not None else None
            reason = e.reason
            if reason is None and stats is not None and not stats.equal:
                reason = "value"
            if reason is None:
                same += 1
                continue
            changed.append(Change(e.name, reason, _info(A, e.name), _info(B, e.name), stats))
        changed.sort(key=Change.severity)
        return DiffReport(label_a, label_b, only_a, only_b, changed, same, atol, rtol, total)
    finally:
        for c in opened:
            c.close()


# ----------------------------------------------------------------------------- check


def check(
    ckpt,
    src: str,
    dst: str,
    transform=None,
    other=None,
    atol=0.0,
    rtol=0.0,
    device=None,
    progress: Progress | None = None,
) -> CheckReport:
    """Assert ``transform(src) == dst`` within tolerance; see the module doc.

    ``ckpt`` / ``other``: paths, loaded ``Checkpoint``s or state dicts; ``dst`` is taken
    from ``other`` when given. ``src`` / ``dst`` may be module prefixes. Unknown names
    raise ``UnknownNameError`` (exit 3), a transform that does not fit a source
    ``TransformError`` (exit 4).
    """
    from ..surgery import pair_names

    atol, rtol = _tolerances(atol, rtol)
    dev = _device(device)
    t = parse(transform)
    opened: list[Checkpoint] = []
    try:
        C, own, label = _open(ckpt, "ckpt")
        if own:
            opened.append(C)
        D, other_label = C, None
        if other is not None:
            D, own, other_label = _open(other, "other")
            if own:
                opened.append(D)
        dev = _effective_device(dev, C, D)
        pairs = pair_names(C, src, D, dst)
        missing = [d for _, d in pairs if d not in D]
        if missing:
            if len(pairs) == 1:
                raise D.unknown(missing[0])
            where = f" in {D.path}" if D.path else ""
            raise UnknownNameError(
                missing[0],
                path=D.path,
                message=f"{len(missing)} of {len(pairs)} destinations are missing{where}: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else ""),
                hint="check the destination, or that both module prefixes hold the same tensors",
            )
        values = [(s, d, _value_of(C, s, t), _value_of(D, d)) for s, d in pairs]  # infer first: fails early

        advance = _progress_counter(
            progress, sum(vs.nbytes + vd.nbytes for _, _, vs, vd in values if vs.shape == vd.shape)
        )

        results: list[PairResult] = []
        for s, d, vs, vd in values:
            info_s = {"dtype": vs.dtype, "shape": list(vs.shape)}
            info_d = _info(D, d)
            if vs.shape != vd.shape:
                results.append(PairResult(s, d, "shape", info_s, info_d, None))
                continue
            stats = _compare_values(vs, vd, atol=atol, rtol=rtol, dev=dev, advance=advance)
            reason = "dtype" if vs.dtype != vd.dtype else (None if stats.equal else "value")
            results.append(PairResult(s, d, reason, info_s, info_d, stats))
        return CheckReport(label, other_label, src, dst, t.specs(), results, atol, rtol)
    finally:
        for c in opened:
            c.close()
