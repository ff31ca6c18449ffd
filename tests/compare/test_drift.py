"""Drift statistics as a library: rel_l2 and the norms (exact, deterministic, defined at
the edges), the thresholds max_rel_l2 / min_cosine and how they combine with atol /
rtol, ignore_ties, module rollups, and live modules and state dicts as inputs."""

from __future__ import annotations

import inspect
import json
import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import wsurgery
from wsurgery.compare import backends as bk
from wsurgery.compare import compare_arrays, compare_tensors, diff
from wsurgery.compare import float_kernel as fk
from wsurgery.compare.criteria import Criteria
from wsurgery.compare.kernel import TensorStats, Tuning, l2_norm
from wsurgery.compare.rollup import auto_depth, module_of, total
from wsurgery.errors import UsageError

from ..compare.test_kernel import values as kernel_values
from ..compare.test_report import _patterns, small_chunks  # noqa: F401 - a fixture

INF, NAN = math.inf, math.nan
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def exact_rel_l2(a, b) -> float:
    """||a - b|| / ||a|| with exact rational sums (finite values only)."""
    xs = [Fraction(float(x)) for x in np.asarray(a, dtype=np.float64).ravel()]
    ys = [Fraction(float(y)) for y in np.asarray(b, dtype=np.float64).ravel()]
    dd = sum((x - y) ** 2 for x, y in zip(xs, ys, strict=True))
    na = sum(x * x for x in xs)
    if dd == 0:
        return 0.0
    return math.inf if na == 0 else math.sqrt(dd / na)


# ------------------------------------------------------------------------- rel_l2


def test_rel_l2_hand_computed():
    r = compare_arrays(np.array([3.0, 4.0]), np.array([3.0, 4.5]))
    assert r.rel_l2 == 0.1 and r.norm_a == 5.0 and r.norm_diff == 0.5
    assert r.norm_b == pytest.approx(math.hypot(3.0, 4.5), rel=1e-15)
    # relative to a, not b
    assert compare_arrays(np.array([3.0, 4.5]), np.array([3.0, 4.0])).rel_l2 == pytest.approx(0.5 / math.hypot(3, 4.5))


@pytest.mark.parametrize(
    "a, b, want",
    [
        ([1.0, 2.0], [1.0, 2.0], 0.0),  # equal
        ([0.0, 0.0], [0.0, 0.0], 0.0),  # equal zeros: 0, not nan
        ([0.0, 0.0], [0.0, 1.0], INF),  # ||a|| == 0 < ||a - b||
        ([-0.0, 1.0], [0.0, 1.0], 0.0),  # a mismatch at zero tolerance that moved nothing
        ([NAN, 1.0], [NAN, 1.0], 0.0),  # NaN against NaN is equal: no distance
        ([INF, 1.0], [INF, 1.0], 0.0),
        ([NAN, 1.0], [2.0, 1.0], INF),  # a mismatch with a non-finite side is unbounded
        ([INF, 1.0], [-INF, 1.0], INF),
        ([1.0, 1.0], [1.0, INF], INF),
    ],
)
def test_rel_l2_edge_cases(a, b, want):
    r = compare_arrays(np.array(a), np.array(b))
    assert r.rel_l2 == want
    assert compare_tensors(np.array(a), np.array(b)).rel_l2 == want  # the streamed path too


def reference_rel_l2(a, b) -> float:
    """The documented rel_l2, element by element in Python (exact sums: math.fsum)."""
    dd, na, unbounded = [], [], False
    for x, y in zip(a.astype(np.float64).tolist(), b.astype(np.float64).tolist(), strict=True):
        if math.isfinite(x) and math.isfinite(y):
            dd.append((x - y) ** 2)
            na.append(x * x)
        elif not (x == y or (math.isnan(x) and math.isnan(y))):
            unbounded = True
    d, n = math.fsum(dd), math.fsum(na)
    if unbounded:
        return INF
    return 0.0 if d == 0 else (INF if n == 0 else math.sqrt(d / n))


