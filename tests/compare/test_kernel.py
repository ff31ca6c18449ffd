"""Tests for wsurgery.compare.kernel: per-tensor equality and statistics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsurgery.compare import backends as bk
from wsurgery.compare import float_kernel as fk
from wsurgery.compare import kernel as ce
from wsurgery.compare import stats as sm
from wsurgery.compare import threads as th
from wsurgery.compare.arrays import to_device
from wsurgery.compare.kernel import TensorStats, Tuning, compare_arrays
from wsurgery.errors import InputError, SurgeryError, UsageError
from wsurgery.numpy_apply import numpy_view

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")
needs_cuda = pytest.mark.skipif(torch is None or not torch.cuda.is_available(), reason="CUDA not available")

ROOT = Path(__file__).resolve().parents[2]
INF = math.inf
NAN = math.nan
I64 = np.iinfo(np.int64)
U64_MAX = (1 << 64) - 1


def f64(*xs):
    return np.array(xs, dtype=np.float64)


class Six:
    """Compares equal to a ``TensorStats`` whose first six statistics are these (``rel_l2``
    and the norms are tested on their own)."""

    def __init__(self, *values):
        self.values = values
        self.equal, self.numel, self.mismatched, self.max_abs_diff, self.max_rel_diff, self.cosine = values

    def __eq__(self, other):
        if not isinstance(other, TensorStats):
            return NotImplemented
        got = (other.equal, other.numel, other.mismatched, other.max_abs_diff, other.max_rel_diff, other.cosine)
        return got == self.values

    def __repr__(self):
        return f"Six{self.values}"


def stats(equal, numel, mismatched, max_abs, max_rel, cosine):
    return Six(equal, numel, mismatched, max_abs, max_rel, cosine)


@contextlib.contextmanager
def _small_cpu_blocks(block_bytes: int, stats_elems: int):
    """Small CPU raw-bytes blocks and statistics sub-blocks (both modules that read them)."""
    with (
        mock.patch.object(bk, "_CPU_BLOCK_BYTES", block_bytes),
        mock.patch.object(bk, "_CPU_STATS_ELEMS", stats_elems),
        mock.patch.object(fk, "_CPU_STATS_ELEMS", stats_elems),
    ):
        yield


def assert_stats(got: TensorStats, want: TensorStats, cos_tol: float = 1e-12):
    assert (got.equal, got.numel, got.mismatched) == (want.equal, want.numel, want.mismatched)
    assert got.max_abs_diff == want.max_abs_diff
    assert got.max_rel_diff == want.max_rel_diff
    if want.cosine is None:
        assert got.cosine is None
    else:
        assert got.cosine is not None
        assert got.cosine == pytest.approx(want.cosine, rel=cos_tol, abs=cos_tol)


# ----------------------------------------------------------------- hand computed


def test_identical_tensors():
    a = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    assert compare_arrays(a, a.copy()) == stats(True, 12, 0, 0.0, 0.0, 1.0)


def test_hand_computed_statistics():
    a = f64(1.0, 2.0, 4.0, 0.0)
    b = f64(1.0, 2.5, 3.0, 0.0)
    # |a-b| = 0, .5, 1, 0; rel = 0, .5/2.5, 1/3, 0; dot 18, |a|^2 21, |b|^2 16.25
    want = stats(False, 4, 2, 1.0, 1.0 / 3.0, 18.0 / math.sqrt(21.0 * 16.25))
    assert_stats(compare_arrays(a, b), want)
    assert_stats(compare_arrays(a.astype(np.float32), b.astype(np.float32)), want)


def test_rel_diff_with_zero_reference():
    r = compare_arrays(f64(1.0, 0.0, 3.0), f64(0.0, 0.0, 3.0))
    assert r == stats(False, 3, 1, 1.0, INF, 9.0 / math.sqrt(10.0 * 9.0))


def test_negative_cosine():
    r = compare_arrays(f64(1.0, -2.0), f64(-1.0, 2.0))
    assert r.cosine == -1.0 and r.max_abs_diff == 4.0 and r.max_rel_diff == 2.0


# -------------------------------------------------------------------- tolerance


def test_atol_edge_exactly_within_and_just_above():
    a = f64(1.0, 7.0)
    assert compare_arrays(a, f64(1.25, 7.0), atol=0.25).equal
    r = compare_arrays(a, f64(1.25 + 2.0**-20, 7.0), atol=0.25)
    assert (r.equal, r.mismatched, r.max_abs_diff) == (False, 1, 0.25 + 2.0**-20)
    assert not compare_arrays(a, f64(1.25, 7.0)).equal  # default tolerance is exact


def test_rtol_edge_and_combined():
    a, b = f64(3.0), f64(4.0)  # |a-b| = 1, |b| = 4
    assert compare_arrays(a, b, rtol=0.25).equal
    assert not compare_arrays(a, b, rtol=0.25 - 2.0**-20).equal
    assert compare_arrays(a, b, atol=0.5, rtol=0.125).equal
    assert not compare_arrays(a, b, atol=0.5 - 2.0**-20, rtol=0.125).equal
    # rtol scales |b| (the second argument), as torch.isclose
    assert not compare_arrays(b, a, rtol=0.25).equal


def test_tolerance_statistics_cover_all_elements():
    r = compare_arrays(f64(1.0, 2.0), f64(1.5, 2.0), atol=0.5)
    assert r == stats(True, 2, 0, 0.5, 1.0 / 3.0, r.cosine)
    assert r.to_dict()["equal"] is True


@pytest.mark.parametrize(
    "atol, rtol, param",
    [
        (-1.0, 0.0, "atol"),
        (0.0, -0.5, "rtol"),
        (NAN, 0.0, "atol"),
        ("x", 0.0, "atol"),
        (INF, 0.0, "atol"),
        (0.0, INF, "rtol"),
        (0.0, None, "rtol"),
    ],
)
def test_bad_tolerance_is_usage_error(atol, rtol, param):
    """One rule everywhere (compare_arrays, PairStream, diff, check): finite and >= 0."""
    with pytest.raises(UsageError) as e:
        compare_arrays(f64(1.0), f64(1.0), atol=atol, rtol=rtol)
    assert e.value.param == param
    with pytest.raises(UsageError) as e:
        ce.PairStream(np.float64, np.float64, atol=atol, rtol=rtol)
    assert e.value.param == param


def test_bad_chunk_elems_is_usage_error():
    with pytest.raises(UsageError):
        compare_arrays(f64(1.0), f64(1.0), chunk_elems=0)


# ------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("atol", [0.0, 0.5])
def test_nan_at_same_position_is_equal(atol):
    r = compare_arrays(f64(NAN, 1.0, 2.0), f64(NAN, 1.0, 2.0), atol=atol)
    assert r == stats(True, 3, 0, 0.0, 0.0, 1.0)
    r = compare_arrays(f64(NAN, 1.0, 2.0), f64(NAN, 1.0, 3.0), atol=atol)
    # cosine over the finite pairs only: (1*1 + 2*3) / sqrt(5 * 10)
    assert r == stats(False, 3, 1, 1.0, 1.0 / 3.0, 7.0 / math.sqrt(50.0))


def test_nan_payload_and_sign_ignored():
    bits = np.array([0x7FF8000000000000, 0xFFF8000000000001, 0x3FF0000000000000], np.uint64)
    other = np.array([0x7FF8000000000123, 0x7FF8000000000000, 0x3FF0000000000000], np.uint64)
    r = compare_arrays(bits.view(np.float64), other.view(np.float64))
    assert r == stats(True, 3, 0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("atol", [0.0, 1e300])
def test_nan_at_different_positions(atol):
    r = compare_arrays(f64(NAN, 1.0), f64(1.0, NAN), atol=atol)
    assert r == stats(False, 2, 2, INF, INF, None)  # no finite pair left for cosine


@pytest.mark.parametrize("atol", [0.0, 1e300])  # an infinite atol is a UsageError (below)
def test_infinities(atol):
    assert compare_arrays(f64(INF, -INF, 1.0), f64(INF, -INF, 1.0), atol=atol).equal
    # an unbounded difference has no cosine (the finite positions alone would say 1.0)
    r = compare_arrays(f64(INF, 2.0), f64(-INF, 2.0), atol=atol)
    assert r == stats(False, 2, 1, INF, INF, None)
    r = compare_arrays(f64(INF, 2.0), f64(5.0, 2.0), atol=atol)
    assert r == stats(False, 2, 1, INF, INF, None)


def test_float64_overflowing_difference():
    r = compare_arrays(f64(1e308), f64(-1e308))
    assert r == stats(False, 1, 1, INF, INF, -1.0)


# ------------------------------------------------------------------ signed zeros


def test_signed_zero_is_mismatch_at_zero_tolerance():
    r = compare_arrays(f64(-0.0, 1.0), f64(0.0, 1.0))
    assert r == stats(False, 2, 1, 0.0, 0.0, 1.0)
    r = compare_arrays(f64(-0.0), f64(0.0))
    assert r == stats(False, 1, 1, 0.0, 0.0, None)


@pytest.mark.parametrize("atol, rtol", [(1e-12, 0.0), (0.0, 0.1)])
def test_signed_zero_is_close_with_tolerance(atol, rtol):
    assert compare_arrays(f64(-0.0, 1.0), f64(0.0, 1.0), atol=atol, rtol=rtol).equal


def test_signed_zero_mixed_dtypes_at_zero_tolerance():
    r = compare_arrays(np.array([-0.0], np.float32), f64(0.0))
    assert r.mismatched == 1
    assert compare_arrays(np.array([1.0], np.float32), f64(1.0)).equal


# ---------------------------------------------------------------- shapes, sizes


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 2, 5)])
def test_zero_size(shape):
    a = np.zeros(shape, np.float32)
    assert compare_arrays(a, a) == stats(True, 0, 0, 0.0, 0.0, None)
    assert compare_arrays(a, np.zeros(shape, np.int64)) == stats(True, 0, 0, 0.0, 0.0, None)


def test_scalars():
    assert compare_arrays(np.array(2.0), np.array(3.0)) == stats(False, 1, 1, 1.0, 1 / 3, 1.0)
    assert compare_arrays(np.float32(2.0), np.float32(2.0)) == stats(True, 1, 0, 0.0, 0.0, 1.0)
    assert compare_arrays(np.array(0.0), np.array(0.0)) == stats(True, 1, 0, 0.0, 0.0, None)


def test_shape_mismatch_is_surgery_error():
    with pytest.raises(SurgeryError) as info:
        compare_arrays(np.zeros((2, 3)), np.zeros((3, 2)))
    assert "[2, 3]" in str(info.value) and "[3, 2]" in str(info.value)


def test_non_contiguous_inputs():
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    a = base[:, ::3]
    b = a.copy()
    b[2, 1] = 99.0
    assert compare_arrays(a, b) == compare_arrays(np.ascontiguousarray(a), b)
    assert compare_arrays(a.T, b.T, chunk_elems=5).mismatched == 1


def test_all_zero_tensors():
    z = np.zeros(50, np.float32)
    assert compare_arrays(z, z) == stats(True, 50, 0, 0.0, 0.0, None)
    assert compare_arrays(z, z + 1) == stats(False, 50, 50, 1.0, 1.0, None)


# ----------------------------------------------------------------------- dtypes


def test_bfloat16_numpy():
    bf = ml_dtypes.bfloat16
    a = np.array([1.0, 2.0, 3.0], dtype=bf)
    b = np.array([1.0, 2.0, 3.015625], dtype=bf)  # next bf16 after 3.0
    assert float(b[2]) == 3.015625
    d = 0.015625
    dot = 1 + 4 + 3 * 3.015625
    want = stats(False, 3, 1, d, d / 3.015625, dot / math.sqrt(14 * (5 + 3.015625**2)))
    assert_stats(compare_arrays(a, b), want)
    assert compare_arrays(a, b, atol=d).equal
    assert not compare_arrays(a, b, atol=d / 2).equal


def test_float16():
    a = np.array([1.0, 1024.0], np.float16)
    b = np.array([1.0, 1025.0], np.float16)  # spacing 1 at 1024
    assert_stats(
        compare_arrays(a, b),
        stats(False, 2, 1, 1.0, 1 / 1025, (1 + 1024 * 1025) / math.sqrt((1 + 1024**2) * (1 + 1025**2))),
    )


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
def test_float8(name):
    dt = getattr(ml_dtypes, name)
    a = np.array([1.0, 2.0, NAN, -0.5], dtype=dt)
    b = np.array([1.0, 2.5, NAN, -0.5], dtype=dt)
    want = stats(False, 4, 1, 0.5, 0.2, (1 + 5 + 0.25) / math.sqrt(5.25 * 7.5))
    assert_stats(compare_arrays(a, b), want)
    assert compare_arrays(a, b, atol=0.5).equal
    assert compare_arrays(a, a.copy()) == stats(True, 4, 0, 0.0, 0.0, 1.0)


def test_int64_extremes_no_overflow():
    a = np.array([I64.min, 7], np.int64)
    b = np.array([I64.max, 7], np.int64)
    want = stats(False, 2, 1, float(U64_MAX), float(U64_MAX) / float(I64.max), None)
    r = compare_arrays(a, b)
    assert (r.mismatched, r.max_abs_diff, r.max_rel_diff) == (1, want.max_abs_diff, want.max_rel_diff)
    assert r.cosine == pytest.approx(-1.0)
    assert compare_arrays(b, a).max_abs_diff == float(U64_MAX)


def test_int64_exact_beyond_float64_precision():
    big = 1 << 53
    r = compare_arrays(np.array([big + 1], np.int64), np.array([big], np.int64))
    assert (r.equal, r.mismatched, r.max_abs_diff) == (False, 1, 1.0)
    r = compare_arrays(np.array([big + 1], np.int64), np.array([big], np.int64), atol=1.0)
    assert r.equal


def test_uint64():
    a = np.array([U64_MAX, 5, U64_MAX], np.uint64)
    b = np.array([0, 5, U64_MAX - 1], np.uint64)
    r = compare_arrays(a, b)
    assert (r.mismatched, r.max_abs_diff, r.max_rel_diff) == (2, float(U64_MAX), INF)
    r = compare_arrays(a[2:], b[2:])  # exact: float64 cannot tell these apart
    assert (r.mismatched, r.max_abs_diff) == (1, 1.0)
    assert compare_arrays(a, a.copy()) == stats(True, 3, 0, 0.0, 0.0, 1.0)


def test_uint64_against_smaller_unsigned():
    r = compare_arrays(np.array([U64_MAX, 3], np.uint64), np.array([255, 3], np.uint8))
    assert (r.mismatched, r.max_abs_diff) == (1, float(U64_MAX - 255))


def test_signed_against_uint64():
    a = np.array([-1, 3, I64.min], np.int64)
    b = np.array([U64_MAX, 3, 0], np.uint64)
    r = compare_arrays(a, b)
    assert r.mismatched == 2
    assert r.max_abs_diff == float(1 << 64)
    assert r.max_rel_diff == INF
    assert compare_arrays(np.array([5], np.int32), np.array([5], np.uint64)).equal


def test_small_integers_and_mixed_int_widths():
    a = np.array([-128, 127, 0], np.int8)
    b = np.array([127, -128, 0], np.int8)
    r = compare_arrays(a, b)
    assert (r.mismatched, r.max_abs_diff, r.max_rel_diff) == (2, 255.0, 255.0 / 127.0)
    assert compare_arrays(np.array([70000], np.int32), np.array([70000], np.int64)).equal
    r = compare_arrays(np.array([1, 2], np.uint16), np.array([1, 2], np.int8))
    assert r == stats(True, 2, 0, 0.0, 0.0, 1.0)


def test_integer_tolerance():
    a = np.array([10, 20], np.int32)
    b = np.array([12, 20], np.int32)
    assert compare_arrays(a, b, atol=2).equal
    assert not compare_arrays(a, b, atol=1.5).equal
    assert compare_arrays(a, b, rtol=1 / 6).equal  # 2 <= 12 / 6


def test_bool():
    a = np.array([True, False, True, False])
    b = np.array([True, True, False, False])
    assert compare_arrays(a, b) == stats(False, 4, 2, 1.0, INF, 0.5)
    assert compare_arrays(a, a.copy()) == stats(True, 4, 0, 0.0, 0.0, 1.0)
    assert compare_arrays(np.zeros(3, bool), np.zeros(3, bool)).cosine is None
    assert compare_arrays(a, a.astype(np.float32)).equal  # bool as 0/1


def test_mixed_float32_bfloat16():
    a = np.array([1.0, 3.0078125, -2.0], np.float32)
    b = np.array([1.0, 3.0, -2.0], ml_dtypes.bfloat16)
    r = compare_arrays(a, b)
    assert (r.mismatched, r.max_abs_diff, r.max_rel_diff) == (1, 0.0078125, 0.0078125 / 3.0)
    assert compare_arrays(a, b, atol=0.0078125).equal
    assert compare_arrays(b, b.astype(np.float32)).equal


def test_int_against_float():
    r = compare_arrays(np.array([1, 2, 3], np.int64), f64(1.0, 2.5, 3.0))
    assert (r.mismatched, r.max_abs_diff, r.max_rel_diff) == (1, 0.5, 0.2)


def test_complex():
    a = np.array([1 + 2j, 3j], np.complex64)
    b = np.array([1 + 2j, 3.5j], np.complex64)
    want = stats(False, 2, 1, 0.5, 0.5 / 3.5, 15.5 / math.sqrt(14 * 17.25))
    assert_stats(compare_arrays(a, b), want)
    assert compare_arrays(a, b, atol=0.5).equal
    assert compare_arrays(a, a.copy()) == stats(True, 2, 0, 0.0, 0.0, 1.0)
    r = compare_arrays(np.array([complex(-0.0, 1)]), np.array([complex(0.0, 1)]))
    assert r.mismatched == 1


# ------------------------------------------------------------- cosine numerics


def test_cosine_rescales_huge_and_tiny_float64():
    want = 3 / math.sqrt(10)
    assert compare_arrays(f64(1e300, 1e300), f64(1e300, 2e300)).cosine == pytest.approx(want)
    assert compare_arrays(f64(1e-300, 1e-300), f64(1e-300, 2e-300)).cosine == pytest.approx(want)
    assert compare_arrays(f64(1e300, INF), f64(1e300, INF)).cosine == 1.0
    assert compare_arrays(f64(1e-300, 5e-324), f64(1e-300, 5e-324)).cosine == 1.0


def test_cosine_rescales_after_an_identical_overflowing_block():
    a, b = f64(1e300, 0.0), f64(1e300, 1e300)
    for chunk in (1, 2):  # identical first block whose squares overflow, then a difference
        r = compare_arrays(a, b, chunk_elems=chunk)
        assert (r.mismatched, r.max_abs_diff, r.max_rel_diff) == (1, 1e300, 1.0)
        assert r.cosine == pytest.approx(1 / math.sqrt(2))


def test_cosine_within_unit_interval():
    a = np.full(1000, 0.1, np.float32)
    b = a.copy()
    b[0] = np.nextafter(b[0], np.float32(1))
    r = compare_arrays(a, b)
    assert r.mismatched == 1 and 0.999999 < r.cosine <= 1.0


# -------------------------------------------------------------------- to_dict


def test_to_dict_is_valid_json():
    r = compare_arrays(f64(NAN, 1.0), f64(1.0, 1.0))
    d = r.to_dict()
    assert d == {
        "equal": False,
        "numel": 2,
        "mismatched": 1,
        "max_abs_diff": "Infinity",
        "max_rel_diff": "Infinity",
        "cosine": None,  # a NaN appeared: no cosine beside rel_l2 = inf
        "rel_l2": "Infinity",
    }
    json.loads(json.dumps(d, allow_nan=False))
    assert TensorStats(True, 0, 0, 0.0, NAN, None).to_dict()["max_rel_diff"] == "NaN"
    assert TensorStats(True, 0, 0, -INF, 0.0, None).to_dict()["max_abs_diff"] == "-Infinity"
    assert TensorStats(True, 0, 0, 0.0, 0.0, None).to_dict()["rel_l2"] is None  # not computed


# ------------------------------------------------------------------ chunking


def _sample(rng, n, dtype):
    a = rng.standard_normal(n).astype(dtype)
    b = a.copy()
    idx = rng.choice(n, size=max(1, n // 50), replace=False)
    b[idx] = (b[idx].astype(np.float64) * 1.5 + 0.25).astype(dtype)
    if np.dtype(dtype).kind == "f":
        a[idx[:1]] = np.nan
        b[idx[:1]] = np.nan
        b[-1] = -0.0
        a[-1] = 0.0
    return a, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("atol", [0.0, 1e-3])
def test_chunked_equals_unchunked(dtype, atol):
    rng = np.random.default_rng(1)
    a, b = _sample(rng, 503, dtype)
    whole = compare_arrays(a, b, atol=atol)
    assert whole.mismatched > 0
    for chunk in (1, 7, 64, 500):
        assert_stats(compare_arrays(a, b, atol=atol, chunk_elems=chunk), whole, cos_tol=1e-9)


def test_block_phases_with_small_cpu_blocks():
    """Identical prefix, raw-equal blocks, split blocks, trailing partial blocks."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal(1000).astype(np.float32)
    ref_cases = []
    for positions in ([0], [999], [500], [3, 400, 401, 998], []):
        b = a.copy()
        b[positions] += 1
        ref_cases.append((b, compare_arrays(a, b)))  # default sizes: one block
    with _small_cpu_blocks(64, 5):
        for b, want in ref_cases:
            assert_stats(compare_arrays(a, b), want, cos_tol=1e-9)
            assert_stats(compare_arrays(a.astype(np.float64), b), want, cos_tol=1e-9)


