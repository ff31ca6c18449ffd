"""wsurgery.compare: the streaming checkpoint diff and check (report), as a library.

Statistics are checked against hand-computed values, and the chunked / screened paths
against one whole-tensor call of the compare engine.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file, save_model

import wsurgery
from wsurgery.compare import CheckReport, DiffReport, check, compare_tensors, diff
from wsurgery.compare import backends as bk
from wsurgery.compare import float_kernel as fk
from wsurgery.compare import kernel as ce
from wsurgery.compare import streaming as st
from wsurgery.compare import threads as th
from wsurgery.compare.kernel import Tuning, compare_arrays
from wsurgery.errors import InputError, SurgeryError, TransformError, UnknownNameError, UsageError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
INF, NAN = math.inf, math.nan


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def write(path, tensors, **kw):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), **kw)
    return path


def pair(tmp_path, a: dict, b: dict, names=("a.safetensors", "b.safetensors")):
    return write(tmp_path / names[0], a), write(tmp_path / names[1], b)


def one_change(report: DiffReport, name: str):
    found = [c for c in report.changed if c.name == name]
    assert len(found) == 1, report.to_dict()
    return found[0]


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the chunked and screened paths on small tensors."""
    monkeypatch.setattr(st, "CHUNK_BYTES", 64)
    monkeypatch.setattr(st, "SCREEN_BYTES", 16)
    monkeypatch.setattr(st, "SCREEN_PIECE_BYTES", 8)
    monkeypatch.setattr(st, "_SUMS_BLOCK", 3)
    monkeypatch.setattr(st, "_PENDING_STEP", 5)
    monkeypatch.setattr(th, "_DOT_PIECE", 2)
    monkeypatch.setattr(fk, "_DOT_PIECE", 2)
    monkeypatch.setattr(bk, "_DOT_PIECE", 2)


# ------------------------------------------------------------------ reasons and counts


def test_identical_files_are_equal_and_count_every_tensor(tmp_path):
    t = {"w": rand(4, 3), "b": rand(3, seed=1), "i": torch.arange(5), "s": torch.tensor(2.5)}
    a, b = pair(tmp_path, t, t)
    r = diff(a, b)
    assert r.equal and r.same == 4
    assert r.changed == [] and r.only_in_a == [] and r.only_in_b == []


def test_each_reason_and_the_name_lists(tmp_path):
    base = {"same": rand(3, 3), "shape": rand(2, 3), "dtype": rand(4), "value": rand(5), "gone": rand(1)}
    other = dict(base)
    other["shape"] = rand(3, 2)
    other["dtype"] = base["dtype"].to(torch.float16)
    other["value"] = base["value"].clone()
    other["value"][2] += 1
    del other["gone"]
    other["new"] = rand(2)
    a, b = pair(tmp_path, base, other)
    r = diff(a, b)
    assert not r.equal
    assert r.only_in_a == ["gone"] and r.only_in_b == ["new"]
    assert r.same == 1
    assert {c.name: c.reason for c in r.changed} == {"shape": "shape", "dtype": "dtype", "value": "value"}
    # most severe first
    assert [c.reason for c in r.changed] == ["shape", "dtype", "value"]
    shape = one_change(r, "shape")
    assert shape.stats is None
    assert shape.a == {"dtype": "float32", "shape": [2, 3], "alias_of": None}
    assert shape.b == {"dtype": "float32", "shape": [3, 2], "alias_of": None}
    # a dtype change still reports what the cast cost, after upcasting
    dt = one_change(r, "dtype")
    expected = compare_arrays(base["dtype"].numpy(), other["dtype"].numpy())
    assert dt.stats == expected
    assert dt.a["dtype"] == "float32" and dt.b["dtype"] == "float16"


def test_only_names_differ_is_not_equal(tmp_path):
    a, b = pair(tmp_path, {"x": rand(2)}, {"x": rand(2), "y": rand(1)})
    r = diff(a, b)
    assert not r.equal and r.same == 1 and r.only_in_b == ["y"] and r.changed == []


def test_value_statistics_match_hand_computed_values(tmp_path):
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = torch.tensor([1.0, 2.5, 3.0, 8.0])
    a, b = pair(tmp_path, {"t": x}, {"t": y})
    c = one_change(diff(a, b), "t")
    assert c.reason == "value"
    s = c.stats
    assert s.numel == 4 and s.mismatched == 2 and not s.equal
    assert s.max_abs_diff == 4.0
    assert s.max_rel_diff == 0.5  # max(0.5 / 2.5, 4 / 8)
    dot, na, nb = 1 + 5 + 9 + 32, 1 + 4 + 9 + 16, 1 + 6.25 + 9 + 64
    assert s.cosine == pytest.approx(dot / math.sqrt(na * nb), rel=1e-15)
    d = c.to_dict()
    assert d["mismatched"] == 2 and d["numel"] == 4 and d["max_abs_diff"] == 4.0