FLOATS = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16]
# pairs of the kernel's hypothesis test: special values and float32 numbers, some equal
PAIRS = st.lists(st.tuples(kernel_values, kernel_values, st.booleans()), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PAIRS, st.sampled_from(FLOATS))
def test_rel_l2_hypothesis_against_reference(pairs, dtype):
    with np.errstate(over="ignore"):  # large values become inf in float16
        x = np.array([p[0] for p in pairs], np.float64)
        a, b = x.astype(dtype), np.array([p[0] if p[2] else p[1] for p in pairs], np.float64).astype(dtype)
    want = reference_rel_l2(a, b)
    for got in (compare_arrays(a, b).rel_l2, compare_tensors(a, b).rel_l2, compare_arrays(a, b, chunk_elems=3).rel_l2):
        assert got == pytest.approx(want, rel=1e-12, abs=0) if math.isfinite(want) else got == want


def test_rel_l2_of_empty_and_identical_tensors():
    e = compare_arrays(np.zeros((0, 3)), np.zeros((0, 3)))
    assert (e.rel_l2, e.norm_a, e.norm_diff) == (0.0, 0.0, 0.0)
    x = np.arange(12, dtype=np.float32)
    same = compare_tensors(x, x.copy())
    assert (same.rel_l2, same.norm_diff, same.norm_a) == (0.0, 0.0, None)  # bit-identical: never summed


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16])
def test_rel_l2_is_exact_to_float64_rounding(dtype):
    rng = np.random.default_rng(1)
    a = rng.standard_normal(3000).astype(dtype)
    b = (a.astype(np.float64) + 1e-3 * rng.standard_normal(3000)).astype(dtype)
    want = exact_rel_l2(a, b)
    for r in (compare_arrays(a, b), compare_tensors(a, b), compare_arrays(a, b, chunk_elems=7)):
        assert r.rel_l2 == pytest.approx(want, rel=1e-13)


def test_signed_quotients_of_the_float_kernel_equal_the_general_path(monkeypatch):
    """At zero tolerance the float kernel takes max |a - b| from the signed extremes and
    |a - b| / |b| as |(a - b) / b|: the same values as the general path's."""
    rng = np.random.default_rng(9)
    a = rng.standard_normal(5000)
    b = -a * rng.uniform(0.5, 2.0, 5000)  # every sign, both ways
    b[::7] = 0.0
    b[1::7] = -0.0
    a[2::11] = b[2::11]  # some equal pairs: 0 / 0 and x / x
    a[3::13] = -0.0
    fast = compare_arrays(a, b)
    monkeypatch.setattr(fk._FloatKernel, "run", lambda self, x, y, acc: self.cmp.block(x, y, acc))
    general = compare_arrays(a, b)  # the array-API path of every other block
    assert (fast.max_abs_diff, fast.max_rel_diff, fast.mismatched) == (
        general.max_abs_diff,
        general.max_rel_diff,
        general.mismatched,
    )
    assert fast.max_rel_diff == INF  # b == 0 != a


def test_rel_l2_of_integers_is_exact():
    a = np.array([np.iinfo(np.int64).min, 0, 5], dtype=np.int64)
    b = np.array([np.iinfo(np.int64).max, 0, 7], dtype=np.int64)
    d = (2**64 - 1) ** 2 + 4
    assert compare_arrays(a, b).rel_l2 == pytest.approx(math.sqrt(d / (2**126 + 25)), rel=1e-15)
    u = compare_arrays(np.array([1, 2], np.uint8), np.array([3, 2], np.uint8))
    assert u.rel_l2 == pytest.approx(2 / math.sqrt(5), rel=1e-15)


def test_rel_l2_of_complex_tensors():
    a = np.array([1 + 1j, 2 - 1j])
    b = np.array([1 + 2j, 2 - 1j])
    assert compare_arrays(a, b).rel_l2 == pytest.approx(1 / math.sqrt(7), rel=1e-15)