def test_larger_than_one_block():
    n = 600_000  # several raw-compare blocks at default sizes
    a = np.linspace(-1, 1, n, dtype=np.float32)
    b = a.copy()
    b[n - 2] = 5.0
    r = compare_arrays(a, b)
    assert (r.mismatched, r.max_abs_diff) == (1, 5.0 - float(a[n - 2]))
    assert compare_arrays(a, a.copy()).equal


# ------------------------------------------------------------------ hypothesis


def reference(a, b, atol, rtol):
    """Straightforward per-element float64 reference of the documented semantics."""
    exact = atol == 0 and rtol == 0
    mism, mabs, mrel = 0, 0.0, 0.0
    prods, sa, sb = [], [], []
    for x, y in zip(a.astype(np.float64).ravel().tolist(), b.astype(np.float64).ravel().tolist(), strict=True):
        both_nan = math.isnan(x) and math.isnan(y)
        fin = math.isfinite(x) and math.isfinite(y)
        if exact:
            ok = both_nan or (x == y and math.copysign(1, x) == math.copysign(1, y))
        else:
            ok = both_nan or x == y or (fin and abs(x - y) <= atol + rtol * abs(y))
        mism += not ok
        if fin:
            d = abs(x - y)
            mabs = max(mabs, d)
            mrel = max(mrel, 0.0 if d == 0 else (d / abs(y) if y != 0 else INF))
            prods.append(x * y)
            sa.append(x * x)
            sb.append(y * y)
        elif not ok:
            mabs = mrel = INF
    na, nb = math.fsum(sa), math.fsum(sb)
    cos = None if na == 0 or nb == 0 else math.fsum(prods) / math.sqrt(na * nb)
    if mabs == INF:  # unbounded: no cosine beside rel_l2 = inf
        cos = None
    return TensorStats(mism == 0, a.size, mism, mabs, mrel, cos)


