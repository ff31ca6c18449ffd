"""Threads and BLAS for the compare kernel: ``parallel_map`` (results at fixed indices,
whatever the number of threads) and the float64 dot products that never depend on BLAS's
own thread setting (``ONE_THREAD_BLAS``, ``docs/compare.md`` "Tuning")."""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

_DOT_PIECE = 1 << 13


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
            from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]
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

    def library_paths(self) -> list[str]:
        """The files of the BLAS libraries held (numpy's among them), where ``usable``."""
        if not self.usable or self._controller is None:
            return []
        return [lib.filepath for lib in self._controller.select(user_api="blas").lib_controllers]

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
                    assert self._controller is not None  # usable: probed
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