@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e-160])
def test_rel_l2_is_rescaled_out_of_float64_range(scale):
    a = np.array([1.0, 2.0, -3.0]) * scale
    b = np.array([1.5, 2.0, -2.0]) * scale
    want = math.sqrt(1.25 / 14.0)
    for r in (compare_arrays(a, b), compare_tensors(a, b)):
        assert r.rel_l2 == pytest.approx(want, rel=1e-12)
        assert r.norm_a == pytest.approx(math.sqrt(14.0) * scale, rel=1e-12)


def test_rel_l2_underflowing_differences_are_not_zero():
    a = np.array([1e-170, 1.0])
    b = np.array([3e-170, 1.0])
    r = compare_arrays(a, b)
    assert r.rel_l2 == pytest.approx(2e-170, rel=1e-12)


def test_rel_l2_is_bit_identical_whatever_the_tuning():
    rng = np.random.default_rng(5)
    a = rng.standard_normal(1 << 19).astype(np.float32)
    b = a + np.float32(1e-3) * rng.standard_normal(1 << 19).astype(np.float32)
    b[: 1 << 16] = a[: 1 << 16]  # an identical prefix, summed later
    runs = {w: compare_tensors(a, b, tuning=Tuning(w), chunk_bytes=1 << 20) for w in (1, 2, 3, 4)} | {
        "whole": compare_arrays(a, b, tuning=Tuning(1))
    }
    got = {(r.rel_l2, r.norm_a, r.norm_b, r.norm_diff) for k, r in runs.items() if k != "whole"}
    assert len(got) == 1, got
    assert runs["whole"].rel_l2 == pytest.approx(runs[1].rel_l2, rel=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ml_dtypes.bfloat16])
def test_streamed_rel_l2_equals_the_whole_tensor_engine(small_chunks, dtype):  # noqa: F811
    for label, x, y in _patterns(97, dtype):
        whole, got = compare_arrays(x, y), compare_tensors(x, y)
        assert got.rel_l2 == pytest.approx(whole.rel_l2, rel=1e-12, abs=0), label
        if got.norm_a is not None:
            assert got.norm_a == pytest.approx(whole.norm_a, rel=1e-12), label


def test_torch_namespace_gives_the_same_rel_l2(monkeypatch):
    a, b = rand(5000), rand(5000, seed=1)
    want = compare_arrays(a.numpy(), b.numpy()).rel_l2
    monkeypatch.setattr(bk, "_TORCH_CPU_VIA_NUMPY", False)
    assert compare_arrays(a, b).rel_l2 == pytest.approx(want, rel=1e-13)
    assert compare_tensors(a, b, device="cpu").rel_l2 == pytest.approx(want, rel=1e-13)


def test_l2_norm_streams_and_rescales():
    x = np.random.default_rng(2).standard_normal(200_001)
    assert l2_norm(x, device=None, tuning=Tuning(2), chunk_bytes=1 << 16) == pytest.approx(np.linalg.norm(x))
    assert l2_norm(x * 1e300, device=None, tuning=Tuning(1)) == pytest.approx(np.linalg.norm(x) * 1e300)
    assert l2_norm(np.zeros(5), device=None, tuning=Tuning(1)) == 0.0
    t = torch.from_numpy(x)
    assert l2_norm(t, device="cpu", tuning=Tuning(1)) == pytest.approx(np.linalg.norm(x), rel=1e-12)


# ---------------------------------------------------------------------- thresholds


def stats(*, equal=False, rel_l2=0.01, cosine=0.9999):
    return TensorStats(equal, 10, 0 if equal else 10, 0.1, 0.1, cosine, rel_l2, 1.0, 1.0, rel_l2)