special = st.sampled_from([0.0, -0.0, NAN, INF, -INF, 1.0, -1.0, 0.5])
values = st.one_of(special, st.floats(-1e6, 1e6, allow_nan=False, width=32))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pairs=st.lists(st.tuples(values, values, st.booleans()), min_size=1, max_size=40),
    dtype=st.sampled_from([np.float64, np.float32, np.float16, ml_dtypes.bfloat16]),
    tol=st.sampled_from([(0.0, 0.0), (0.5, 0.0), (0.0, 0.125), (1e-3, 1e-2)]),
    chunk=st.integers(1, 9),
)
def test_hypothesis_against_reference(pairs, dtype, tol, chunk):
    with np.errstate(over="ignore"):  # large values become inf in float16
        a = np.array([p[0] for p in pairs], np.float64).astype(dtype)
        b = np.array([p[0] if p[2] else p[1] for p in pairs], np.float64).astype(dtype)
    atol, rtol = tol
    want = reference(a, b, atol, rtol)
    whole = compare_arrays(a, b, atol=atol, rtol=rtol)
    assert_stats(whole, want, cos_tol=1e-9)
    chunked = compare_arrays(a, b, atol=atol, rtol=rtol, chunk_elems=chunk)
    assert_stats(chunked, whole, cos_tol=1e-9)
    with _small_cpu_blocks(16, 3):
        assert_stats(compare_arrays(a, b, atol=atol, rtol=rtol), whole, cos_tol=1e-9)
    p1, p2, p3 = _kernel_patch(chunk, 2)  # float-kernel blocks of 1..9 elements on 2 threads
    with p1, p2, p3:
        assert_stats(compare_arrays(a, b, atol=atol, rtol=rtol), want, cos_tol=1e-9)


