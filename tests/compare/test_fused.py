"""The fused C pass of the float kernel (``wsurgery/compare/fused.py``, ``_fused.c``): every
statistic and every float64 sum is the numpy passes' to the bit, on every path it can take
(vector or portable loops, dot products from C or from numpy), and the library is built
and used wherever a C compiler is."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sysconfig
from unittest import mock

import ml_dtypes
import numpy as np
import pytest

from wsurgery.compare import Tuning, fused
from wsurgery.compare import backends as bk
from wsurgery.compare import float_kernel as fk
from wsurgery.compare import stats as sm
from wsurgery.compare import threads as th

F64 = np.float64
DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16, np.float64]
TOLERANCES = [(0.0, 0.0), (1e-3, 1e-2), (0.0, 0.125), (0.25, 0.0)]


def _compiler() -> str | None:
    for spec in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc"):
        argv = shlex.split(spec) if spec else []
        if argv and shutil.which(argv[0]):
            return argv[0]
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _openblas() -> bool:
    if not th.ONE_THREAD_BLAS.usable:
        return False
    from threadpoolctl import threadpool_info  # type: ignore[import-untyped]

    return any(info.get("internal_api") == "openblas" for info in threadpool_info())


def test_the_library_is_built_and_used_where_a_compiler_is():
    """A broken build hook must not fall back to numpy silently."""
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler: the install runs the numpy passes")
    lib = fused.library()
    assert lib is not None, f"{cc} is installed but {fused.library_path()} was not built or not loaded"
    if _openblas():  # numpy's pip wheels: the C loop takes the dot products too
        assert lib.blas_dot() is not None
    cmp = bk._Cmp(np, bk._NumpyBackend(np, "cpu"), "float", "float32", "float32", 0.0, 0.0)
    kernel = fk._FloatKernel(cmp, np.float32, np.float32, 1 << 16)
    assert (kernel._fused is not None) == lib.fast  # used where its loops are vectorized
    if platform.machine().lower() in ("x86_64", "amd64") and "avx2" in _cpu_flags():
        assert lib.fast


def test_the_switch_turns_the_pass_off(monkeypatch):
    monkeypatch.setenv(fused.DISABLE_ENV, "1")
    cmp = bk._Cmp(np, bk._NumpyBackend(np, "cpu"), "float", "float32", "float32", 0.0, 0.0)
    assert fk._FloatKernel(cmp, np.float32, np.float32, 64)._fused is None


def test_supported_dtypes():
    assert all(fused.supported(dt) for dt in DTYPES)
    for dt in (np.dtype(">f4"), np.int32, np.complex64, ml_dtypes.float8_e4m3fn, np.longdouble):
        assert not fused.supported(dt)


# ---------------------------------------------------------------------- inputs


def _edge(a: np.ndarray, b: np.ndarray, case: int, dtype) -> None:
    """Edge case number ``case`` written into one block (float64 views, cast later)."""
    tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal)
    wide = np.dtype(dtype) == np.dtype(F64)
    big = 1e154 if wide else 60000.0  # float64: squares still finite, or not (1e155)
    m = a.shape[0]
    case %= 13
    if case == 1:  # every pair 0 against -0: bytes differ, every quotient NaN
        a[:], b[:] = 0.0, -0.0
    elif case == 2:  # identical bytes
        b[:] = a
    elif case == 3:
        a[:2], b[:2] = (0.0, -0.0), (-0.0, 0.0)
    elif case == 4 and m >= 8:  # x / 0 (inf) and 0 / 0 (NaN)
        b[2], a[3], b[3] = 0.0, 0.0, 0.0
    elif case == 12 and m >= 8:  # the largest quotient, then 0 / 0 in every vector lane
        a[0], b[0] = 1.0, 2.0**-10
        a[4:8] = b[4:8] = 0.0
    elif case == 5:  # subnormals of the dtype
        a[:2], b[:2] = (tiny, 4 * tiny), (-tiny, tiny)
    elif case == 6:  # NaN: the general path
        a[-1] = np.nan
    elif case == 7:  # infinities: the general path
        a[0] = b[0] = np.inf
        b[-1] = -np.inf
    elif case == 8:
        a[0] = big
    elif case == 9:
        b[-1] = -10 * big if wide else -big
    elif case == 10 and wide:
        a[0], b[0] = 1e300, -1e300
    elif case == 11:  # tolerance edges
        a[:2], b[:2] = (1.25, 1.2578125), (1.0, 1.0)


def _pair(n: int, block: int, dtype, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``b = a + noise`` with edge case ``k`` in block ``k``; ``n`` may end in a partial block."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n)
    b = a + 1e-2 * rng.standard_normal(n)
    a[::5] = b[::5]  # some equal pairs in every block
    for k, i in enumerate(range(0, n, block)):
        _edge(a[i : i + block], b[i : i + block], k, dtype)
    with np.errstate(all="ignore"):
        return a.astype(dtype), b.astype(dtype)


def _bits(x) -> str:
    return float(x).hex() if isinstance(x, float) else repr(x)


def _everything(a, b, atol, rtol, workers) -> dict:
    """Every statistic, every accumulated sum and each block's own statistics, as bits."""
    blocks = []
    merge = sm._Acc.merge

    def record(acc, part):
        blocks.append({k: _bits(v) for k, v in vars(part).items()})
        merge(acc, part)

    with mock.patch.object(sm._Acc, "merge", record):
        stats, acc = fk._compare(a, b, atol, rtol, 1 << 24, workers)
    out = {f"stats.{k}": _bits(getattr(stats, k)) for k in stats.__dataclass_fields__}
    out.update({f"acc.{k}": _bits(v) for k, v in vars(acc).items()})
    out.update({f"block {i}": part for i, part in enumerate(blocks)})
    return out


