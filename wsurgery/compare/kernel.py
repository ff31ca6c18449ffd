"""The compare kernel: equality and statistics of one tensor pair, on numpy arrays or on
torch tensors on any device.

``compare_arrays`` compares two whole arrays; ``compare_flat`` streams two flat ones
chunk by chunk (raw bytes screened first, pages released behind it), as ``diff`` and
``check`` do; ``PairStream`` takes a pair piece by piece. All three give the same
statistics (``TensorStats``) by the same per-element rules, whatever the ``Tuning``.
One implementation, written against the array API, serves numpy (CPU, no torch:
``bfloat16`` and ``float8_*`` through ``ml_dtypes``) and torch; CPU tensors go through
zero-copy numpy views. Importing this module, or comparing numpy arrays, never imports
torch.

The rules (tolerance, NaN, signed zeros, integers, mixed dtypes, cosine) and how the work
is streamed and screened are described in ``docs/compare.md``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import array_api_compat as aac
import numpy as np

from ..errors import SurgeryError, UsageError
from .arrays import UINT, dtype_name, is_cpu_tensor, itemsize, numpy_to_torch, to_device, torch_to_numpy

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_CHUNK_ELEMS",
    "PairStream",
    "TensorStats",
    "Tuning",
    "check_shapes",
    "check_tolerances",
    "compare_arrays",
    "compare_flat",
    "json_float",
    "l2_norm",
    "parallel_map",
    "resolve_tuning",
]

DEFAULT_CHUNK_ELEMS = 1 << 24
_CPU_BLOCK_BYTES = 1 << 20  # raw-bytes block per side on CPU
# Statistics sub-block on CPU. Its float64 temporaries (64 KiB) stay under glibc's mmap
# threshold: bigger ones are mapped and unmapped (or trimmed) on every block and then
# page-fault at every use, which costs 3x.
_CPU_STATS_ELEMS = 1 << 13
_SUMSQ_PIECE = 1 << 15  # identical blocks (torch on CPU): sum of squares via one reused buffer
# Real-float kernel block on CPU (numpy): two reused float64 buffers of this many elements
# (1 MiB, in L2), about 12 numpy calls per block. Measured on a float32 pair that differs
# everywhere: 8 Ki -> 0.9, 32 Ki -> 2.0, 64 Ki -> 2.2, 128 Ki -> 2.2 GB/s.
_FAST_ELEMS = 1 << 16
# OpenBLAS runs a dot of fewer than 10000 elements on the calling thread; a longer one on
# all its threads, which stalls on a busy machine and whose rounding depends on their
# number. So a float64 dot product is one BLAS call with BLAS held on one thread
# (_OneThreadBlas, through threadpoolctl) or, where BLAS cannot be held, a sum of BLAS
# dots over pieces of this many elements, folded in order: either way the sums depend on
# the data alone, never on BLAS's thread setting. One call per 64 Ki block is the faster:
# two threads' short piece calls do not overlap (1.25x the time of a diff that differs
# everywhere). A divisor of the 64 Ki blocks: a block's pieces are one matmul.
_DOT_PIECE = 1 << 13
# Threads for the float kernel (numpy releases the GIL in its loops; 2 threads: 1.7 -> 3.0
# GB/s on a float32 pair that differs everywhere). Capped: memory bandwidth is the limit.
_MAX_WORKERS = 4
_PARALLEL_MIN_BLOCKS = 4  # fewer kernel blocks than this run on the calling thread
_TORCH_CPU_VIA_NUMPY = True  # tests turn it off to run the torch namespace on CPU
_INT64_MIN = -(1 << 63)
_TWO64 = float(1 << 64)

# Streaming (compare_flat)
CHUNK_BYTES = 32 << 20  # per side: pages are released behind each chunk
SCREEN_BYTES = 512 << 10  # raw-bytes screening block per side (same-dtype pairs on CPU; stays in L2)
SCREEN_PIECE_BYTES = 64 << 10  # a differing block goes to the kernel in runs of such pieces
_SUMS_BLOCK = 1 << 16  # elements per float64 block of the cosine sums (stays in cache)
_SUMS_TASK = 4  # blocks per thread task of _identical_sums
_PENDING_STEP = 1 << 22  # elements re-read at once for the sums of an identical prefix


# --------------------------------------------------------------------- tuning, arguments


@dataclass(frozen=True)
class Tuning:
    """How a compare uses the machine, never what it computes.

    Every statistic is the same to the bit whatever the tuning: the work is cut into the
    same blocks and their partial results are folded in the same order, however many
    threads compute them, and numpy's BLAS is held on one thread while a compare runs
    (its own thread setting changes nothing; ``docs/compare.md``, "Tuning and
    reproducibility").

    Attributes:
        workers: threads that share the work on one tensor pair, the calling thread
            included: byte screening, the float kernel and the sums of identical
            blocks. 1 runs everything on the calling thread.

    Example:

    ```python
    from wsurgery.compare import Tuning, diff

    report = diff("a.safetensors", "b.safetensors", tuning=Tuning(workers=1))
    ```
    """

    workers: int

    def __post_init__(self):
        w = self.workers
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise UsageError(f"tuning: workers must be an integer >= 1, got {w!r}", param="tuning")

    @classmethod
    def detect(cls) -> Tuning:
        """The default tuning, read when called (never at import): one worker per CPU this
        process may run on, at most 4 (memory bandwidth is the limit beyond)."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        return cls(workers=max(1, min(cpus, _MAX_WORKERS)))


def resolve_tuning(tuning: Tuning | None) -> Tuning:
    """``tuning``, or the one detected now when it is None."""
    if tuning is None:
        return Tuning.detect()
    if not isinstance(tuning, Tuning):
        raise UsageError(f"tuning must be a Tuning, got {type(tuning).__name__}", param="tuning")
    return tuning


def check_tolerances(atol, rtol) -> tuple[float, float]:
    """``(atol, rtol)`` as floats. Each must be a finite number >= 0: anything else (a
    negative value, NaN, ``inf``, a string) raises ``UsageError`` with ``param`` set to
    ``"atol"`` or ``"rtol"``."""
    out = []
    for param, value in (("atol", atol), ("rtol", rtol)):
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise UsageError(
                f"{param} must be a number, got {value!r}", param=param, hint="pass a number such as 1e-6"
            ) from None
        if not (math.isfinite(x) and x >= 0):
            raise UsageError(
                f"{param} must be finite and >= 0, got {x}",
                param=param,
                hint="pass a finite, non-negative tolerance such as 1e-6",
            )
        out.append(x)
    return out[0], out[1]


def check_shapes(shape_a, shape_b) -> None:
    """``SurgeryError`` naming both shapes unless they are the same."""
    shape_a, shape_b = tuple(int(s) for s in shape_a), tuple(int(s) for s in shape_b)
    if shape_a != shape_b:
        raise SurgeryError(
            f"shape mismatch: {list(shape_a)} vs {list(shape_b)}",
            hint="only tensors of the same shape can be compared element by element",
        )


# --------------------------------------------------------------------------- result


def json_float(x: float | None) -> float | str | None:
    """A float for JSON: finite values as they are, None as None, and the non-finite ones
    as the strings ``"Infinity"``, ``"-Infinity"`` and ``"NaN"`` (what Python's ``float()``
    and JavaScript's ``Number()`` read back), so the output stays valid JSON."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


@dataclass(frozen=True)
class TensorStats:
    """Equality and difference statistics of one tensor pair (``docs/compare.md``, "Statistics").

    Attributes:
        equal: no element mismatched.
        numel: elements compared.
        mismatched: elements not equal, or not within tolerance.
        max_abs_diff: max ``|a - b|``; ``inf`` when a mismatch involves a non-finite value.
        max_rel_diff: max ``|a - b| / |b|``, with the same rule; ``inf`` where ``b == 0 != a``.
        cosine: cosine similarity over the positions where both values are finite (float64
            sums); None when a side has no finite non-zero value there, or ``numel == 0``.
        rel_l2: ``||a - b|| / ||a||`` (L2 norms, float64 sums over the positions where both
            values are finite); 0.0 when ``||a - b|| == 0`` (equal values, or ``numel ==
            0``), ``inf`` when ``||a|| == 0`` and ``||a - b|| > 0`` or when a mismatch
            involves a non-finite value. None only where it was not computed.
        norm_a, norm_b: ``||a||`` and ``||b||`` over the positions where both values are
            finite; None when not computed (a bit-identical pair is never summed).
        norm_diff: ``||a - b||`` over those positions (``inf`` when a mismatch involves a
            non-finite value); 0.0 for a bit-identical pair.
    """

    equal: bool
    numel: int
    mismatched: int
    max_abs_diff: float
    max_rel_diff: float
    cosine: float | None
    rel_l2: float | None = None
    norm_a: float | None = None
    norm_b: float | None = None
    norm_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats become ``"Infinity"``, ``"-Infinity"`` or
        ``"NaN"`` (``json_float``)."""
        return {
            "equal": self.equal,
            "numel": self.numel,
            "mismatched": self.mismatched,
            "max_abs_diff": json_float(self.max_abs_diff),
            "max_rel_diff": json_float(self.max_rel_diff),
            "cosine": json_float(self.cosine),
            "rel_l2": json_float(self.rel_l2),
        }


# ------------------------------------------------------------------------ dtypes
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
        return float(total)


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


# ------------------------------------------------------------------ accumulating, threads


class _Acc:
    """Running statistics of one tensor pair, over blocks or pieces: mismatch counts and
    maxima, the float64 cosine sums (``dot``, ``na`` = |a|^2, ``nb`` = |b|^2) and ``dd`` =
    |a - b|^2, all over the positions where both values are finite; ``unbounded``: some
    mismatch involves a non-finite value."""

    def __init__(self):
        self.mismatched = 0
        self.max_abs = 0.0
        self.max_abs_int = 0  # exact, integer plans
        self.max_rel = 0.0
        self.dot = 0.0
        self.na = 0.0
        self.nb = 0.0
        self.dd = 0.0
        self.unbounded = False

    def add_identical(self, sq: float):
        """A block that is the same on both sides, with sum of squares ``sq``."""
        self.dot += sq
        self.na += sq
        self.nb += sq

    def add_sums(self, dot: float, na: float, nb: float) -> None:
        self.dot += dot
        self.na += na
        self.nb += nb

    def add_piece(self, o: _Acc) -> None:
        """The mismatch statistics and ``dd`` (not the cosine sums) of a piece compared
        on its own."""
        self.mismatched += o.mismatched
        self.max_abs = max(self.max_abs, o.max_abs, float(o.max_abs_int))
        self.max_rel = max(self.max_rel, o.max_rel)
        self.dd += o.dd
        self.unbounded = self.unbounded or o.unbounded

    def merge(self, o: _Acc) -> None:
        self.mismatched += o.mismatched
        self.max_abs = max(self.max_abs, o.max_abs)
        self.max_abs_int = max(self.max_abs_int, o.max_abs_int)
        if o.max_rel > self.max_rel:
            self.max_rel = o.max_rel
        self.add_sums(o.dot, o.na, o.nb)
        self.dd += o.dd
        self.unbounded = self.unbounded or o.unbounded

    @property
    def max_abs_diff(self) -> float:
        return max(self.max_abs, float(self.max_abs_int))

    def stats(self, numel: int, cosine: float | None, norms: tuple | None = None) -> TensorStats:
        """``norms``: ``(rel_l2, norm_a, norm_b, norm_diff)`` (``_l2``)."""
        return TensorStats(
            self.mismatched == 0, numel, self.mismatched, self.max_abs_diff, self.max_rel, cosine, *(norms or ())
        )


def _cosine(dot: float, na: float, nb: float) -> float | None:
    """The cosine from the float64 sums (None when a norm is 0)."""
    if not (na > 0 and nb > 0):
        return None
    p = na * nb  # one rounding less than sqrt(na) * sqrt(nb), unless out of range
    norm = math.sqrt(p) if sys.float_info.min <= p < math.inf else math.sqrt(na) * math.sqrt(nb)
    c = dot / norm
    return min(1.0, max(-1.0, c))


def _l2(
    na: float, nb: float, dd: float, unbounded: bool, ma: float = 1.0, mb: float = 1.0, s: float = 1.0
) -> tuple[float, float, float, float]:
    """``(rel_l2, norm_a, norm_b, norm_diff)`` from float64 sums of squares: ``na`` of
    ``a / ma``, ``nb`` of ``b / mb``, ``dd`` of ``(a - b) / s`` (scales 1 unless rescaled)."""
    norm_a, norm_b = ma * math.sqrt(na), mb * math.sqrt(nb)
    if unbounded:
        return math.inf, norm_a, norm_b, math.inf
    norm_diff = s * math.sqrt(dd)
    if dd == 0:
        return 0.0, norm_a, norm_b, norm_diff
    if na == 0:
        return math.inf, norm_a, norm_b, norm_diff
    q = dd / na
    if sys.float_info.min <= q < math.inf:
        rel = math.sqrt(q)  # one rounding less than sqrt(dd) / sqrt(na)
    else:
        rel = math.sqrt(dd) / math.sqrt(na)
    return (rel if s == ma else rel * (s / ma)), norm_a, norm_b, norm_diff


def _needs_rescale(plan: str, names: set[str], acc: _Acc) -> tuple[bool, bool]:
    """Whether float64 sums went out of range: ``(for the cosine, for the norms)``.

    Only float64 / complex128 inputs can underflow (a zero sum of squares may be one of
    values below 1e-154); any float input can overflow. Non-finite values themselves are
    never summed (``unbounded`` says what they did)."""
    if plan not in ("float", "complex"):
        return False, False
    wide = bool(names & {"float64", "complex128"})
    finite = all(math.isfinite(v) for v in (acc.dot, acc.na, acc.nb))
    cos = not finite or (wide and (acc.na == 0 or acc.nb == 0))
    tiny = sys.float_info.min
    norms = (
        not finite
        or not math.isfinite(acc.dd)
        or (wide and (acc.na < tiny or acc.nb < tiny or (acc.dd < tiny and acc.max_abs_diff > 0)))
    )
    return cos, norms


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:  # noqa: SLF001 - our own pool
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsurgery-compare")
        return _POOL


def parallel_map(fn: Callable[[int], Any], n: int, *, workers: int, min_items: int = 2) -> list:
    """``[fn(k) for k in range(n)]``, spread over up to ``workers`` threads (the calling
    one included).

    Only worth it where ``fn`` spends its time outside the GIL (numpy loops, BLAS,
    ctypes calls). Items are taken in turn from one counter and every result lands at
    its own index, so the list is the same whatever the number of threads. Fewer than
    ``min_items`` items run on the calling thread. numpy's floating-point warnings are
    off while ``fn`` runs (on every thread): the callers handle non-finite results.
    """
    workers = min(workers, n // min_items) if n >= min_items > 0 else 1
    out: list = [None] * n
    counter = itertools.count()  # next() is atomic: threads take items in turn

    def work() -> None:
        # errstate is thread-local; so is a share of the one-thread BLAS hold (taken once
        # per thread here, not once per dot product)
        with np.errstate(all="ignore"), ONE_THREAD_BLAS:
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


def _fold(parts: np.ndarray) -> float:
    """The sum of the pieces' dot products, left to right."""
    total = 0.0
    for v in parts.ravel().tolist():
        total += v
    return total


class _OneThreadBlas:
    """numpy's BLAS held to one thread while any compare runs, so that a dot product can
    be one BLAS call whatever its length and still never depend on BLAS's thread setting.

    ``threadpoolctl`` sets the thread count of the BLAS numpy loaded; where it cannot (no
    such library found, or it would not take the limit) ``usable`` is False and every dot
    runs in pieces of ``_DOT_PIECE`` instead. The choice is made once per process, so
    results never depend on which path a call took. Compares nest and may run on several
    threads at once: the first to enter sets the limit, the last to leave restores the
    previous setting. Other threads of the process that use BLAS meanwhile run it on one
    thread too.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0  # shares held, all threads together
        self._mine = threading.local()  # .depth: the shares this thread holds
        self._limiter = None
        self._usable: bool | None = None
        self._controller = None

    @property
    def usable(self) -> bool:
        if self._usable is None:
            with self._lock:
                if self._usable is None:
                    self._usable = self._probe()
        return self._usable

    def _probe(self) -> bool:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - a dependency
            return False
        try:
            controller = ThreadpoolController()
            blas = controller.select(user_api="blas")
            if not blas.lib_controllers:
                return False
            limiter = blas.limit(limits=1)
            ok = all(info["num_threads"] == 1 for info in blas.info())
            limiter.restore_original_limits()
        except Exception:  # noqa: BLE001 - an unusual BLAS: keep the pieces
            return False
        self._controller = controller
        return ok

    @property
    def held_here(self) -> bool:
        """Whether this thread holds a share (then the hold cannot end under it)."""
        return getattr(self._mine, "depth", 0) > 0

    def __enter__(self) -> _OneThreadBlas:
        mine = getattr(self._mine, "depth", 0)
        self._mine.depth = mine + 1
        if mine == 0 and self.usable:  # a thread's first share: one count in the shared hold
            with self._lock:
                if self._depth == 0:
                    self._limiter = self._controller.select(user_api="blas").limit(limits=1)
                self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._mine.depth -= 1
        if self._mine.depth == 0 and self.usable:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._limiter is not None:
                    self._limiter.restore_original_limits()
                    self._limiter = None


ONE_THREAD_BLAS = _OneThreadBlas()


def _with_one_blas_thread(fn):
    """Run ``fn`` with ``ONE_THREAD_BLAS`` held: its dot products then cost no toggling."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ONE_THREAD_BLAS:
            return fn(*args, **kwargs)

    return wrapper


def _one_call_dot(x: np.ndarray, y: np.ndarray) -> float:
    """Re sum conj(x) * y in one BLAS call, on one BLAS thread (``_OneThreadBlas``).

    The calling thread holds a share of the hold for the call (compares and the kernel's
    worker threads hold one already), so no other thread's compare can give BLAS its
    threads back mid-call."""
    if not ONE_THREAD_BLAS.held_here:
        with ONE_THREAD_BLAS:
            return _one_call_dot(x, y)
    if x.dtype.kind == "c":
        return float(np.vdot(x, y).real)
    return float(np.dot(x, y))


def _float64_dot(x: np.ndarray, y: np.ndarray) -> float:
    """Re sum conj(x) * y of two 1-D float64 / complex128 numpy arrays, never depending on
    BLAS's thread setting: one BLAS call on one BLAS thread where ``threadpoolctl`` can
    hold it there (``_OneThreadBlas``), else BLAS dots over pieces of ``_DOT_PIECE``
    elements, folded in order (see ``_DOT_PIECE``).

    The whole real pieces go to BLAS in one ``matmul`` call (a stack of piece-by-piece
    dot products): no Python per piece, the same partition, the same sums.
    """
    if ONE_THREAD_BLAS.usable:
        return _one_call_dot(x, y)
    n = x.shape[0]
    if x.dtype.kind == "c":
        total = 0.0
        for i in range(0, n, _DOT_PIECE):
            total += float(np.vdot(x[i : i + _DOT_PIECE], y[i : i + _DOT_PIECE]).real)
        return total
    if n <= _DOT_PIECE:
        return float(np.dot(x, y))
    k = n // _DOT_PIECE
    full = k * _DOT_PIECE
    total = _fold(np.matmul(x[:full].reshape(k, 1, _DOT_PIECE), y[:full].reshape(k, _DOT_PIECE, 1)))
    if full < n:
        total += float(np.dot(x[full:], y[full:]))
    return total


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

    Blocks run on up to ``workers`` threads (numpy releases the GIL), each with its own
    buffers. Every block gets its own partial statistics, merged in block order:
    the results do not depend on the number of threads or on their timing.
    """

    def __init__(self, cmp: _Cmp, dtype_a, dtype_b, size: int, workers: int = 1):
        self.cmp = cmp
        self.workers = workers
        self.dtypes = (np.dtype(dtype_a), np.dtype(dtype_b))
        self.size = max(1, int(size))
        self.A = np.empty(self.size, dtype=np.float64)
        self.B = np.empty(self.size, dtype=np.float64)
        # Where BLAS cannot be held on one thread, a whole block's dot products: the pieces'
        # matmul over reused views of the buffers (the same pieces, the same sums as
        # _float64_dot, fewer Python calls per block).
        self._pieces = None
        if not ONE_THREAD_BLAS.usable and self.size > _DOT_PIECE and self.size % _DOT_PIECE == 0:
            k = self.size // _DOT_PIECE
            rows = tuple(buf.reshape(k, 1, _DOT_PIECE) for buf in (self.A, self.B))
            cols = tuple(buf.reshape(k, _DOT_PIECE, 1) for buf in (self.A, self.B))
            self._pieces = (rows, cols, np.empty((k, 1, 1)))
        self.T = None if cmp.exact else np.empty(self.size, dtype=np.float64)
        self.mask = np.empty(self.size, dtype=bool)
        self.ucode = UINT.get(self.dtypes[0].itemsize) if self.dtypes[0] == self.dtypes[1] else None
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

        nblocks = -(-a.shape[0] // size)
        for part in parallel_map(block, nblocks, workers=self.workers, min_items=_PARALLEL_MIN_BLOCKS):
            acc.merge(part)

    def _dot(self, m: int, i: int, j: int) -> float:
        """The dot product of buffers ``i`` and ``j`` (0: A, 1: B) over the first ``m`` elements."""
        if m == self.size and self._pieces is not None:
            rows, cols, parts = self._pieces
            return _fold(np.matmul(rows[i], cols[j], out=parts))
        bufs = (self.A, self.B)
        return _float64_dot(bufs[i][:m], bufs[j][:m])

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
            s = self._dot(m, 0, 0)
            acc.add_identical(s if math.isfinite(s) else cmp.self_dot(a, cmp.name_a))
            return
        B = self.B[:m]
        np.copyto(B, b, casting="unsafe")
        na, nb = self._dot(m, 0, 0), self._dot(m, 1, 1)
        if not (math.isfinite(na) and math.isfinite(nb)):
            step = _CPU_STATS_ELEMS
            for i in range(0, m, step):
                cmp.block(a[i : i + step], b[i : i + step], acc)
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
            bound = self.T[:m]  # |a - b| <= atol + rtol * |b|, the operations of _float_block
            np.multiply(absb, cmp.rtol, out=bound)
            if cmp.atol:
                np.add(bound, cmp.atol, out=bound)
            acc.mismatched += m - int(np.count_nonzero(np.less_equal(diff, bound, out=mask)))
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
            fa, fb = to_device(self.fa, self.dev), to_device(self.fb, self.dev)
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

            w = piece.to(torch.complex128 if piece.is_complex() else torch.float64)
            w = torch.where(torch.isfinite(w), w, torch.zeros_like(w)) / m
            total += float(torch.vdot(w, w).real)
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
            stats, piece = _compare(x, y, atol, rtol, DEFAULT_CHUNK_ELEMS, tuning.workers)
            st.acc.add_piece(piece)
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