@pytest.mark.parametrize(
    "crit, s, want",
    [
        (Criteria(), stats(equal=True, rel_l2=0.0), True),
        (Criteria(), stats(), False),  # default: exact equality
        (Criteria(max_rel_l2=0.01), stats(), True),  # rel_l2 <= bound, elements differ
        (Criteria(max_rel_l2=0.009), stats(), False),
        (Criteria(min_cosine=0.9999), stats(), True),
        (Criteria(min_cosine=0.99999), stats(), False),
        (Criteria(max_rel_l2=0.1, min_cosine=0.99999), stats(), False),  # every stated criterion
        (Criteria(max_rel_l2=0.1, min_cosine=0.999), stats(), True),
        (Criteria(atol=1e-3, max_rel_l2=0.1), stats(), False),  # element-wise stated: it must hold too
        (Criteria(atol=1.0, max_rel_l2=0.1), stats(equal=True), True),
        (Criteria(atol=1.0, max_rel_l2=0.001), stats(equal=True), False),
        (Criteria(rtol=1e-2, min_cosine=0.5), stats(), False),
        (Criteria(max_rel_l2=1.0), stats(rel_l2=INF), False),  # a non-finite mismatch
        (Criteria(min_cosine=-1.0), stats(rel_l2=INF, cosine=1.0), False),
        (Criteria(min_cosine=0.5), stats(rel_l2=0.0, cosine=None), True),  # two all-zero tensors
        (Criteria(min_cosine=0.5), stats(rel_l2=INF, cosine=None), False),  # zeros against values
        (Criteria(max_rel_l2=1.0), None, False),  # no statistics (shapes differ)
    ],
)
def test_criteria_combine(crit, s, want):
    assert crit.holds(s) is want


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"max_rel_l2": -1}, "max_rel_l2"),
        ({"max_rel_l2": INF}, "max_rel_l2"),
        ({"max_rel_l2": "x"}, "max_rel_l2"),
        ({"min_cosine": 1.5}, "min_cosine"),
        ({"min_cosine": NAN}, "min_cosine"),
        ({"min_cosine": True}, "min_cosine"),
        ({"atol": -1}, "atol"),
    ],
)
def test_threshold_errors_name_the_parameter(kw, param, tmp_path):
    with pytest.raises(UsageError) as e:
        Criteria.of(**kw)
    assert e.value.param == param and "--" not in str(e.value)
    with pytest.raises(UsageError):
        diff({"x": torch.ones(1)}, {"x": torch.ones(1)}, **kw)


@pytest.fixture
def drifted(tmp_path):
    """A and B: ``w`` moved by about 1e-3 relative, ``n`` untouched."""
    w = rand(64, 64)
    a = {"w": w, "n": torch.ones(8)}
    b = {"w": w + 1e-3 * rand(64, 64, seed=1), "n": torch.ones(8)}
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return pa, pb


def test_diff_thresholds_and_their_combinations(drifted):
    a, b = drifted
    rel = diff(a, b).changed[0].stats.rel_l2
    assert 5e-4 < rel < 2e-3
    assert diff(a, b, max_rel_l2=rel).equal  # at most: equal at the bound
    assert not diff(a, b, max_rel_l2=rel * 0.999).equal
    assert diff(a, b, min_cosine=0.9999).equal
    assert not diff(a, b, min_cosine=1.0).equal
    assert not diff(a, b, max_rel_l2=1e-2, min_cosine=1.0).equal
    assert not diff(a, b, max_rel_l2=1e-2, atol=1e-5).equal  # the stated atol fails
    assert diff(a, b, max_rel_l2=1e-2, atol=1.0).equal
    assert not diff(a, b, max_rel_l2=1e-4, atol=1.0).equal  # the stated threshold fails
    r = diff(a, b, max_rel_l2=1e-2)
    assert r.same == 2 and r.to_dict()["max_rel_l2"] == 1e-2
    report = diff(a, b, max_rel_l2=1e-4)
    (c,) = report.changed
    assert c.reason == "value" and c.stats.mismatched > 4000  # statistics as ever: exact mismatches