PATHS = ["numpy", "fused", "fused, numpy dots", "portable"]


def _use(monkeypatch, path: str) -> None:
    """Force one of the kernel's ``PATHS``."""
    if path == "numpy":
        monkeypatch.setenv(fused.DISABLE_ENV, "1")
    else:
        monkeypatch.delenv(fused.DISABLE_ENV, raising=False)
    monkeypatch.setattr(fused, "BLAS_FROM_C", path != "fused, numpy dots")
    monkeypatch.setattr(fused, "FORCE_PORTABLE", path == "portable")


def _spy(monkeypatch) -> set:
    """Records (dot products from C, vector loops) of each block the fused pass gives."""
    seen: set = set()
    real = fk._FloatKernel._add_fused

    def spy(self, r, a, b, acc, *, sums):
        seen.add((sums, bool(r.vector)))
        return real(self, r, a, b, acc, sums=sums)

    monkeypatch.setattr(fk._FloatKernel, "_add_fused", spy)
    return seen


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("block", [7, 64, 1 << 16])
def test_every_path_gives_the_numpy_bits(dtype, block, monkeypatch):
    """Seeded pairs with an edge case per block, zero and non-zero tolerances, 1 and 2
    workers, whole and partial blocks: the fused pass equals the numpy passes to the bit."""
    lib = fused.library()
    if lib is None or not lib.fast:
        pytest.skip("the fused pass is not used here")
    n = {7: 14 * 7 + 1, 64: 13 * 64 + 33}.get(block, 3 * block + 777)  # partial last blocks, one of 1 element
    a, b = _pair(n, block, dtype, seed=block)
    monkeypatch.setattr(fk, "_FAST_ELEMS", block)
    monkeypatch.setattr(fk, "_PARALLEL_MIN_BLOCKS", 1)
    seen = _spy(monkeypatch)
    for atol, rtol in TOLERANCES:
        for workers in (1, 2):
            got = {}
            for path in PATHS:
                _use(monkeypatch, path)
                got[path] = _everything(a, b, atol, rtol, workers)
            want = got.pop("numpy")
            for path, bits in got.items():
                assert bits == want, (path, atol, rtol, workers)
    assert {vector for _, vector in seen} == {False, True}  # portable and vector loops ran
    assert (False, True) in seen  # dot products from numpy
    if lib.blas_dot() is not None:
        assert (True, True) in seen  # and from C