# ------------------------------------------------------------ float kernel (CPU)


def _kernel_patch(size: int, workers: int):
    """Small float-kernel blocks, spread over ``workers`` threads even for few blocks (the
    default tuning, which is detected at call time)."""
    return (
        mock.patch.object(fk, "_FAST_ELEMS", size),
        mock.patch.object(fk, "_PARALLEL_MIN_BLOCKS", 1),
        mock.patch.object(Tuning, "detect", classmethod(lambda cls: cls(workers=workers))),
    )


def _fine_tune(n: int, dtype, specials: bool, seed: int = 5):
    """b = a + small noise everywhere (some elements identical), with tolerance edges,
    zero quotients and, optionally, NaN / inf / signed zeros at kernel-block boundaries."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n)
    b = a + 1e-3 * rng.standard_normal(n)
    b[::7] = a[::7]
    a[10:13] = b[10:13] = 0.0  # 0 / 0 quotients, equal
    a[13], b[13] = 0.5, 0.0  # |b| == 0 with a difference: max_rel inf
    a[4], b[4] = 1.25, 1.0  # atol 0.25 edge: within (last element of block 0 at size 5)
    a[5], b[5] = 1.2578125, 1.0  # just above (first element of block 1)
    if specials:
        a[20] = b[20] = np.nan  # NaN pair: equal
        a[24], b[24] = np.inf, np.inf  # block boundary at size 5: inf pair, equal
        a[25], b[25] = -0.0, 0.0  # signed zero, first of a block
        a[40], b[40] = np.inf, 1.0  # unbounded difference
        a[51], b[51] = 3.0, np.nan
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("tol", [(0.0, 0.0), (0.25, 0.0), (1e-3, 1e-2), (0.0, 0.125)])
@pytest.mark.parametrize("specials", [False, True])
@pytest.mark.parametrize("size", [5, 64, 1 << 16])
def test_float_kernel_against_reference(dtype, tol, specials, size):
    a, b = _fine_tune(203, dtype, specials)
    atol, rtol = tol
    want = reference(a, b, atol, rtol)
    p1, p2, p3 = _kernel_patch(size, 3)
    with p1, p2, p3:
        assert_stats(compare_arrays(a, b, atol=atol, rtol=rtol), want, cos_tol=1e-9)
        # mixed dtypes: no raw-bytes shortcut, the kernel on every block
        assert_stats(compare_arrays(a, b.astype(np.float64), atol=atol, rtol=rtol), want, cos_tol=1e-9)
        got = compare_arrays(a, b, atol=atol, rtol=rtol, chunk_elems=3)  # blocks of 3
        assert_stats(got, want, cos_tol=1e-9)
    if tol == (0.25, 0.0):
        assert not want.equal and want.mismatched >= 1  # the edge pair 5 is out, 4 is in


def test_float_kernel_huge_finite_values_take_the_general_path():
    a = np.array([1e200, 2.0, 3.0, -1e300, 5.0, 6.0, 7.0, 8.0])
    b = np.array([1e200, 2.5, 3.0, 1e300, 5.0, 6.0, 7.0, 9.0])
    p1, p2, p3 = _kernel_patch(3, 2)
    with p1, p2, p3:
        got = compare_arrays(a, b)
        scaled = compare_arrays(a / 1e300, b / 1e300)  # the same cosine, no overflow
    assert (got.mismatched, got.max_abs_diff, got.max_rel_diff) == (3, 2e300, 2.0)
    assert got.cosine == pytest.approx(scaled.cosine, rel=1e-12) and got.cosine < 0


def test_float_kernel_all_zero_quotients_leave_max_rel_zero():
    a = np.array([0.0, 0.0, -0.0, 0.0, 1.0, 1.0], np.float32)
    b = np.array([0.0, 0.0, 0.0, -0.0, 1.0, 1.0], np.float32)
    p1, p2, p3 = _kernel_patch(4, 2)
    with p1, p2, p3:
        r = compare_arrays(a, b)
        assert r == stats(False, 6, 2, 0.0, 0.0, 1.0)  # signed zeros only
        r = compare_arrays(a, b, atol=1e-9)
        assert r == stats(True, 6, 0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("specials", [False, True])
def test_float_kernel_results_do_not_depend_on_threads(specials):
    a, b = _fine_tune(5000, np.float32, specials)
    got = []
    for workers in (1, 2, 4):
        p1, p2, p3 = _kernel_patch(64, workers)
        with p1, p2, p3:
            got.append((compare_arrays(a, b), compare_arrays(a, b, atol=1e-4)))
    assert got[0] == got[1] == got[2]  # bit for bit, cosine included


def test_float_kernel_propagates_worker_errors():
    a, b = _fine_tune(300, np.float32, False)
    calls = []
    real = fk._FloatKernel._blocks  # one work item: a block, or a group for the fused pass

    def boom(self, x, y):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("boom")
        return real(self, x, y)

    p1, p2, p3 = _kernel_patch(8, 2)
    with p1, p2, p3, mock.patch.object(fk._FloatKernel, "_blocks", boom), pytest.raises(MemoryError):
        compare_arrays(a, b)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int32, np.complex64])
@pytest.mark.parametrize("tol", [(0.0, 0.0), (1e-3, 1e-2)])
def test_pair_stream_in_pieces_equals_one_call(dtype, tol):
    rng = np.random.default_rng(9)
    if np.dtype(dtype).kind == "c":
        a = (rng.standard_normal(301) + 1j * rng.standard_normal(301)).astype(dtype)
        b = a + (1e-3 * rng.standard_normal(301)).astype(dtype)
    elif np.dtype(dtype).kind == "i":
        a = rng.integers(-100, 100, 301).astype(dtype)
        b = a + rng.integers(-1, 2, 301).astype(dtype)
    else:
        a, b = _fine_tune(301, dtype, True)
    atol, rtol = tol
    whole = compare_arrays(a, b, atol=atol, rtol=rtol)
    p1, p2, p3 = _kernel_patch(16, 2)
    with p1, p2, p3:
        s = ce.PairStream(a.dtype, b.dtype, atol=atol, rtol=rtol)
        for i, j in ((0, 1), (1, 100), (100, 100), (100, 301)):
            s.add(a[i:j], b[i:j])
    assert (s.mismatched, s.max_abs_diff, s.max_rel_diff) == (
        whole.mismatched,
        whole.max_abs_diff,
        whole.max_rel_diff,
    )
    cos = sm._cosine(*s.sums)  # the sums cover the finite positions
    if whole.norm_diff == INF:
        assert whole.cosine is None  # unbounded: no cosine in the statistics
    else:
        assert (cos is None) == (whole.cosine is None)
    if cos is not None and whole.cosine is not None:
        assert cos == pytest.approx(whole.cosine, rel=1e-12)
    with pytest.raises(SurgeryError, match="shape"):
        s.add(a[:3], b[:2])


ints = st.integers(I64.min, I64.max)


@settings(max_examples=100, deadline=None)
@given(pairs=st.lists(st.tuples(ints, ints, st.booleans()), min_size=1, max_size=30), chunk=st.integers(1, 8))
def test_hypothesis_int64_exact(pairs, chunk):
    xs = [p[0] for p in pairs]
    ys = [p[0] if p[2] else p[1] for p in pairs]
    r = compare_arrays(np.array(xs, np.int64), np.array(ys, np.int64), chunk_elems=chunk)
    diffs = [abs(x - y) for x, y in zip(xs, ys, strict=True)]
    assert r.mismatched == sum(d != 0 for d in diffs)
    assert r.max_abs_diff == float(max(diffs))  # exact integer, rounded once
    assert r.equal == (xs == ys)


int_dtypes = st.sampled_from([np.int8, np.int32, np.int64, np.uint8, np.uint16, np.uint64, np.bool_])


@settings(max_examples=150, deadline=None)
@given(data=st.data(), dta=int_dtypes, dtb=int_dtypes, chunk=st.integers(1, 6))
def test_hypothesis_mixed_integer_dtypes(data, dta, dtb, chunk):
    def values(dt):
        if dt is np.bool_:
            return st.booleans()
        info = np.iinfo(dt)
        return st.integers(int(info.min), int(info.max))

    n = data.draw(st.integers(1, 12))
    xs = data.draw(st.lists(values(dta), min_size=n, max_size=n))
    ys = data.draw(st.lists(values(dtb), min_size=n, max_size=n))
    r = compare_arrays(np.array(xs, dta), np.array(ys, dtb), chunk_elems=chunk)
    diffs = [abs(int(x) - int(y)) for x, y in zip(xs, ys, strict=True)]
    assert r.mismatched == sum(d != 0 for d in diffs)
    # exact, except a negative value against uint64 (difference taken in float64)
    assert r.max_abs_diff == pytest.approx(float(max(diffs)), rel=1e-15)
    if not ({dta, dtb} >= {np.uint64} and min(map(int, xs + ys)) < 0):
        assert r.max_abs_diff == float(max(diffs))
    rels = [0.0 if d == 0 else (d / abs(int(y)) if y != 0 else INF) for d, y in zip(diffs, ys, strict=True)]
    assert r.max_rel_diff == pytest.approx(max(rels), rel=1e-15)


# ---------------------------------------------------------------------- torch


@pytest.fixture(params=["via-numpy", "torch-namespace"])
def torch_path(request):
    """CPU tensors are compared through numpy views by default; also run the torch
    namespace itself on CPU (the code path CUDA tensors take)."""
    with mock.patch.object(bk, "_TORCH_CPU_VIA_NUMPY", request.param == "via-numpy"):
        yield request.param


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_torch_matches_numpy_float(dtype, torch_path):
    src = f64(1.0, 2.0, NAN, -0.5, 0.0, INF, 3.0)
    oth = f64(1.0, 2.5, NAN, -0.5, -0.0, INF, -3.0)
    if dtype.startswith("float8_e4m3"):
        src[5] = oth[5] = 448.0  # no inf in e4m3fn
    ta = torch.tensor(src).to(getattr(torch, dtype))
    tb = torch.tensor(oth).to(getattr(torch, dtype))
    np_dtype = getattr(ml_dtypes, dtype) if dtype in ("bfloat16",) or "float8" in dtype else dtype
    na, nb = src.astype(np_dtype), oth.astype(np_dtype)
    for tol in ({}, {"atol": 0.5}, {"rtol": 0.25}):
        want = compare_arrays(na, nb, **tol)
        assert compare_arrays(ta, tb, **tol) == want
        assert compare_arrays(ta, tb, chunk_elems=3, **tol) == want
        assert compare_arrays(na, tb, **tol) == want  # numpy against torch


@needs_torch
def test_torch_integers_and_bool(torch_path):
    a = torch.tensor([I64.min, 7, 0], dtype=torch.int64)
    b = torch.tensor([I64.max, 7, 0], dtype=torch.int64)
    assert compare_arrays(a, b) == compare_arrays(a.numpy(), b.numpy())
    assert compare_arrays(a, b).max_abs_diff == float(U64_MAX)
    ua = torch.tensor([U64_MAX, 5, U64_MAX], dtype=torch.uint64)
    ub = torch.tensor([0, 5, U64_MAX - 1], dtype=torch.uint64)
    r = compare_arrays(ua, ub)
    assert (r.mismatched, r.max_abs_diff, r.max_rel_diff) == (2, float(U64_MAX), INF)
    assert compare_arrays(ua, ua.clone()).equal
    x = torch.tensor([True, False, True, False])
    y = torch.tensor([True, True, False, False])
    assert compare_arrays(x, y) == stats(False, 4, 2, 1.0, INF, 0.5)
    assert compare_arrays(torch.tensor([3], dtype=torch.int8), torch.tensor([3.0])).equal
    for dt in (torch.uint8, torch.uint16, torch.uint32, torch.int16):
        r = compare_arrays(torch.tensor([1, 200], dtype=dt), torch.tensor([1, 100], dtype=dt))
        assert (r.mismatched, r.max_abs_diff, r.max_rel_diff) == (1, 100.0, 1.0)


@needs_torch
def test_torch_scalars_empty_grad_and_views(torch_path):
    assert compare_arrays(torch.tensor(2.0), torch.tensor(3.0)) == stats(False, 1, 1, 1.0, 1 / 3, 1.0)
    e = torch.zeros(0, 4)
    assert compare_arrays(e, e) == stats(True, 0, 0, 0.0, 0.0, None)
    w = torch.randn(5, 6, requires_grad=True)
    assert compare_arrays(w, w.detach().clone()).equal
    t = torch.arange(40.0).reshape(5, 8)
    u = t.clone()
    u[4, 1] = -1.0
    assert compare_arrays(t.T, u.T, chunk_elems=4) == compare_arrays(t.T.numpy(), u.T.numpy())
    assert compare_arrays(t[:, ::2], u[:, ::2]) == compare_arrays(t.numpy()[:, ::2], u.numpy()[:, ::2])
    with pytest.raises(SurgeryError):
        compare_arrays(t, t.T)
    neg = torch.arange(4.0)._neg_view()  # lazy negation bit, resolved on the way
    assert compare_arrays(neg, -torch.arange(4.0)).equal
    cj = torch.tensor([1 + 1j, 2 - 1j]).conj()
    assert compare_arrays(cj, torch.tensor([1 - 1j, 2 + 1j])).equal


@needs_torch
def test_torch_mixed_and_complex(torch_path):
    a = torch.tensor([1.0, 3.0078125, -2.0])
    b = torch.tensor([1.0, 3.0, -2.0], dtype=torch.bfloat16)
    assert compare_arrays(a, b) == compare_arrays(a.numpy(), b.float().numpy())
    c = torch.tensor([1 + 2j, 3j], dtype=torch.complex64)
    d = torch.tensor([1 + 2j, 3.5j], dtype=torch.complex64)
    assert compare_arrays(c, d) == compare_arrays(c.numpy(), d.numpy())


@needs_torch
def test_torch_chunked_random(torch_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g)
    b = a.clone()
    b[[3, 500, 999]] += 0.5
    whole = compare_arrays(a, b)
    with _small_cpu_blocks(64, 5):
        assert_stats(compare_arrays(a, b), whole, cos_tol=1e-9)
    assert_stats(compare_arrays(a.numpy(), b.numpy()), whole, cos_tol=1e-9)
    # accelerator-style blocks (exactly chunk_elems) on the torch namespace
    with mock.patch.object(bk._TorchBackend, "block_elems", lambda self, chunk, itemsize: (chunk, chunk)):
        for chunk in (7, 333, 1 << 24):
            assert_stats(compare_arrays(a, b, chunk_elems=chunk), whole, cos_tol=1e-9)
            assert_stats(
                compare_arrays(a.double(), b, chunk_elems=chunk, atol=0.1),
                compare_arrays(a.double(), b, atol=0.1),
                cos_tol=1e-9,
            )
            assert compare_arrays((a * 8).to(torch.int64), (b * 8).to(torch.int64), chunk_elems=chunk).mismatched == 3
            assert compare_arrays(a, a.clone(), chunk_elems=chunk) == stats(True, 1000, 0, 0.0, 0.0, 1.0)


@pytest.mark.cuda
@needs_cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, generator=g)
    b = a.clone()
    b[[0, 1234, 2999]] += 0.25
    b[7] = float("nan")
    a[7] = float("nan")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        x, y = a.to(dtype), b.to(dtype)
        for tol in ({}, {"atol": 1e-2}):
            want = compare_arrays(x, y, **tol)
            got = compare_arrays(x.cuda(), y.cuda(), chunk_elems=1000, **tol)
            assert_stats(got, want, cos_tol=1e-9)
            assert_stats(compare_arrays(x.cuda(), y, **tol), want, cos_tol=1e-9)  # mixed devices
    assert compare_arrays(to_device(a.numpy(), "cuda"), a.cuda()).equal


# ------------------------------------------------------------ numpy_view, to_device


def test_numpy_view_zero_copy():
    buf = bytearray(np.array([1.0, 2.0, 3.0, 4.0], "<f4").tobytes())
    v = numpy_view(memoryview(buf), "float32", (2, 2))
    assert v.shape == (2, 2) and v.dtype == np.float32
    assert v.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    buf[0:4] = np.array([9.0], "<f4").tobytes()
    assert v[0, 0] == 9.0  # a view, not a copy
    ro = numpy_view(bytes(buf), "F32", [4])  # safetensors codes work too
    assert not ro.flags.writeable


@pytest.mark.parametrize(
    "name, values",
    [
        ("bfloat16", [1.0, -2.5, 3.015625]),
        ("float8_e4m3fn", [1.0, -2.5, 448.0]),
        ("float8_e5m2", [1.0, -2.5, 57344.0]),
        ("float16", [1.0, -2.5, 65504.0]),
        ("int64", [I64.min, 0, I64.max]),
        ("uint64", [0, 1, U64_MAX]),
        ("bool", [True, False, True]),
        ("int8", [-128, 0, 127]),
    ],
)
def test_numpy_view_dtypes(name, values):
    np_dtype = getattr(ml_dtypes, name) if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2") else name
    raw = np.array(values, dtype=np_dtype).tobytes()
    v = numpy_view(raw, name, (3,))
    assert v.tolist() == np.array(values, dtype=np_dtype).tolist()
    assert compare_arrays(v, np.array(values, dtype=np_dtype)).equal


@needs_torch
def test_numpy_view_reads_torch_bytes():
    t = torch.tensor([[1.0, -2.0], [0.5, 3.015625]], dtype=torch.bfloat16)
    raw = t.view(torch.int16).numpy().tobytes()
    v = numpy_view(raw, "bfloat16", [2, 2])
    assert compare_arrays(v, t).equal


def test_numpy_view_errors():
    with pytest.raises(InputError):
        numpy_view(b"\x00" * 7, "float32", (2,))
    with pytest.raises(InputError):
        numpy_view(b"\x00" * 8, "float32", (1,))
    with pytest.raises(InputError):
        numpy_view(b"", "float12", (0,))
    e = numpy_view(b"", "float32", (0, 3))
    assert e.shape == (0, 3)


def test_to_device_numpy_cpu_unchanged():
    a = np.arange(3.0)
    assert to_device(a, None) is a
    assert to_device(a, "cpu") is a


@needs_torch
def test_to_device_torch():
    t = torch.arange(3.0)
    assert to_device(t, None) is t
    assert to_device(t, "cpu").device.type == "cpu"
    m = to_device(np.array([1.0, 2.0], ml_dtypes.bfloat16), "meta")  # via torch, no data
    assert m.device.type == "meta" and m.dtype == torch.bfloat16 and tuple(m.shape) == (2,)


# -------------------------------------------------------------------- imports


def test_numpy_path_never_imports_torch():
    code = """
