"""The compare pipeline's inputs and options: strided in-memory tensors read chunk by chunk,
tensors that cannot be compared refused, ``CompareOptions``, the caller's mapper, the
filter selector, the cores shared among local ranks, unbounded differences first."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import wsurgery
from wsurgery import api
from wsurgery.compare import CompareOptions, Tuning, check, compare_tensors, diff
from wsurgery.compare.inputs import StridedFlat
from wsurgery.errors import InputError, UnknownNameError, UsageError
from wsurgery.testing import assert_checkpoint_equal

from ..bounded import bounded

ROOT = Path(__file__).resolve().parents[2]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ strided tensors


def _strided_cases():
    def base(seed):  # one storage per tensor: views of one storage would be ties
        return rand(6, 5, 4, seed=seed)

    return {
        "transpose": base(1)[:, :, 0].t(),
        "permute": base(2).permute(2, 0, 1),
        "step": base(3)[::2, 1:, ::3],
        "expand": torch.arange(4.0).reshape(1, 4).expand(7, 4),
        "expand-3d": torch.arange(3.0).reshape(3, 1, 1).expand(3, 5, 2),
        "zero-d-expand": torch.tensor(2.5).expand(9),
    }


@pytest.mark.parametrize("name", list(_strided_cases()))
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_strided_flat_slices_equal_the_flattened_tensor(name, kind):
    t = _strided_cases()[name]
    want = t.contiguous().reshape(-1).numpy()
    flat = StridedFlat(t.numpy() if kind == "numpy" else t)
    assert flat.shape == (t.numel(),)
    n = t.numel()
    for i, j in [(0, n), (0, 1), (1, 4), (3, 11), (n - 2, n), (5, 5), (2, n - 1)]:
        got = flat[i:j]
        got = got if kind == "numpy" else got.numpy()
        np.testing.assert_array_equal(got, want[i:j], err_msg=f"{name} [{i}:{j}]")
        assert got.flags.c_contiguous


def test_strided_state_dicts_compare_like_their_contiguous_copies():
    cases = _strided_cases()
    other = {k: v.contiguous().clone() for k, v in cases.items()}
    other["step"] = other["step"] + 1e-3
    report = diff(cases, other, tuning=Tuning(workers=2))
    assert [c.name for c in report.changed] == ["step"]
    want = compare_tensors(cases["step"].contiguous(), other["step"])
    assert report.changed[0].stats == want
    assert compare_tensors(cases["permute"], other["permute"]).equal


def test_an_expanded_tensor_is_never_materialised():
    """3e8 float32 elements over one stored value: 1.2 GB if made contiguous, more than
    the child's address space leaves; read by stride, it costs a chunk."""
    code = """
import torch, wsurgery
n = 3 * 10**8
a = {"e": torch.ones(1).expand(n)}
r = wsurgery.diff(a, {"e": torch.ones(1).expand(n)})
assert r.equal and r.same == 1, r.to_dict()
r = wsurgery.diff(a, {"e": torch.full((1,), 1.5).expand(n)})
(c,) = r.changed
assert c.stats.mismatched == n and c.stats.max_abs_diff == 0.5, c
print("ok")
"""
    r = bounded(code=code, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# ------------------------------------------------------------ tensors refused


def _unusable():
    dense = torch.ones(2, 3)
    return {
        "sparse": dense.to_sparse(),
        "sparse-csr": dense.to_sparse_csr(),
        "meta": torch.empty(2, 3, device="meta"),
        "nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
    }


@pytest.mark.parametrize("kind", list(_unusable()))
def test_tensors_that_cannot_be_compared_are_input_errors_naming_them(kind):
    bad = {"ok.w": torch.ones(2), f"bad.{kind}": _unusable()[kind]}
    with pytest.raises(InputError, match=f"bad\\.{kind}") as err:
        diff(bad, {"ok.w": torch.ones(2)})
    assert not isinstance(err.value, UnknownNameError)
    with pytest.raises(InputError, match=f"bad\\.{kind}"):
        wsurgery.diff({"ok.w": torch.ones(2)}, bad)
    with pytest.raises(InputError, match=f"bad\\.{kind}"):
        check(bad, "ok.w", "ok.w")


# ----------------------------------------------------------------- options


def test_compare_options_are_checked_frozen_and_equal_to_keywords():
    a = {"x": rand(40), "y": rand(3)}
    b = {"x": rand(40) + 1e-4 * rand(40, seed=1), "y": rand(3)}
    opts = CompareOptions(max_rel_l2=1e-3, by_module=1)
    assert diff(a, b, opts).to_dict() == diff(a, b, max_rel_l2=1e-3, by_module=1).to_dict()
    assert diff(a, b, opts, max_rel_l2=1e-9).to_dict() == diff(a, b, max_rel_l2=1e-9, by_module=1).to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.atol = 1.0  # type: ignore[misc]
    for field, value in [("atol", -1), ("rtol", math.inf), ("max_rel_l2", "x"), ("min_cosine", 2.0),
                         ("by_module", 0), ("tuning", 3), ("filter", 7)]:  # fmt: skip
        with pytest.raises(UsageError) as err:
            CompareOptions(**{field: value})
        assert err.value.param == field
    with pytest.raises(UsageError) as err:
        diff(a, b, atoll=1.0)
    assert err.value.param == "atoll"
    with pytest.raises(UsageError) as err:
        check(a, "x", "x", options=CompareOptions(filter="x"))
    assert err.value.param == "filter"


def test_the_mapper_receives_every_pair_and_compare_never_imports_distributed():
    a = {"x": rand(10), "y": rand(4), "z": rand(2)}
    b = {"x": rand(10), "y": rand(4, seed=2), "z": rand(2)}
    seen = []

    def mapper(items, size, compute, *, skipped=None):
        seen.append([size(x) for x in items])
        return [compute(x) for x in reversed(items)][::-1]  # any order of work, results in order

    assert diff(a, b, mapper=mapper).to_dict() == diff(a, b).to_dict()
    assert seen == [[80, 32, 16]]
    for path in (ROOT / "wsurgery" / "compare").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "distributed" not in (node.module or ""), path
            if isinstance(node, ast.Import):
                assert not any("wsurgery.distributed" in n.name for n in node.names), path


def test_the_filter_is_the_name_selector():
    a = {"enc.w": torch.ones(2), "enc.b": torch.ones(1), "dec.w": torch.ones(2)}
    b = {"enc.w": torch.ones(2), "enc.b": torch.zeros(1), "dec.w": torch.zeros(2)}
    assert [c.name for c in diff(a, b, filter="enc").changed] == ["enc.b"]  # a module prefix
    assert diff(a, b, filter="enc.w").same == 1  # an exact name
    assert {c.name for c in diff(a, b, filter="*.w").changed} == {"dec.w"}  # a glob
    with pytest.raises(UnknownNameError) as err:
        diff(a, b, filter="encc")
    assert "enc.w" in err.value.candidates or "enc.b" in err.value.candidates


# ------------------------------------------------------------------- cores


def test_compare_threads_share_the_node_cores_among_local_ranks(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert Tuning.detect().workers == 4  # capped
    assert Tuning.detect(local_ranks=2).workers == 4
    assert Tuning.detect(local_ranks=4).workers == 2
    assert Tuning.detect(local_ranks=16).workers == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert api.compare_tuning() == Tuning(workers=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert api.compare_tuning() == Tuning(workers=4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    used = []
    real = wsurgery.compare.pipeline.compare_flat

    def spy(*args, **kwargs):
        used.append(kwargs["tuning"])
        return real(*args, **kwargs)

    monkeypatch.setattr(wsurgery.compare.pipeline, "compare_flat", spy)
    wsurgery.diff({"x": torch.ones(3)}, {"x": torch.zeros(3)})
    wsurgery.check({"x": torch.ones(3)}, "x", "x")
    assert used == [Tuning(workers=1), Tuning(workers=1)]


# ------------------------------------------------------------ unbounded first


def test_a_tensor_that_gained_a_nan_sorts_first_everywhere_and_has_no_cosine():
    n = 1000
    a = {"all_moved": rand(n), "one_nan": rand(n, seed=1), "shape": torch.ones(3)}
    b = {"all_moved": a["all_moved"] + 0.5, "one_nan": a["one_nan"].clone(), "shape": torch.ones(4)}
    b["one_nan"][7] = math.nan
    report = diff(a, b)
    assert [c.name for c in report.changed] == ["one_nan", "shape", "all_moved"]
    first = report.changed[0]
    assert first.unbounded and first.stats.rel_l2 == math.inf and first.stats.cosine is None
    d = json.loads(report.to_json())
    assert [c["name"] for c in d["changed"]] == ["one_nan", "shape", "all_moved"]
    assert d["changed"][0]["cosine"] is None and d["changed"][0]["rel_l2"] == "Infinity"
    assert report.changed[2].stats.cosine is not None  # a bounded change keeps its cosine
    with pytest.raises(AssertionError) as err:
        assert_checkpoint_equal(a, b)
    lines = str(err.value).splitlines()
    assert "one_nan" in lines[1] and "NaN or infinity" in lines[1] and "cosine" not in lines[1]
    module = diff(a, b, by_module=1).modules
    assert [(m.name, m.rel_l2, m.cosine) for m in module] == [("", math.inf, None)]