@pytest.mark.parametrize(
    "pair",
    [(np.float32, np.float64), (ml_dtypes.bfloat16, np.float32), (np.float16, ml_dtypes.bfloat16)],
    ids=lambda p: f"{np.dtype(p[0]).name}-{np.dtype(p[1]).name}",
)
def test_mixed_dtypes_give_the_numpy_bits(pair, monkeypatch):
    """Pairs of two dtypes: equality is of the float64 values (no raw-bytes shortcut)."""
    if fused.library() is None or not fused.library().fast:
        pytest.skip("the fused pass is not used here")
    block = 64
    a, _ = _pair(9 * block + 5, block, pair[0], seed=3)
    _, b = _pair(9 * block + 5, block, pair[1], seed=3)
    monkeypatch.setattr(fk, "_FAST_ELEMS", block)
    for atol, rtol in TOLERANCES[:2]:
        for workers in (1, 2):
            _use(monkeypatch, "numpy")
            want = _everything(a, b, atol, rtol, workers)
            for path in PATHS[1:]:
                _use(monkeypatch, path)
                assert _everything(a, b, atol, rtol, workers) == want, (path, atol, rtol, workers)


def test_every_half_precision_value_converts_exactly(monkeypatch):
    """All 65536 bit patterns of float16 and bfloat16 against float64 (NaNs aside, which
    take the general path): the portable and vector casts are numpy's."""
    lib = fused.library()
    if lib is None:
        pytest.skip("the fused pass is not built here")
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        with np.errstate(invalid="ignore"):  # the signalling NaNs' casts
            x = bits.view(dtype)[~np.isnan(bits.view(dtype).astype(F64))]
            want = x.astype(F64)
        A, B, D = np.empty(x.shape[0]), np.empty(x.shape[0]), np.empty(x.shape[0])
        for portable in (False, True):
            monkeypatch.setattr(fused, "FORCE_PORTABLE", portable)
            p = fused.FusedPass(lib, dtype, F64, A, B, D, 0.0, 0.0)
            (r,) = p(x, np.zeros(x.shape[0]))[:1]
            assert A.tobytes() == want.tobytes(), (np.dtype(dtype).name, portable)
            assert r.equal == 1  # +0 against +0, in float64 bits


def test_strided_pieces_take_the_numpy_passes():
    a = np.arange(40, dtype=np.float32)
    b = a + 0.5
    cmp = bk._Cmp(np, bk._NumpyBackend(np, "cpu"), "float", "float32", "float32", 0.0, 0.0)
    kernel = fk._FloatKernel(cmp, np.float32, np.float32, 8)
    acc = fk._Acc()
    kernel.run(a[::2], b[::2], acc)
    assert (acc.mismatched, acc.max_abs) == (20, 0.5)
    if kernel._fused is not None:
        assert kernel._numpy is not None and kernel._numpy._fused is None


def test_the_blas_dot_is_checked_against_numpy():
    """The dot products the C loop takes are np.dot's: one element (a product, as np.dot
    takes it), signed zeros, and long vectors."""
    lib = fused.library()
    if lib is None or lib.blas_dot() is None:
        pytest.skip("no C dot products here")
    address, flags = lib.blas_dot()
    rng = np.random.default_rng(4)
    with th.ONE_THREAD_BLAS:
        for n in (1, 2, 3, 100, 8193, 1 << 16):
            x = rng.standard_normal(n) * np.exp2(rng.integers(-60, 60, n))
            y = rng.standard_normal(n)
            assert lib.dot(address, flags, n, x.ctypes.data, y.ctypes.data).hex() == float(np.dot(x, y)).hex()
        z, o = np.array([-0.0]), np.array([1.0])
        got = lib.dot(address, flags, 1, z.ctypes.data, o.ctypes.data)
        assert got.hex() == float(np.dot(z, o)).hex() == "-0x0.0p+0"


def test_a_compare_through_the_public_api_uses_the_pass(monkeypatch):
    if fused.library() is None or not fused.library().fast:
        pytest.skip("the fused pass is not used here")
    from wsurgery.compare import compare_arrays

    seen = _spy(monkeypatch)
    a, b = _pair(5 * (1 << 16), 1 << 16, np.float32, seed=1)
    compare_arrays(a, b, tuning=Tuning(workers=2))
    assert seen