def test_thresholds_never_excuse_shape_or_dtype_changes(tmp_path):
    a = {"s": torch.ones(2, 3), "d": torch.ones(4)}
    b = {"s": torch.ones(3, 2), "d": torch.ones(4, dtype=torch.float64)}
    r = diff(a, b, max_rel_l2=1.0, min_cosine=-1.0)
    assert sorted((c.name, c.reason) for c in r.changed) == [("d", "dtype"), ("s", "shape")]


def test_check_takes_the_thresholds(drifted):
    a, b = drifted
    assert not wsurgery.check(a, "w", "w", other=b).equal
    r = wsurgery.check(a, "w", "w", other=b, max_rel_l2=1e-2)
    assert r.equal and r.pairs[0].reason is None
    assert r.rel_l2 == pytest.approx(diff(a, b).changed[0].stats.rel_l2, rel=1e-15)
    assert not wsurgery.check(a, "w", "w", other=b, min_cosine=1.0).equal
    d = r.to_dict()
    assert d["max_rel_l2"] == 1e-2 and d["rel_l2"] == r.rel_l2 and "cosine" in d["pairs"][0]
    json.loads(r.to_json())


def test_check_rel_l2_over_several_pairs_counts_the_identical_ones(tmp_path):
    """The pairs taken as one vector: an untouched pair adds to ||a|| (its norm is summed
    after the compare, since a bit-identical pair never is)."""
    a = {"m.x": torch.tensor([3.0, 0.0]), "m.y": torch.tensor([0.0, 4.0])}
    b = {"m.x": torch.tensor([3.0, 0.0]), "m.y": torch.tensor([0.0, 4.5])}
    r = wsurgery.check(a, "m", "m", other=b)
    assert r.rel_l2 == pytest.approx(0.5 / 5.0, rel=1e-15)


# ------------------------------------------------------------------------- ties


@pytest.fixture
def tied_twins(tmp_path):
    emb = rand(16, 8)
    tied = tmp_path / "tied.safetensors"
    wsurgery.save_state_dict({"embed.weight": emb, "head.weight": emb}, tied)
    untied = tmp_path / "untied.safetensors"
    save_file({"embed.weight": emb, "head.weight": emb.clone()}, str(untied))
    return tied, untied


def test_ignore_ties_compares_values_only(tied_twins):
    tied, untied = tied_twins
    (c,) = diff(tied, untied).changed
    assert (c.name, c.reason, c.stats.equal) == ("head.weight", "alias", True)
    r = diff(tied, untied, ignore_ties=True)
    assert r.equal and r.same == 2 and r.to_dict()["ignore_ties"] is True
    assert wsurgery.diff(untied, tied, ignore_ties=True).equal


def test_ignore_ties_still_sees_values(tied_twins, tmp_path):
    tied, _ = tied_twins
    sd = wsurgery.load_state_dict(tied)
    moved = tmp_path / "moved.safetensors"
    save_file({"embed.weight": sd["embed.weight"], "head.weight": sd["head.weight"] + 1}, str(moved))
    (c,) = diff(tied, moved, ignore_ties=True).changed
    assert (c.name, c.reason) == ("head.weight", "value")


# ----------------------------------------------------------------------- modules


def test_module_of_and_auto_depth():
    assert module_of("layers.0.attn.qkv.weight", 2) == "layers.0"
    assert module_of("lm_head.weight", 2) == "lm_head"  # never the whole name
    assert module_of("bias", 3) == ""
    names = [f"model.layers.{i}.{p}.weight" for i in range(32) for p in ("q", "k", "v", "mlp")]
    names += ["model.embed.weight", "lm_head.weight", "model.norm.weight"]
    assert auto_depth(names) == 3  # 32 layers + embed + norm + lm_head
    assert auto_depth(["a.w", "b.w"]) == 1
    assert auto_depth([f"x.{i}.w" for i in range(100)]) == 1  # depth 2 would give 100 modules


def _layered(n: int, moved=lambda i: True):
    a, b = {}, {}
    for i in range(n):
        for part, shape in (("attn", (8, 4)), ("norm", (4,))):
            name = f"layers.{i}.{part}.weight"
            a[name] = rand(*shape, seed=i)
            b[name] = a[name] + 1e-2 * rand(*shape, seed=100 + i) if part == "attn" and moved(i) else a[name].clone()
    return a, b


