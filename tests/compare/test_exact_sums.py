"""The every-element statistics are the documented sums, to the bit: a reference written
out plainly (each 64 Ki-element block cast to float64 once, one BLAS dot product per sum
and block, added in block order) against ``compare_tensors`` and ``diff`` on random pairs
of several dtypes. Any faster kernel must keep these bits (``docs/compare-performance.md``)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from wsurgery.compare import Tuning, compare_tensors, diff
from wsurgery.compare import kernel as ce
from wsurgery.compare.float_kernel import _FAST_ELEMS
from wsurgery.compare.stats import _cosine, _l2

BLOCK = _FAST_ELEMS  # the kernel's float64 block: its sums are part of the result


def reference(a: np.ndarray, b: np.ndarray) -> dict:
    """Every statistic of a finite pair, computed the documented way, block by block."""
    dot = na = nb = dd = 0.0
    mismatched, max_abs, max_rel = 0, 0.0, 0.0
    with ce.ONE_THREAD_BLAS:  # one BLAS thread: the rounding of a dot never depends on threads
        for i in range(0, a.shape[0], BLOCK):
            A = a[i : i + BLOCK].astype(np.float64)
            B = b[i : i + BLOCK].astype(np.float64)
            dot += float(np.dot(A, B))
            na += float(np.dot(A, A))
            nb += float(np.dot(B, B))
            D = A - B
            dd += float(np.dot(D, D))
            same = (A == B) & (np.signbit(A) == np.signbit(B))
            mismatched += int((~same).sum())
            max_abs = max(max_abs, float(np.abs(D).max()))
            q = np.abs(D) / np.abs(B)
            q[D == 0] = 0.0
            max_rel = max(max_rel, float(q.max()))
    rel_l2, norm_a, norm_b, norm_diff = _l2(na, nb, dd, False)
    return {
        "mismatched": mismatched,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "cosine": _cosine(dot, na, nb),
        "rel_l2": rel_l2,
        "norm_a": norm_a,
        "norm_b": norm_b,
        "norm_diff": norm_diff,
    }


def fine_tune(n: int, dtype, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``b = a + noise`` in every element, but for two identical 64 Ki blocks."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(np.float32)
    b = a + np.float32(1e-2) * rng.standard_normal(n).astype(np.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    b[BLOCK : 2 * BLOCK] = a[BLOCK : 2 * BLOCK]  # a bit-identical block inside
    b[-100:] = a[-100:]  # an identical tail
    return a, b


def _bits(x: float | None) -> str | None:
    return None if x is None else float(x).hex()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
@pytest.mark.parametrize("workers", [1, 2])
def test_every_element_statistics_are_the_reference_sums_to_the_bit(dtype, workers):
    a, b = fine_tune(5 * BLOCK + 777, dtype, seed=11)
    want = reference(a, b)
    got = compare_tensors(a, b, tuning=Tuning(workers=workers))
    assert {k: _bits(getattr(got, k)) if k != "mismatched" else got.mismatched for k in want} == {
        k: _bits(v) if k != "mismatched" else v for k, v in want.items()
    }
    assert got.mismatched > 0 and math.isfinite(got.rel_l2)


def test_a_diff_of_state_dicts_gives_the_reference_bits():
    torch = pytest.importorskip("torch")
    a, b = fine_tune(3 * BLOCK + 5, np.float32, seed=3)
    want = reference(a, b)
    report = diff({"w": torch.from_numpy(a)}, {"w": torch.from_numpy(b)}, tuning=Tuning(workers=2))
    (change,) = report.changed
    s = change.stats
    assert (_bits(s.cosine), _bits(s.rel_l2), _bits(s.norm_diff), s.mismatched) == (
        _bits(want["cosine"]),
        _bits(want["rel_l2"]),
        _bits(want["norm_diff"]),
        want["mismatched"],
    )