import sys
import numpy as np, ml_dtypes
import wsurgery.compare
import wsurgery.compare.kernel as ce
from wsurgery.compare.arrays import to_device
from wsurgery.numpy_apply import numpy_view
assert "torch" not in sys.modules, "import"
a = np.arange(10, dtype=np.float32)
b = a.copy(); b[3] = 7
ce.compare_arrays(a, b); ce.compare_arrays(a, a); ce.compare_arrays(a, b, atol=0.1)
ce.compare_arrays(a.astype(ml_dtypes.bfloat16), b)
ce.compare_arrays(np.array([1, 2], np.uint64), np.array([1, 3], np.int64))
to_device(a, "cpu"); to_device(a, None)
numpy_view(a.tobytes(), "float32", (10,)).sum()
ce.compare_arrays(a, b).to_dict()
assert "torch" not in sys.modules, "compare"
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_parallel_map_keeps_order_and_raises_worker_errors(workers):
    assert ce.parallel_map(lambda k: k * k, 50, workers=workers) == [k * k for k in range(50)]
    assert ce.parallel_map(lambda k: k, 0, workers=workers) == []

    def fail_at_17(k):
        if k == 17:
            raise ValueError("item 17")
        return k

    with pytest.raises(ValueError, match="item 17"):
        ce.parallel_map(fail_at_17, 50, workers=workers)