def test_by_module_rolls_up_in_natural_order_from_sums(tmp_path):
    a, b = _layered(12)
    a["embed.weight"], b["embed.weight"] = rand(3), rand(3)
    a["old.weight"], b["layers.3.new.weight"] = rand(1), rand(1)
    r = diff(a, b, by_module=2)
    names = [m.name for m in r.modules]
    assert names == ["embed", *[f"layers.{i}" for i in range(12)], "old"]  # layers.2 before layers.10
    assert r.depth == 2
    m = next(m for m in r.modules if m.name == "layers.3")
    assert (m.tensors, m.changed, m.only_in_b, m.numel) == (2, 1, 1, 36)
    # rel_l2 and cosine of the module's tensors as one vector, the untouched norm included
    va = np.concatenate([a[f"layers.3.{p}.weight"].numpy().ravel() for p in ("attn", "norm")]).astype(np.float64)
    vb = np.concatenate([b[f"layers.3.{p}.weight"].numpy().ravel() for p in ("attn", "norm")]).astype(np.float64)
    assert m.rel_l2 == pytest.approx(np.linalg.norm(va - vb) / np.linalg.norm(va), rel=1e-12)
    assert m.cosine == pytest.approx(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb), rel=1e-12)
    assert next(m for m in r.modules if m.name == "old").rel_l2 is None  # nothing compared
    d = r.to_dict()
    assert d["depth"] == 2 and d["modules"][0]["name"] == "embed"
    json.loads(r.to_json())


def test_by_module_auto_and_its_minimum(tmp_path):
    a, b = _layered(5)
    assert diff(a, b, by_module="auto").depth == 3  # the deepest with at most 64 modules: layers.i.attn
    r = diff(a, b, by_module=1)
    (m,) = r.modules
    assert (m.name, m.tensors, m.changed) == ("layers", 10, 5)
    assert diff(a, b, by_module=2, by_module_min_changed=6).modules is None
    assert diff(a, b, by_module=2, by_module_min_changed=5).modules is not None
    assert "modules" not in diff(a, b).to_dict()


@pytest.mark.parametrize("bad", [0, -1, "x", True, 1.5])
def test_by_module_errors(bad):
    with pytest.raises(UsageError) as e:
        diff({"x": torch.ones(1)}, {"x": torch.ones(1)}, by_module=bad)
    assert e.value.param == "by_module" and "--" not in str(e.value)


def test_module_with_an_unbounded_tensor(tmp_path):
    a = {"m.x": torch.tensor([1.0, 2.0]), "m.y": torch.ones(2), "n.z": torch.ones(2)}
    b = {"m.x": torch.tensor([NAN, 2.0]), "m.y": torch.ones(2), "n.z": torch.ones(2)}
    r = diff(a, b, by_module=1)
    assert [(m.name, m.rel_l2, m.changed) for m in r.modules] == [("m", INF, 1), ("n", 0.0, 0)]
    assert r.to_dict()["modules"][0]["rel_l2"] == "Infinity"


def test_total_of_nothing_moved_needs_no_norms():
    same = TensorStats(True, 4, 0, 0.0, 0.0, 1.0, 0.0, None, None, 0.0)
    zeros = TensorStats(True, 4, 0, 0.0, 0.0, None, 0.0, None, None, 0.0)
    assert total([same, zeros]) == (0.0, 1.0)
    assert total([zeros]) == (0.0, None)
    assert total([]) == (None, None)
    with pytest.raises(ValueError):
        total([same, TensorStats(False, 4, 1, 1.0, 1.0, 0.5, 0.1, 1.0, 1.0, 0.1)])


# ------------------------------------------------------------------ live inputs