def test_tolerance_edges_are_inclusive(tmp_path):
    # |a - b| == atol exactly (0.5 is exact in binary): within tolerance
    a, b = pair(tmp_path, {"t": torch.tensor([1.0, 2.0])}, {"t": torch.tensor([1.5, 2.0])})
    assert diff(a, b, atol=0.5).equal
    r = diff(a, b, atol=0.4999)
    assert one_change(r, "t").stats.mismatched == 1
    # rtol: |3 - 2| <= 0.5 * |2|, measured against b
    a, b = pair(tmp_path, {"t": torch.tensor([3.0])}, {"t": torch.tensor([2.0])})
    assert diff(a, b, rtol=0.5).equal
    a, b = pair(tmp_path, {"t": torch.tensor([1.0])}, {"t": torch.tensor([2.0])})
    assert diff(a, b, rtol=0.5).equal  # 1 <= 0.5 * 2
    assert not diff(b, a, rtol=0.5).equal  # 1 > 0.5 * 1: rtol scales |b|
    # atol + rtol add up
    a, b = pair(tmp_path, {"t": torch.tensor([4.0])}, {"t": torch.tensor([2.0])})
    assert diff(a, b, atol=1.0, rtol=0.5).equal
    assert not diff(a, b, atol=0.75, rtol=0.5).equal


def test_nan_inf_and_signed_zero(tmp_path):
    x = torch.tensor([NAN, INF, -INF, 1.0])
    a = write(tmp_path / "a.safetensors", {"t": x})
    assert diff(a, a).equal  # NaN in the same place: a file equals itself
    b = write(tmp_path / "b.safetensors", {"t": torch.tensor([NAN, INF, INF, 1.0])})
    s = one_change(diff(a, b), "t").stats
    assert s.mismatched == 1 and s.max_abs_diff == INF
    c = write(tmp_path / "c.safetensors", {"t": torch.tensor([1.0, INF, -INF, 1.0])})
    assert one_change(diff(a, c), "t").stats.mismatched == 1
    # signed zeros: bitwise at zero tolerance, equal within any tolerance
    z1 = write(tmp_path / "z1.safetensors", {"t": torch.tensor([0.0, 1.0])})
    z2 = write(tmp_path / "z2.safetensors", {"t": torch.tensor([-0.0, 1.0])})
    s = one_change(diff(z1, z2), "t").stats
    assert s.mismatched == 1 and s.max_abs_diff == 0.0
    assert diff(z1, z2, atol=1e-30).equal


def test_nan_payloads_and_bit_identical_tensors(tmp_path):
    bits = np.array([0x7FC00000, 0x7FC00001, 0xFF800000, 0x00000001], dtype=np.uint32)
    other = bits.copy()
    other[1] = 0x7FC00002  # another NaN payload: still NaN == NaN
    np_save_file({"t": bits.view(np.float32)}, str(tmp_path / "a.safetensors"))
    np_save_file({"t": other.view(np.float32)}, str(tmp_path / "b.safetensors"))
    assert diff(tmp_path / "a.safetensors", tmp_path / "a.safetensors").equal
    assert diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").equal