# ---------------------------------------------------------------------------- tuning


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_tuning_rejects_bad_worker_counts(workers):
    with pytest.raises(UsageError) as e:
        Tuning(workers=workers)
    assert e.value.param == "tuning"


def test_default_tuning_is_detected_at_call_time(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert Tuning.detect() == Tuning(workers=3)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert Tuning.detect() == Tuning(workers=4)  # memory bandwidth is the limit beyond
    with pytest.raises(UsageError) as e:
        compare_arrays(f64(1.0), f64(1.0), tuning=4)
    assert e.value.param == "tuning"


@pytest.mark.parametrize("n", [1, 8191, 8192, 8193, 3 * 8192, 65536, 65536 + 17, 200_001])
@pytest.mark.parametrize("one_call", [True, False])
def test_dot_products_never_depend_on_the_blas_thread_setting(n, one_call, monkeypatch):
    """Every float64 dot product is one BLAS call held on one BLAS thread (where
    threadpoolctl can hold it), or else the in-order sum of BLAS dots over 8 Ki pieces:
    the same numbers whatever the length of the array or of the kernel block, and
    whatever threads BLAS was set to outside the compare."""
    from threadpoolctl import threadpool_limits

    if one_call and not ce.ONE_THREAD_BLAS.usable:
        pytest.skip("threadpoolctl cannot set this BLAS's threads")
    monkeypatch.setattr(ce.ONE_THREAD_BLAS, "_usable", one_call)
    rng = np.random.default_rng(n)
    x, y = rng.standard_normal(n), rng.standard_normal(n)
    if one_call:
        with threadpool_limits(limits=1, user_api="blas"):
            want = float(np.dot(x, y))
    else:
        want = 0.0
        for i in range(0, n, th._DOT_PIECE):
            want += float(np.dot(x[i : i + th._DOT_PIECE], y[i : i + th._DOT_PIECE]))
    for threads in (1, 2, 4):
        with threadpool_limits(limits=threads, user_api="blas"):
            assert th._float64_dot(x, y) == want
            cmp = bk._Cmp(np, bk._NumpyBackend(np, "cpu"), "float", "float64", "float64", 0.0, 0.0)
            kernel = fk._FloatKernel(cmp, np.float64, np.float64, n)
            kernel.A[:], kernel.B[:] = x, y
            assert kernel._dot(n, 0, 1) == want
            assert kernel._dot(n, 1, 1) == th._float64_dot(y, y)


def test_a_compare_holds_blas_on_one_thread_and_gives_the_setting_back():
    """Nested and concurrent compares share one hold: the first sets one thread, the last
    restores what the process had."""
    from threadpoolctl import threadpool_info, threadpool_limits

    if not ce.ONE_THREAD_BLAS.usable:
        pytest.skip("threadpoolctl cannot set this BLAS's threads")

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    with threadpool_limits(limits=3, user_api="blas"):
        assert blas_threads() == {3}
        with ce.ONE_THREAD_BLAS:
            assert blas_threads() == {1}
            with ce.ONE_THREAD_BLAS:
                assert blas_threads() == {1}
            assert blas_threads() == {1}
        assert blas_threads() == {3}
        seen = []
        ce.compare_arrays(np.arange(10.0), np.arange(10.0) + 1, tuning=ce.Tuning(2))
        seen.append(blas_threads())
        assert seen == [{3}]
    # another thread's share keeps the hold after this thread's compare ends
    before = blas_threads()
    entered, leave = threading.Event(), threading.Event()

    def other():
        with ce.ONE_THREAD_BLAS:
            entered.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert entered.wait(10)
    with ce.ONE_THREAD_BLAS:
        assert blas_threads() == {1}
    assert blas_threads() == {1} and not ce.ONE_THREAD_BLAS.held_here
    leave.set()
    t.join(10)
    assert blas_threads() == before


@pytest.mark.parametrize("blas_threads", [None, 1, 2, 4])
def test_the_statistics_do_not_depend_on_blas_threads_or_workers(blas_threads):
    """The float kernel's dot products on the worker threads too: the same cosine and
    rel_l2 bits for every tuning and every BLAS setting the caller made beforehand."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal(1_500_000)
    b = a + rng.standard_normal(a.shape[0]) * 1e-3
    want = ce.compare_arrays(a, b, tuning=ce.Tuning(1))
    with contextlib.ExitStack() as stack:
        if blas_threads is not None:
            stack.enter_context(threadpool_limits(limits=blas_threads, user_api="blas"))
        for workers in (1, 2, 3):
            got = ce.compare_arrays(a, b, tuning=ce.Tuning(workers))
            assert (got.cosine, got.rel_l2, got.max_abs_diff) == (want.cosine, want.rel_l2, want.max_abs_diff)