def test_modules_and_state_dicts_are_inputs(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    path = tmp_path / "model.safetensors"
    wsurgery.save_state_dict(model.state_dict(), path)
    assert wsurgery.diff(model, path).equal  # buffers too (running_mean, num_batches_tracked)
    assert wsurgery.diff(path, model.state_dict()).equal
    with wsurgery.open(path) as ckpt:
        assert wsurgery.diff(model, ckpt).equal
    with torch.no_grad():
        model[0].weight.mul_(1.001)
    r = wsurgery.diff(model, path, max_rel_l2=1e-2)
    assert r.equal
    (c,) = wsurgery.diff(model, path).changed
    assert c.name == "0.weight" and c.stats.rel_l2 == pytest.approx(1e-3 / 1.001, rel=1e-4)
    assert r.a.startswith("<a: Sequential")


def test_a_live_module_with_tied_weights(tmp_path):
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    untied = tmp_path / "untied.safetensors"
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(untied))
    (c,) = wsurgery.diff(model, untied).changed
    assert c.reason == "alias"
    assert wsurgery.diff(model, untied, ignore_ties=True).equal


def test_state_dict_entries_that_are_not_tensors(tmp_path):
    sd = {"w": torch.ones(2), "step": 3, "name": "x", "extra": None}
    r = wsurgery.diff(sd, {"w": torch.ones(2)})
    assert r.equal
    with pytest.raises(UsageError) as e:
        wsurgery.diff({"w": np.ones(2)}, {"w": torch.ones(2)})
    assert e.value.param == "a" and "ndarray" in str(e.value)
    with pytest.raises(UsageError) as e:
        wsurgery.diff({"w": torch.ones(2)}, 3)
    assert e.value.param == "b" and "nn.Module" in str(e.value)


def test_public_signatures_name_every_parameter():
    for fn, names in [
        (wsurgery.diff, {"a", "b", "atol", "rtol", "max_rel_l2", "min_cosine", "ignore_ties", "by_module", "device"}),
        (wsurgery.check, {"ckpt", "src", "dst", "transform", "other", "atol", "rtol", "max_rel_l2", "min_cosine"}),
        (wsurgery.testing.assert_checkpoint_equal, {"actual", "expected", "atol", "rtol", "max_rel_l2", "min_cosine"}),
    ]:
        params = inspect.signature(fn).parameters
        assert names <= set(params), fn
        assert "Args:" in fn.__doc__ and "Example" in fn.__doc__
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values())  # help() shows them all


def test_report_json_is_strict_json(tmp_path):
    a = {"x": torch.tensor([1.0, 2.0])}
    b = {"x": torch.tensor([NAN, 2.0])}
    text = wsurgery.diff(a, b).to_json()

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    d = json.loads(text, parse_constant=refuse)
    (c,) = d["changed"]
    got = (c["max_abs_diff"], c["max_rel_diff"], c["rel_l2"], c["cosine"])
    assert got == ("Infinity", "Infinity", "Infinity", None)  # no cosine beside rel_l2 = inf
    assert float(c["rel_l2"]) == INF  # float() reads the strings back


@needs_cuda
@pytest.mark.cuda
def test_cuda_modules_and_state_dicts(tmp_path):
    model = torch.nn.Linear(64, 64)
    path = tmp_path / "m.safetensors"
    wsurgery.save_state_dict(model.state_dict(), path)
    gpu = model.cuda()
    with torch.no_grad():
        gpu.weight.add_(1e-3)
    cpu = wsurgery.diff({k: v.cpu() for k, v in gpu.state_dict().items()}, path)
    on_gpu = wsurgery.diff(gpu, path)
    via_device = wsurgery.diff(path, path, device="cuda")
    assert via_device.equal
    (c,), (g,) = cpu.changed, on_gpu.changed
    assert g.stats.rel_l2 == pytest.approx(c.stats.rel_l2, rel=1e-9)
    assert g.stats.cosine == pytest.approx(c.stats.cosine, rel=1e-9)
    assert wsurgery.diff(gpu, path, max_rel_l2=1e-2, by_module=1).equal