def test_zero_size_and_scalar_tensors(tmp_path):
    t = {"empty": torch.zeros(0, 4), "scalar": torch.tensor(3.0)}
    u = {"empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5)}
    a, b = pair(tmp_path, t, u)
    r = diff(a, b)
    assert r.same == 1
    s = one_change(r, "scalar").stats
    assert (s.numel, s.mismatched, s.max_abs_diff, s.cosine) == (1, 1, 0.5, 1.0)
    assert one_change(r, "scalar").a["shape"] == []
    e = diff(a, a)
    assert e.equal and e.same == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_compared_exactly(tmp_path, dtype):
    x = torch.tensor([1.0, 2.0, -3.0], dtype=dtype)
    y = x.clone()
    y.view(torch.int16)[1] += 1  # the next representable value above 2
    a, b = pair(tmp_path, {"t": x}, {"t": y})
    s = one_change(diff(a, b), "t").stats
    step = 2.0 * (2**-7 if dtype == torch.bfloat16 else 2**-10)
    assert s.mismatched == 1 and s.max_abs_diff == step
    assert s.max_rel_diff == pytest.approx(step / (2 + step), rel=1e-15)
    assert diff(a, b, atol=step).equal


def test_integer_and_bool_tensors(tmp_path):
    lo, hi = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
    t = {"i64": torch.tensor([lo, 0, 5]), "u8": torch.tensor([0, 255], dtype=torch.uint8), "b": torch.tensor([True])}
    u = {"i64": torch.tensor([hi, 0, 5]), "u8": torch.tensor([1, 255], dtype=torch.uint8), "b": torch.tensor([False])}
    a, b = pair(tmp_path, t, u)
    r = diff(a, b)
    i64 = one_change(r, "i64").stats
    assert i64.mismatched == 1 and i64.max_abs_diff == float(2**64 - 1)
    u8 = one_change(r, "u8").stats
    assert u8.mismatched == 1 and u8.max_abs_diff == 1.0 and u8.max_rel_diff == 1.0
    bs = one_change(r, "b").stats
    assert bs.mismatched == 1 and bs.max_abs_diff == 1.0
    assert diff(a, b, atol=1).to_dict()["changed"][0]["name"] == "i64"


# ------------------------------------------------------------------ formats and ties


def test_any_formats_agree(fixtures):
    pt, st, sharded = fixtures / "tiny_lm.pt", fixtures / "tiny_lm.safetensors", fixtures / "tiny_lm_sharded"
    for a, b in ((pt, st), (st, sharded), (pt, sharded), (sharded / "model.safetensors.index.json", st)):
        r = diff(a, b)
        assert r.equal, r.to_dict()
        assert r.same == 15


def test_pt_with_shared_storage_equals_its_conversion(fixtures, tmp_path, cli):
    src = fixtures / "shared_storage.pt"
    out = tmp_path / "conv.safetensors"
    code, _, stderr = cli("convert", src, "-o", out)
    assert code == 0, stderr
    r = diff(src, out)
    assert r.equal and r.same == 5
    # a plain tie written by safetensors.torch.save_model (a "name": "source" entry) reads
    # as the same relation as the .pt's shared storage
    e = rand(4, 3)
    module = torch.nn.Module()
    module.register_buffer("emb", e)
    module.register_buffer("proj", e)
    module.register_buffer("bias", torch.zeros(3))
    hf = tmp_path / "hf.safetensors"
    save_model(module, str(hf))
    torch.save({"emb": e, "proj": e, "bias": torch.zeros(3)}, tmp_path / "m.pt")
    r = diff(tmp_path / "m.pt", hf)
    assert r.equal and r.same == 3, r.to_dict()


def test_lost_tie_is_reported_as_alias_with_value_statistics(fixtures, tmp_path):
    src = fixtures / "shared_storage.pt"
    sd = torch.load(src, weights_only=True)
    untied = tmp_path / "untied.safetensors"
    write(untied, {k: v.clone() for k, v in sd.items()})
    r = diff(src, untied)
    assert {c.name: c.reason for c in r.changed} == {"projection.weight": "alias", "decoder.weight": "alias"}
    c = one_change(r, "decoder.weight")
    assert c.a["alias_of"] == {"source": "encoder.weight", "transform": ["transpose"]}
    assert c.b["alias_of"] is None
    assert c.stats.equal and c.stats.numel == 128  # the values agree
    assert r.same == 3


def _tied(path, sd, aliases):
    wsurgery.save_state_dict(sd, path, aliases=aliases)
    return path


def test_tie_relations_compared_whatever_their_direction(tmp_path):
    e = rand(4, 3)
    # plain tie, either name stored
    a = _tied(tmp_path / "a.safetensors", {"emb": e}, {"proj": ("emb", [])})
    b = _tied(tmp_path / "b.safetensors", {"proj": e}, {"emb": ("proj", [])})
    r = diff(a, b)
    assert r.equal and r.same == 2, r.to_dict()
    # transposed tie, reversed
    c = _tied(tmp_path / "c.safetensors", {"emb": e}, {"head": ("emb", ["transpose"])})
    d = _tied(tmp_path / "d.safetensors", {"head": e.t().contiguous()}, {"emb": ("head", ["transpose"])})
    r = diff(c, d)
    assert r.equal and r.same == 2, r.to_dict()
    # same source, another transform: alias (and the values differ too)
    e2 = rand(3, 3, seed=3)
    f = _tied(tmp_path / "f.safetensors", {"w": e2}, {"v": ("w", ["transpose"])})
    g = _tied(tmp_path / "g.safetensors", {"w": e2}, {"v": ("w", [])})
    c2 = one_change(diff(f, g), "v")
    assert c2.reason == "alias" and not c2.stats.equal
    assert c2.a["alias_of"]["transform"] == ["transpose"] and c2.b["alias_of"]["transform"] == []
    # tied to different sources with equal values: alias, values agree
    h = _tied(tmp_path / "h.safetensors", {"x": e, "y": e.clone()}, {"z": ("x", [])})
    k = _tied(tmp_path / "k.safetensors", {"x": e, "y": e.clone()}, {"z": ("y", [])})
    c3 = one_change(diff(h, k), "z")
    assert c3.reason == "alias" and c3.stats.equal


def test_axis_permutation_ties_in_either_direction(tmp_path):
    w = torch.arange(24.0).reshape(2, 3, 4)
    a = _tied(tmp_path / "a.safetensors", {"w": w}, {"p": ("w", ["permute(2,0,1)"]), "t": ("w", ["transpose(0,-1)"])})
    # the same relations, stored the other way round: p is stored, w and t derive from it
    p = w.permute(2, 0, 1).contiguous()
    b = _tied(
        tmp_path / "b.safetensors",
        {"p": p},
        {"w": ("p", ["permute(1,2,0)"]), "t": ("p", ["permute(1,2,0)", "transpose(0,2)"])},
    )
    r = diff(a, b)
    assert r.equal and r.same == 3, r.to_dict()
    # a tie group whose transforms are no axis permutations only matches record for record
    c = _tied(tmp_path / "c.safetensors", {"w": w}, {"r": ("w", ["reshape(6,4)"])})
    d = _tied(tmp_path / "d.safetensors", {"r": w.reshape(6, 4)}, {"w": ("r", ["reshape(2,3,4)"])})
    r = diff(c, d)
    assert {x.name: x.reason for x in r.changed} == {"w": "alias", "r": "alias"}
    assert all(x.stats.equal for x in r.changed)  # the values agree


def test_views_of_safetensors_sources_are_computed_with_numpy(tmp_path):
    w = rand(2, 3, 4)
    views = {"p": ("w", ["permute(2,0,1)"]), "r": ("w", ["reshape(6,4)"]), "t": ("w", ["transpose(0,2)"])}
    a = _tied(tmp_path / "a.safetensors", {"w": w}, views)
    plain = {"w": w, "p": w.permute(2, 0, 1), "r": w.reshape(6, 4).clone(), "t": w.transpose(0, 2)}
    b = write(tmp_path / "b.safetensors", plain)
    r = diff(a, b)
    assert {x.name: x.reason for x in r.changed} == {"p": "alias", "r": "alias", "t": "alias"}
    assert all(x.stats.equal and x.stats.numel == 24 for x in r.changed)
    assert check(a, "w", "t", transform=["transpose(0,2)"], other=b).equal


def test_identical_records_over_sources_of_another_shape(tmp_path):
    x = torch.arange(24.0)
    a = _tied(tmp_path / "a.safetensors", {"w": x.reshape(4, 6)}, {"f": ("w", ["reshape(24)"])})
    b = _tied(tmp_path / "b.safetensors", {"w": x.reshape(6, 4)}, {"f": ("w", ["reshape(24)"])})
    r = diff(a, b)
    assert {c.name: c.reason for c in r.changed} == {"w": "shape"}
    assert r.same == 1  # f holds the same 24 values in the same order


def test_identical_alias_records_follow_their_source(tmp_path):
    e = torch.arange(24.0).reshape(6, 4)
    e2 = e.clone()
    e2[1, 2] += 1
    a = _tied(tmp_path / "a.safetensors", {"w": e}, {"t": ("w", ["transpose"]), "s": ("w", ["slice(0,2,4)"])})
    b = _tied(tmp_path / "b.safetensors", {"w": e2}, {"t": ("w", ["transpose"]), "s": ("w", ["slice(0,2,4)"])})
    r = diff(a, b)
    w, t = one_change(r, "w"), one_change(r, "t")
    assert t.reason == "value" and t.stats == w.stats  # a transpose rearranges: same numbers
    assert "s" not in {c.name for c in r.changed}  # rows 2..3 did not change
    assert r.same == 1
    # a change inside the slice is seen in the slice's own numbers
    e3 = e.clone()
    e3[3, 0] -= 2
    c = _tied(tmp_path / "c.safetensors", {"w": e3}, {"t": ("w", ["transpose"]), "s": ("w", ["slice(0,2,4)"])})
    s = one_change(diff(a, c), "s").stats
    assert s.numel == 8 and s.mismatched == 1 and s.max_abs_diff == 2.0
    # identical records, equal sources: equal without reading (the filter hides the source)
    r = diff(a, a, filter="t")
    assert r.equal and r.same == 1


def test_filter_and_a_filter_that_matches_nothing(tmp_path):
    a, b = pair(tmp_path, {"enc.w": rand(2), "dec.w": rand(2)}, {"enc.w": rand(2), "dec.w": rand(2, seed=5)})
    assert diff(a, b, filter="enc.*").equal
    assert not diff(a, b, filter="dec.*").equal
    with pytest.raises(UnknownNameError, match="matches no tensor") as err:
        diff(a, b, filter="nope.*")
    assert err.value.name == "nope.*"


def test_inputs_may_be_loaded_checkpoints_or_state_dicts(tmp_path):
    sd = {"w": rand(3, 2), "b": rand(2, seed=1)}
    path = write(tmp_path / "m.safetensors", sd)
    ckpt = wsurgery.load(path)
    assert diff(ckpt, sd).equal
    assert wsurgery.diff(path, sd).equal  # the package's front door
    other = dict(sd, b=sd["b"] + 1)
    assert not diff(ckpt, other).equal
    ckpt.close()


def test_unreadable_inputs_and_bad_arguments_raise(tmp_path):
    a = write(tmp_path / "a.safetensors", {"x": rand(2)})
    with pytest.raises(InputError):
        diff(a, tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(InputError):
        diff(bad, a)
    with pytest.raises(UsageError):
        diff(a, a, atol=-1)
    with pytest.raises(UsageError):
        diff(a, a, rtol=float("nan"))
    with pytest.raises(UsageError):
        diff(a, a, device="tpu:0")
    with pytest.raises(UsageError):
        diff(a, 42)
    with pytest.raises(UsageError) as e:  # one tolerance rule everywhere: finite and >= 0
        diff(a, a, atol=INF)
    assert e.value.param == "atol"
    with pytest.raises(UsageError) as e:
        check(a, "x", "x", rtol=INF)
    assert e.value.param == "rtol"
    with pytest.raises(UsageError) as e:
        compare_tensors(rand(2), rand(2), atol="x")
    assert e.value.param == "atol"
    with pytest.raises(UsageError) as e:
        diff(a, a, tuning=2)
    assert e.value.param == "tuning"


def test_report_json_is_the_design_schema(tmp_path):
    a, b = pair(tmp_path, {"t": torch.tensor([1.0, NAN])}, {"t": torch.tensor([1.0, 2.0])})
    d = diff(a, b).to_dict()
    assert d["schema"] == "wsurgery.diff/1"
    assert {"equal", "only_in_a", "only_in_b", "changed", "same"} <= set(d)
    (c,) = d["changed"]
    assert set(c) == {
        "name",
        "reason",
        "a",
        "b",
        "max_abs_diff",
        "max_rel_diff",
        "mismatched",
        "numel",
        "cosine",
        "rel_l2",
    }
    assert c["max_abs_diff"] == "Infinity" and c["rel_l2"] == "Infinity"  # JSON-safe
    import json

    json.dumps(d, allow_nan=False)


def test_progress_reports_every_byte(tmp_path):
    a, b = pair(tmp_path, {"x": rand(100), "y": rand(7)}, {"x": rand(100, seed=2), "y": rand(7)})
    calls = []
    diff(a, b, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 2 * 107 * 4)
    assert calls[-1] == (2 * 107 * 4, 2 * 107 * 4)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# -------------------------------------------------------------- streaming and chunks


def _patterns(n: int, dtype) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal(n).astype(dtype)
    cases = [("identical", x, x.copy())]
    y = x.copy()
    y[-1] = y[-1] + 1  # differs at the very end: the identical prefix is summed later
    cases.append(("tail", x, y))
    y = x.copy()
    y[::5] *= 2
    cases.append(("dense", x, y))
    y = x.copy()
    y[3] = np.nan
    x2 = x.copy()
    x2[3] = np.nan
    x2[10] = np.inf
    cases.append(("nan-inf", x2, y))
    cases.append(("zeros", np.zeros(n, dtype), np.zeros(n, dtype)))
    z = np.zeros(n, dtype)
    z[n // 2] = 1
    cases.append(("one-nonzero", z, z.copy()))
    # a fine-tune: every element moved a little (in bfloat16 many round back to equal)
    y = (x.astype(np.float64) + 1e-3 * rng.standard_normal(n)).astype(dtype)
    cases.append(("everywhere", x, y))
    y2 = x.copy()
    y2[: n // 2] = y[: n // 2]
    cases.append(("everywhere-then-same", x, y2))
    y3 = y.copy()
    y3[n // 3] = np.nan
    y3[n // 3 + 1] = np.inf
    cases.append(("everywhere-nan-inf", x, y3))
    return cases


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("tol", [(0.0, 0.0), (1e-3, 1e-2)])
def test_chunked_statistics_equal_the_whole_tensor_engine(small_chunks, dtype, tol):
    for label, x, y in _patterns(97, dtype):
        whole = compare_arrays(x, y, atol=tol[0], rtol=tol[1])
        got = compare_tensors(x, y, atol=tol[0], rtol=tol[1])
        assert (got.equal, got.numel, got.mismatched) == (whole.equal, whole.numel, whole.mismatched), label
        assert got.max_abs_diff == whole.max_abs_diff and got.max_rel_diff == whole.max_rel_diff, label
        if whole.cosine is None:
            assert got.cosine is None, label
        else:
            assert got.cosine == pytest.approx(whole.cosine, rel=1e-12, abs=1e-15), label


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("tol", [(0.0, 0.0), (1e-3, 1e-2)])
def test_fine_tune_pairs_with_default_sizes(monkeypatch, dtype, tol):
    """Several screening blocks and engine blocks (on two threads), with the real sizes."""
    monkeypatch.setattr(fk, "_FAST_ELEMS", 1 << 12)
    two = Tuning(workers=2)
    n = 300_000
    for label, x, y in _patterns(n, dtype)[-3:]:
        whole = compare_arrays(x, y, atol=tol[0], rtol=tol[1], tuning=two)
        got = compare_tensors(x, y, atol=tol[0], rtol=tol[1], tuning=two)
        assert (got.mismatched, got.max_abs_diff, got.max_rel_diff) == (
            whole.mismatched,
            whole.max_abs_diff,
            whole.max_rel_diff,
        ), label
        if whole.cosine is None:
            assert got.cosine is None, label
        else:
            assert got.cosine == pytest.approx(whole.cosine, rel=1e-12), label
        assert whole.mismatched > (n // 10 if tol == (0.0, 0.0) else 0), label


def test_chunked_mixed_dtypes_ints_and_complex(small_chunks):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(61).astype(np.float32)
    for a, b in (
        (x, x.astype(ml_dtypes.bfloat16)),
        (x, x.astype(np.float64)),
        (rng.integers(-50, 50, 61), rng.integers(-50, 50, 61).astype(np.int8)),
        (np.arange(61, dtype=np.uint8), np.arange(61, dtype=np.uint8)[::-1].copy()),
        ((x + 1j * x[::-1]).astype(np.complex64), (x - 1j * x).astype(np.complex64)),
        (x > 0, x > 0.1),
    ):
        whole, got = compare_arrays(a, b), compare_tensors(a, b)
        assert (got.mismatched, got.max_abs_diff, got.max_rel_diff) == (
            whole.mismatched,
            whole.max_abs_diff,
            whole.max_rel_diff,
        )
        assert got.cosine == pytest.approx(whole.cosine, rel=1e-12)


@pytest.mark.parametrize("tol", [(0.0, 0.0), (1e-3, 1e-2)])
def test_the_device_path_on_cpu_tensors(small_chunks, tol):
    # the path --device cuda takes (the engine per chunk, torch sums), run on CPU tensors
    for label, x, y in _patterns(97, np.float32) + [("cast", *_patterns(97, np.float32)[2][1:])]:
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        if label == "cast":
            ty = ty.to(torch.bfloat16)
        got = ce.compare_flat(tx, ty, atol=tol[0], rtol=tol[1], device="cpu", tuning=Tuning.detect())
        whole = compare_arrays(tx, ty, atol=tol[0], rtol=tol[1])
        assert (got.mismatched, got.max_abs_diff, got.max_rel_diff) == (
            whole.mismatched,
            whole.max_abs_diff,
            whole.max_rel_diff,
        ), label
        if whole.cosine is None:
            assert got.cosine is None, label
        else:
            assert got.cosine == pytest.approx(whole.cosine, rel=1e-12), label


def test_float64_sums_out_of_range_fall_back_to_the_engine(small_chunks):
    x = np.full(40, 1e200)
    y = x.copy()
    y[-1] = -1e200
    whole = compare_arrays(x, y)
    got = compare_tensors(x, y)
    assert got.cosine == pytest.approx(whole.cosine, rel=1e-12) and got.cosine == pytest.approx(38 / 40)
    tiny = np.full(40, 1e-200)
    assert compare_tensors(tiny, tiny * 2).cosine == pytest.approx(1.0)


def test_chunked_diff_of_files_matches_small_files(tmp_path, small_chunks):
    x = rand(50, 3)
    y = x.clone()
    y[49, 2] = 100.0
    a, b = pair(tmp_path, {"t": x, "i": torch.arange(40)}, {"t": y, "i": torch.arange(40)})
    r = diff(a, b)
    s = one_change(r, "t").stats
    whole = compare_arrays(x.numpy(), y.numpy())
    assert (s.mismatched, s.max_abs_diff, s.max_rel_diff) == (1, whole.max_abs_diff, whole.max_rel_diff)
    assert s.cosine == pytest.approx(whole.cosine, rel=1e-12)
    assert r.same == 1


def test_compare_tensors_takes_torch_and_numpy_and_checks_shapes():
    x = rand(5, 4)
    assert compare_tensors(x, x.numpy()).equal
    assert compare_tensors(x.to(torch.bfloat16), x.to(torch.bfloat16)).equal
    assert compare_tensors(x, x + 1).mismatched == 20
    with pytest.raises(SurgeryError, match="shape"):
        compare_tensors(x, x.t())


def test_safetensors_diff_releases_pages_behind_it(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(st, "SCREEN_BYTES", 1024)
    x = rand(64, 64)
    a, b = pair(tmp_path, {"t": x}, {"t": x})
    released = []
    from wsurgery.io.safetensors import FileStored

    real = FileStored.release

    def spy(self, start=0, stop=None):
        released.append((self.name, start, stop))
        return real(self, start, stop)

    monkeypatch.setattr(FileStored, "release", spy)
    assert diff(a, b).equal
    # both files, every 4 KiB chunk, in order
    assert len(released) == 2 * (64 * 64 * 4 // 4096)
    assert released[0][1:] == (0, 4096) and released[-1][1:] == (4096 * 3, 4096 * 4)


# ----------------------------------------------------------------------------- check


def test_check_a_tie_inside_one_checkpoint(fixtures):
    src = fixtures / "shared_storage.pt"
    r = check(src, "encoder.weight", "decoder.weight", transform=["transpose"])
    assert isinstance(r, CheckReport) and r.equal
    assert (r.numel, r.mismatched, r.max_abs_diff, r.max_rel_diff) == (128, 0, 0.0, 0.0)
    r = check(src, "encoder.weight", "decoder.weight")
    assert not r.equal and r.pairs[0].reason == "shape" and r.mismatched is None
    r = check(src, "embedding.weight", "projection.weight", transform="scale(2.0)")
    assert not r.equal and r.pairs[0].reason == "value" and r.mismatched > 0


def test_check_module_prefixes_against_another_checkpoint(fixtures, tmp_path):
    sd = torch.load(fixtures / "tiny_lm.pt", weights_only=True)
    other = {k.replace("layers.0.", "block."): v for k, v in sd.items() if k.startswith("layers.0.")}
    other["block.mlp.up.weight"] = other["block.mlp.up.weight"] + 1e-3
    path = write(tmp_path / "other.safetensors", other)
    r = check(fixtures / "tiny_lm.safetensors", "layers.0", "block", other=path)
    assert len(r.pairs) == 6 and not r.equal
    bad = [p for p in r.pairs if not p.equal]
    assert [(p.src, p.dst, p.reason) for p in bad] == [("layers.0.mlp.up.weight", "block.mlp.up.weight", "value")]
    assert r.mismatched == 128 and r.numel == sum(t.numel() for t in other.values())
    assert check(fixtures / "tiny_lm.safetensors", "layers.0", "block", other=path, atol=2e-3).equal
    d = r.to_dict()
    assert d["schema"] == "wsurgery.check/1"
    assert {"equal", "max_abs_diff", "max_rel_diff", "mismatched", "numel", "pairs"} <= set(d)


def test_check_dtype_mismatch_and_cast(tmp_path):
    x = rand(4, 4)
    path = write(tmp_path / "m.safetensors", {"w": x, "h": x.to(torch.bfloat16)})
    r = check(path, "w", "h")
    assert not r.equal and r.pairs[0].reason == "dtype"
    assert check(path, "w", "h", transform=["cast(bfloat16)"]).equal


def test_check_errors(tmp_path):
    path = write(tmp_path / "m.safetensors", {"w": rand(4, 3), "v": rand(3, 4), "m.a": rand(1), "m.b": rand(1)})
    other = write(tmp_path / "o.safetensors", {"n.a": rand(1)})
    with pytest.raises(UnknownNameError, match="1 of 2 destinations are missing.*n.b"):
        check(path, "m", "n", other=other)
    with pytest.raises(UnknownNameError):
        check(path, "nope", "v")
    with pytest.raises(UnknownNameError):
        check(path, "w", "nope")
    with pytest.raises(TransformError):
        check(path, "w", "v", transform=["permute(0,1,2)"])
    with pytest.raises(TransformError):
        check(path, "w", "v", transform=["frobnicate"])


def test_safetensors_aliases_are_compared_without_torch_views(tmp_path):
    e = rand(6, 4)
    a = _tied(tmp_path / "a.safetensors", {"w": e}, {"s": ("w", ["slice(1,1,3)", "transpose"])})
    r = check(a, "w", "s", transform=["slice(1,1,3)", "transpose"])
    assert r.equal and r.numel == 12


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@needs_cuda
def test_diff_and_check_on_cuda(tmp_path, small_chunks):
    x = rand(40, 3)
    y = x.clone()
    y[5, 1] += 1
    a, b = pair(tmp_path, {"t": x, "same": x}, {"t": y, "same": x})
    cpu = diff(a, b)
    gpu = diff(a, b, device="cuda")
    assert gpu.to_dict()["changed"][0]["mismatched"] == 1
    s_cpu, s_gpu = one_change(cpu, "t").stats, one_change(gpu, "t").stats
    assert (s_gpu.mismatched, s_gpu.max_abs_diff) == (s_cpu.mismatched, s_cpu.max_abs_diff)
    assert s_gpu.cosine == pytest.approx(s_cpu.cosine, rel=1e-12)
    assert gpu.same == 1
    assert check(a, "t", "t", other=b, device="cuda:0").mismatched == 1
    assert compare_tensors(x.cuda(), y).mismatched == 1


# ------------------------------------------------------------ screening and threaded sums


def test_memcmp_screening_finds_a_flipped_bit_in_any_block_position():
    assert st._memcmp() is not None  # Linux: the screening really goes through libc
    x = np.random.default_rng(5).standard_normal(1000).astype(np.float32)
    eq = np.empty(64, dtype=bool)
    for pos in (0, 1, 63, 64, 500, 959, 960, 999):
        for byte in (0, 3):
            y = x.copy()
            y.view(np.uint8)[pos * 4 + byte] ^= 0x01
            want = [not (b * 64 <= pos < (b + 1) * 64) for b in range(16)]
            assert st._blocks_equal(x, y, 64, np.uint32, eq, workers=2) == want, (pos, byte)
    assert st._blocks_equal(x, x.copy(), 64, np.uint32, eq, workers=2) == [True] * 16


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_memcmp_and_numpy_screening_give_the_same_statistics(monkeypatch, small_chunks, dtype):
    two = Tuning(workers=2)
    for label, x, y in _patterns(211, dtype):
        with_memcmp = compare_tensors(x, y, tuning=two)
        with monkeypatch.context() as m:
            m.setattr(st, "_memcmp", lambda: None)
            with_numpy = compare_tensors(x, y, tuning=two)
        assert with_memcmp == with_numpy, label  # to the bit, cosine included


def test_threaded_identical_sums_equal_the_sequential_fold():
    x = np.random.default_rng(9).standard_normal(300_000).astype(np.float32) * 1e3
    x[5] = np.inf  # a block whose sum needs the finite mask
    ranges = [(0, 70_000), (70_000, 70_001), (100, 250_000), (250_000, 300_000)]
    sequential = [st._sums_numpy(x[i:j], None, st._Buffers())[0] for i, j in ranges]
    for workers in (1, 2, 3):
        assert st._identical_sums(x, ranges, workers) == sequential, workers


# ---------------------------------------------------------------------------- tuning


def test_reports_are_the_same_to_the_bit_whatever_the_tuning(tmp_path):
    """Threads change how fast, never what: every statistic, cosine included, is the same
    with one worker or four (several screening blocks, kernel blocks and tensors)."""
    a, b = {}, {}
    for dtype in (np.float32, ml_dtypes.bfloat16):
        for label, x, y in _patterns(300_000, dtype):
            name = f"{np.dtype(dtype).name}.{label}"
            a[name], b[name] = x, y
    a["mixed"], b["mixed"] = a["float32.everywhere"], b["float32.everywhere"].astype(np.float64)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    np_save_file(a, str(pa))
    np_save_file(b, str(pb))
    for tol in ((0.0, 0.0), (1e-3, 1e-2)):
        reports = [diff(pa, pb, atol=tol[0], rtol=tol[1], tuning=Tuning(workers=w)).to_dict() for w in (1, 2, 3, 4)]
        assert len(reports[0]["changed"]) > 10
        assert all(r == reports[0] for r in reports[1:]), tol
        checks = [check(pa, "float32", "float32", other=pb, atol=tol[0], tuning=Tuning(workers=w)) for w in (1, 4)]
        assert checks[0].to_dict() == checks[1].to_dict()
