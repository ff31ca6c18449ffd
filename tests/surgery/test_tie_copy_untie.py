"""Tests for wsurgery.surgery: tie, copy and untie plans, validated whole, applied lazily."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import wsurgery
from wsurgery import surgery
from wsurgery.cli.output import summary
from wsurgery.dtypes import BY_NAME
from wsurgery.errors import SurgeryError, TransformError, UnknownNameError, UsageError
from wsurgery.expressions import ComputedStored
from wsurgery.io.safetensors import FileStored
from wsurgery.transforms import parse

# ----------------------------------------------------------------------------- factories


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def model_sd(seed=0) -> dict[str, torch.Tensor]:
    """A small state dict with tensors of several ranks; no two share storage."""
    return {
        "emb.weight": rand(6, 4, seed=seed),
        "proj.weight": rand(6, 4, seed=seed + 1),
        "enc.weight": rand(3, 4, seed=seed + 2),
        "dec.weight": rand(4, 3, seed=seed + 3),
        "conv.weight": rand(2, 3, 4, seed=seed + 4),
        "blocks.0.w": rand(4, 4, seed=seed + 5),
        "blocks.0.b": rand(4, seed=seed + 6),
        "blocks.1.w": rand(4, 4, seed=seed + 7),
        "blocks.1.b": rand(4, seed=seed + 8),
        "bias": rand(4, seed=seed + 9),
    }


def write(tmp_path: Path, sd, name="model.safetensors", aliases=None) -> Path:
    path = tmp_path / name
    wsurgery.save_state_dict(sd, path, aliases=aliases)
    return path


def tied_file(tmp_path: Path, name="tied.safetensors") -> Path:
    """proj = emb (same), dec = transpose(enc), head = slice(0,0,3)(emb)."""
    sd = model_sd()
    del sd["proj.weight"], sd["dec.weight"]
    return write(
        tmp_path,
        sd,
        name,
        aliases={
            "proj.weight": ("emb.weight", []),
            "dec.weight": ("enc.weight", ["transpose"]),
            "head.weight": ("emb.weight", ["slice(0,0,3)"]),
        },
    )


def header_metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def shares_storage(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def bit_equal(a, b) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def run_plan(ckpt, reqs, **kwargs):
    """One plan of several requests, applied: ``[(kind, src, dst, specs), ...]``."""
    return surgery.plan(ckpt, [surgery.Request(*r) for r in reqs], **kwargs).apply()


def problem_of(fn, *args, **kwargs) -> str:
    with pytest.raises(SurgeryError) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    return text


@pytest.fixture
def ck(tmp_path):
    c = wsurgery.load(write(tmp_path, model_sd()))
    yield c
    c.close()


@pytest.fixture
def tied(tmp_path):
    c = wsurgery.load(tied_file(tmp_path))
    yield c
    c.close()


# ----------------------------------------------------------------------------- ties: every view step

VIEW_CASES = [
    ("emb.weight", ["same"], (6, 4)),
    ("emb.weight", ["SAME"], (6, 4)),
    ("emb.weight", ["transpose"], (4, 6)),
    ("emb.weight", ["TRANSPOSE"], (4, 6)),
    ("conv.weight", ["transpose(0,2)"], (4, 3, 2)),
    ("conv.weight", ["transpose(-1,-2)"], (2, 4, 3)),
    ("conv.weight", ["permute(2,0,1)"], (4, 2, 3)),
    ("emb.weight", ["reshape(-1)"], (24,)),
    ("conv.weight", ["reshape(6,-1)"], (6, 4)),
    ("emb.weight", ["slice(0,1,4)"], (3, 4)),
    ("emb.weight", ["slice(1,-2)"], (6, 2)),
    ("emb.weight", ["reshape(3,2,4)", "permute(1,2,0)", "slice(0,1,2)"], (1, 4, 3)),
    ("emb.weight", ["slice(0,2,6)", "reshape(16)"], (16,)),
    ("emb.weight", ["transpose", "slice(0,0,2)"], (2, 6)),
]


@pytest.mark.parametrize(("src", "specs", "shape"), VIEW_CASES, ids=[" ".join(c[1]) for c in VIEW_CASES])
def test_tie_each_view_step_infers_applies_and_round_trips(tmp_path, ck, src, specs, shape):
    p = ck.tie(src, "alias.weight", specs)
    op = p.changes[0]
    canonical = parse(specs).specs()
    assert (op.kind, op.base, op.value.shape, op.value.transform.specs()) == ("tie", src, shape, canonical)
    assert p.aliases["alias.weight"].shape == shape
    out = tmp_path / "out.safetensors"
    p.save(out)

    record = json.loads(header_metadata(out)["wsurgery.aliases"])["alias.weight"]
    assert record == {"source": src, "transform": canonical}
    assert ("alias.weight" in header_metadata(out)) == (canonical == [])
    back = wsurgery.load(out)
    assert back.aliases["alias.weight"].specs == canonical
    back.close()

    sd = wsurgery.load_state_dict(out)
    expected = parse(specs).apply(model_sd()[src])
    assert tuple(sd["alias.weight"].shape) == shape
    assert torch.equal(sd["alias.weight"], expected)
    assert shares_storage(sd["alias.weight"], sd[src])
    assert "alias.weight" not in load_file(out)


_VIEW_STEP = st.one_of(
    st.tuples(st.integers(-2, 2), st.integers(-2, 2)).map(lambda d: f"transpose({d[0]},{d[1]})"),
    st.permutations([0, 1, 2]).map(lambda p: f"permute({','.join(map(str, p))})"),
    st.permutations([0, 1]).map(lambda p: f"permute({','.join(map(str, p))})"),
    st.sampled_from(["reshape(-1)", "reshape(2,-1)", "reshape(-1,2)", "reshape(3,-1)", "reshape(2,-1,2)"]),
    st.tuples(st.integers(-2, 2), st.integers(0, 2), st.integers(0, 4)).map(lambda a: f"slice({a[0]},{a[1]},{a[2]})"),
)


@settings(max_examples=80, deadline=None)
@given(shape=st.sampled_from([(4, 6), (6, 4), (2, 3, 4), (24,), (4, 3, 2)]), specs=st.lists(_VIEW_STEP, max_size=3))
def test_a_tie_is_planned_exactly_when_torch_can_view_it_and_loads_as_that_view(shape, specs):
    t = torch.arange(24.0).reshape(shape)
    c = wsurgery.Checkpoint.from_state_dict({"a": t})
    try:
        expected = parse(specs).apply(t)  # view-only chains refuse to copy
    except TransformError:
        expected = None
    if expected is None:
        with pytest.raises(SurgeryError):
            c.tie("a", "v", specs)
        return
    p = c.tie("a", "v", specs)
    assert p.aliases["v"].shape == tuple(expected.shape)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "o.safetensors"
        p.save(out)
        sd = wsurgery.load_state_dict(out)
    assert torch.equal(sd["v"], expected) and shares_storage(sd["v"], sd["a"])


@pytest.mark.parametrize("step", ["cast(bfloat16)", "scale(0.5)"])
def test_tie_refuses_a_non_view_step_and_names_it(ck, step):
    text = problem_of(ck.tie, "emb.weight", "x", ["transpose", step])
    assert step in text and "view steps only" in text
    with pytest.raises(SurgeryError) as info:
        ck.tie("emb.weight", "x", ["transpose", step])
    assert info.value.problems[0].use == "copy"  # the fix is data; each front end words it


def test_tie_refuses_a_chain_that_is_no_view_of_the_stored_source(ck):
    text = problem_of(ck.tie, "emb.weight", "x", ["transpose", "reshape(-1)"])
    assert "not a view" in text and "(4, 6)" in text and "(24)" in text


def test_tie_refuses_a_chain_through_an_alias_that_is_no_view(tied):
    # dec = transpose(enc); reshape(-1) of it would need a copy.
    text = problem_of(tied.tie, "dec.weight", "flat", ["reshape(-1)"])
    assert "transpose -> reshape(-1)" in text and "enc.weight" in text


def test_tie_onto_an_alias_resolves_to_the_stored_source_and_composes(tmp_path, tied):
    p = tied.tie("dec.weight", "top", ["slice(0,0,2)"])
    a = p.aliases["top"]
    assert (a.source, a.specs, a.shape) == ("enc.weight", ["transpose", "slice(0,0,2)"], (2, 3))
    out = tmp_path / "o.safetensors"
    p.save(out)
    sd = wsurgery.load_state_dict(out)
    assert torch.equal(sd["top"], sd["enc.weight"].t()[0:2])
    assert shares_storage(sd["top"], sd["enc.weight"])


def test_tie_replaces_an_existing_alias(tied):
    p = tied.tie("blocks.0.w", "dec.weight", ["slice(1,0,3)"])
    a = p.aliases["dec.weight"]
    assert (a.source, a.specs) == ("blocks.0.w", ["slice(1,0,3)"])
    assert p.changes[0].replaces and "was an alias of enc.weight" in p.changes[0].note


def test_tie_module_prefixes_map_every_tensor(ck):
    p = ck.tie("blocks.0", "blocks.1")
    assert {(o.src, o.dst) for o in p.changes} == {("blocks.0.w", "blocks.1.w"), ("blocks.0.b", "blocks.1.b")}
    assert set(p.aliases) == {"blocks.1.w", "blocks.1.b"}
    assert "blocks.1.w" not in p.stored


def test_tie_refuses_a_cycle(tied):
    # proj = emb; tying emb to proj would make emb an alias of itself.
    text = problem_of(tied.tie, "proj.weight", "emb.weight")
    assert "cycle" in text and "emb.weight" in text
    assert "cycle" in problem_of(tied.tie, "bias", "bias")


def test_tie_refuses_two_ties_with_one_destination(ck):
    text = problem_of(run_plan, ck, [("tie", "emb.weight", "x", []), ("tie", "proj.weight", "x", [])])
    assert "x is the destination of two steps" in text


def test_tie_refuses_a_source_replaced_in_the_same_plan(ck):
    text = problem_of(run_plan, ck, [("copy", "proj.weight", "emb.weight", []), ("tie", "emb.weight", "y", [])])
    assert "its source emb.weight is itself replaced" in text


def test_tie_onto_a_stored_tensor_with_aliases_is_refused(tied):
    text = problem_of(tied.tie, "blocks.0.w", "enc.weight", ["slice(0,0,3)"])
    assert "stored source of dec.weight" in text and "untie" in text


def test_tie_shape_misfit_shows_both_shapes_and_suggests_transpose(ck):
    text = problem_of(ck.tie, "enc.weight", "dec.weight")
    assert "(3, 4)" in text and "(4, 3)" in text
    with pytest.raises(SurgeryError) as info:
        ck.tie("enc.weight", "dec.weight")
    assert info.value.problems[0].suggest == ("transpose",)


def test_tie_dtype_misfit_names_both_dtypes(tmp_path):
    sd = {"a": rand(2, 2), "b": rand(2, 2, dtype=torch.float16)}
    c = wsurgery.load(write(tmp_path, sd))
    text = problem_of(c.tie, "a", "b")
    assert "float32 (2, 2)" in text and "float16 (2, 2)" in text


def test_bad_spec_names_the_step(ck):
    text = problem_of(ck.tie, "emb.weight", "x", ["transpose", "reshape(5,-1)"])
    assert "step 2 'reshape(5,-1)'" in text and "(4, 6)" in text and "emb.weight float32 (6, 4)" in text
    assert "unknown step 'flip'" in problem_of(ck.tie, "emb.weight", "x", ["flip"])


def test_every_problem_is_reported_at_once(ck):
    text = problem_of(
        run_plan,
        ck,
        [
            ("tie", "emb.weight", "enc.weight", []),
            ("copy", "conv.weight", "bias", ["reshape(5,-1)"]),
            ("tie", "emb.weight", "y", ["scale(2)"]),
        ],
    )
    assert text.startswith("3 problems: ")
    assert "enc.weight" in text and "reshape(5,-1)" in text and "scale(2.0)" in text


def test_prefix_onto_a_single_tensor_and_tensor_onto_a_prefix_are_refused(ck):
    assert "module prefix" in problem_of(ck.tie, "blocks.0", "bias")
    assert "blocks.1 is a module prefix" in problem_of(ck.copy, "bias", "blocks.1")


def test_empty_destination_names_are_refused_but_an_empty_prefix_maps_to_top_level(ck):
    assert "'' is not a tensor name" in problem_of(ck.copy, "bias", "")
    assert "'x.' is not a tensor name" in problem_of(ck.copy, "bias", "x.")
    p = ck.copy("blocks.1", "")
    assert {o.dst for o in p.changes} == {"w", "b"}


def test_unknown_source_is_an_input_error_with_close_matches(ck):
    with pytest.raises(UnknownNameError) as info:
        ck.copy("emb.wieght", "x")
    assert "emb.weight" in info.value.hint and info.value.candidates[0] == "emb.weight"


def test_unknown_kind_is_refused(ck):
    assert "unknown surgery step 'move'" in problem_of(run_plan, ck, [("move", "a", "b", [])])


# ----------------------------------------------------------------------------- copies


def test_copy_to_a_new_name_is_a_stored_independent_tensor(tmp_path, ck):
    p = ck.copy("emb.weight", "new.weight")
    assert "new.weight" in p.stored and not p.aliases
    assert summary(p)["copied"] == [
        {"src": "emb.weight", "dst": "new.weight", "source": "emb.weight", "from": None, "transform": []}
    ]
    out = tmp_path / "o.safetensors"
    p.save(out)
    sd = load_file(out)
    assert torch.equal(sd["new.weight"], sd["emb.weight"])
    assert "wsurgery.aliases" not in header_metadata(out)


@pytest.mark.parametrize("dtype", sorted(BY_NAME))
def test_copy_casts_to_every_stored_dtype(tmp_path, ck, dtype):
    p = ck.copy("emb.weight", "cast.weight", [f"cast({dtype})"])
    assert (p.changes[0].value.dtype, p.stored["cast.weight"].dtype) == (dtype, dtype)
    out = tmp_path / "o.safetensors"
    p.save(out)
    back = wsurgery.load_state_dict(out)["cast.weight"]
    assert bit_equal(back, model_sd()["emb.weight"].to(getattr(torch, dtype)))
    back2 = wsurgery.load(out)
    assert back2.stored["cast.weight"].dtype == dtype
    back2.close()


def test_copy_chain_with_scale_cast_and_a_copying_reshape(tmp_path, ck):
    specs = ["transpose", "reshape(-1)", "scale(2)", "cast(bfloat16)"]
    p = ck.copy("emb.weight", "flat", specs)
    assert (p.changes[0].value.shape, p.changes[0].value.dtype) == ((24,), "bfloat16")
    out = tmp_path / "o.safetensors"
    p.save(out)
    expected = (model_sd()["emb.weight"].t().reshape(-1) * 2).to(torch.bfloat16)
    assert torch.equal(load_file(out)["flat"], expected)


def test_copy_onto_an_existing_tensor_replaces_it_whatever_its_shape_or_dtype(tmp_path, ck):
    # the README's own example: a cast copy of a tensor onto itself
    p = ck.copy("emb.weight", "emb.weight", ["cast(bfloat16)"])
    assert p.changes[0].replaces and p.changes[0].note == "was float32 (6, 4)"
    p = p.copy("enc.weight", "dec.weight", ["reshape(-1)"])
    out = tmp_path / "o.safetensors"
    p.save(out)
    got = load_file(out)
    assert got["emb.weight"].dtype == torch.bfloat16
    assert torch.equal(got["emb.weight"], model_sd()["emb.weight"].to(torch.bfloat16))
    assert torch.equal(got["dec.weight"], model_sd()["enc.weight"].reshape(-1))


def test_copy_onto_an_alias_unties_it_and_leaves_the_source(tmp_path, tied):
    sd = model_sd()
    p = tied.copy("conv.weight", "proj.weight", ["reshape(6,4)"])
    assert "proj.weight" not in p.aliases and "proj.weight" in p.stored
    assert p.changes[0].note == "was an alias of emb.weight"
    out = tmp_path / "o.safetensors"
    p.save(out)
    meta = header_metadata(out)
    assert "proj.weight" not in json.loads(meta["wsurgery.aliases"]) and "proj.weight" not in meta
    loaded = wsurgery.load_state_dict(out)
    assert torch.equal(loaded["proj.weight"], sd["conv.weight"].reshape(6, 4))
    assert torch.equal(loaded["emb.weight"], sd["emb.weight"])
    assert torch.equal(loaded["head.weight"], sd["emb.weight"][0:3])  # still a live alias of emb
    assert shares_storage(loaded["head.weight"], loaded["emb.weight"])


def test_copy_onto_the_source_of_aliases_unties_them_first(tmp_path, tied):
    sd = model_sd()
    p = tied.copy("emb.weight", "emb.weight", ["scale(2)"])
    untied = [(o.dst, o.note) for o in p.changes if o.kind == "untie"]
    assert untied == [
        ("head.weight", "keeps its value (emb.weight is overwritten)"),
        ("proj.weight", "keeps its value (emb.weight is overwritten)"),
    ]
    assert set(p.aliases) == {"dec.weight"}
    assert [u["name"] for u in summary(p)["untied"]] == ["head.weight", "proj.weight"]
    out = tmp_path / "o.safetensors"
    p.save(out)
    loaded = load_file(out)
    assert torch.equal(loaded["emb.weight"], sd["emb.weight"] * 2)
    assert torch.equal(loaded["proj.weight"], sd["emb.weight"])
    assert torch.equal(loaded["head.weight"], sd["emb.weight"][0:3])


def test_copies_read_the_input_not_each_other(tmp_path, ck):
    sd = model_sd()
    p = run_plan(ck, [("copy", "blocks.0.w", "blocks.1.w", []), ("copy", "blocks.1.w", "blocks.0.w", [])])
    out = tmp_path / "o.safetensors"
    p.save(out)
    loaded = load_file(out)
    assert torch.equal(loaded["blocks.0.w"], sd["blocks.1.w"]) and torch.equal(loaded["blocks.1.w"], sd["blocks.0.w"])


def test_copy_module_prefix_creates_and_replaces(tmp_path, ck):
    p = ck.copy("blocks.0", "blocks.1", ["scale(-1)"])
    assert {o.dst for o in p.changes} == {"blocks.1.w", "blocks.1.b"} and all(o.replaces for o in p.changes)
    p2 = ck.copy("blocks.0", "extra.0")
    assert {o.dst for o in p2.changes} == {"extra.0.w", "extra.0.b"} and not any(o.replaces for o in p2.changes)
    out = tmp_path / "o.safetensors"
    p.save(out)
    assert torch.equal(load_file(out)["blocks.1.b"], -model_sd()["blocks.0.b"])


def test_copy_from_another_checkpoint_with_an_alias_source_and_prefixes(tmp_path, ck, fixtures):
    other = wsurgery.load(fixtures / "shared_storage.pt")  # decoder = transpose(encoder), projection = embedding
    p = ck.copy("decoder.weight", "dec.new", ["slice(1,0,3)"], other=other)
    op = p.changes[0]
    assert (op.base, op.value.specs, op.origin) == ("encoder.weight", ["transpose", "slice(1,0,3)"], other.path)
    assert set(p.input_files) == set(ck.input_files) | set(other.input_files)
    out = tmp_path / "o.safetensors"
    p.save(out)
    theirs = torch.load(fixtures / "shared_storage.pt", weights_only=True)
    assert torch.equal(load_file(out)["dec.new"], theirs["decoder.weight"][:, 0:3])

    sharded = wsurgery.load(fixtures / "tiny_lm_sharded")
    p = ck.copy("layers.1.mlp", "blocks.9", ["cast(float16)"], other=sharded)
    assert {o.dst for o in p.changes} == {"blocks.9.up.weight", "blocks.9.down.weight"}
    p.save(out, overwrite=True)
    lm = load_file(fixtures / "tiny_lm.safetensors")
    assert torch.equal(load_file(out)["blocks.9.down.weight"], lm["layers.1.mlp.down.weight"].half())
    other.close()
    sharded.close()


def test_a_copy_of_an_in_memory_tensor_owns_its_bytes():
    base = rand(4, 4)
    c = wsurgery.Checkpoint.from_state_dict({"a": base, "b": rand(4, 4, seed=1)})
    for specs in ([], ["slice(0,0,2)"], ["reshape(16)"]):
        p = c.copy("a", "c" + str(len(specs)), specs)
        t = p.tensor(p.changes[0].dst)
        assert torch.equal(t, parse(specs).apply(base)) and not shares_storage(t, base)
    p = wsurgery.Checkpoint.from_state_dict({"a": base}, aliases={"v": ("a", ["slice(0,1,3)"])}).untie()
    assert not shares_storage(p.tensor("v"), base)


# ----------------------------------------------------------------------------- untie


def test_untie_all_by_default(tmp_path, tied):
    p = tied.untie()
    assert {o.dst for o in p.changes} == {"proj.weight", "dec.weight", "head.weight"}
    assert not p.aliases
    out = tmp_path / "o.safetensors"
    p.save(out)
    meta = header_metadata(out)
    assert "wsurgery.aliases" not in meta and not (set(meta) & {"proj.weight", "dec.weight", "head.weight"})
    sd = load_file(out)
    src = model_sd()
    assert torch.equal(sd["dec.weight"], src["enc.weight"].t())
    assert torch.equal(sd["head.weight"], src["emb.weight"][0:3])
    assert torch.equal(sd["proj.weight"], src["emb.weight"])


def test_untie_named_stored_and_prefix_names(tied):
    assert [o.dst for o in tied.untie(["dec.weight"]).changes] == ["dec.weight"]
    # a stored name unties every alias of it
    p = tied.untie(["emb.weight"])
    assert [(o.dst, o.note) for o in p.changes] == [
        ("head.weight", "tied to emb.weight"),
        ("proj.weight", "tied to emb.weight"),
    ]
    assert set(p.aliases) == {"dec.weight"}
    # a prefix and a name that overlap untie once
    p = tied.untie(["dec", "dec.weight"])
    assert [o.dst for o in p.changes] == ["dec.weight"]


def test_untie_of_an_untied_name_is_refused_and_unknown_is_an_input_error(tied):
    assert "no alias points at it" in problem_of(tied.untie, ["bias"])
    assert "no tensor under the module prefix 'blocks'" in problem_of(tied.untie, ["blocks"])
    text = problem_of(tied.untie, ["bias", "blocks.0.b"])
    assert text.startswith("2 problems")
    with pytest.raises(UnknownNameError):
        tied.untie(["nope"])


def test_untie_of_a_checkpoint_without_aliases_is_a_plain_rewrite(ck):
    p = ck.untie()
    assert p.changes == [] and set(p.stored) == set(ck.stored)


def test_untie_and_tie_in_one_plan_on_the_same_alias_conflict(tied):
    text = problem_of(run_plan, tied, [("untie", None, "proj.weight", None), ("tie", "emb.weight", "proj.weight", [])])
    assert "proj.weight is the destination of two steps" in text


# ----------------------------------------------------------------------------- laziness and raw bytes


def test_planning_reads_no_tensor_data(monkeypatch, tied, fixtures):
    def boom(self, *a, **k):
        raise AssertionError(f"data of {self.name} read while planning")

    monkeypatch.setattr(FileStored, "tensor", boom)
    monkeypatch.setattr(FileStored, "raw", boom)
    other = wsurgery.load(fixtures / "tiny_lm_sharded")
    p = run_plan(
        tied,
        [
            ("copy", "layers.0.mlp", "blocks.0", ["transpose", "cast(bfloat16)"]),
        ],
        other=other,
    )
    assert {o.dst for o in p.changes} == {"blocks.0.up.weight", "blocks.0.down.weight"}
    shapes = {n: (s.shape, s.dtype) for n, s in p.stored.items() if n.startswith(("blocks.0.up", "blocks.0.down"))}
    assert shapes == {"blocks.0.up.weight": ((8, 16), "bfloat16"), "blocks.0.down.weight": ((16, 8), "bfloat16")}
    tied.untie()
    tied.tie("conv.weight", "v", ["permute(2,1,0)", "slice(0,0,2)"])
    other.close()


@pytest.mark.parametrize(
    "make_plan",
    [
        lambda c: c.tie("emb.weight", "proj.weight"),
        lambda c: c.copy("emb.weight", "proj.weight"),
        lambda c: c.copy("blocks.0", "blocks.1"),
        lambda c: c.untie(),
    ],
    ids=["tie", "copy", "copy-prefix", "untie-same"],
)
def test_untouched_and_untransformed_tensors_are_copied_as_raw_bytes(tmp_path, monkeypatch, make_plan):
    sd = model_sd()
    path = write(tmp_path, sd, aliases={"alias": ("bias", [])})
    c = wsurgery.load(path)
    p = make_plan(c)

    def boom(self, *a, **k):
        raise AssertionError(f"{self.name} was decoded")

    monkeypatch.setattr(FileStored, "tensor", boom)
    out = tmp_path / "o.safetensors"
    p.save(out)
    monkeypatch.undo()
    loaded = wsurgery.load_state_dict(out)
    for name in ("enc.weight", "conv.weight", "blocks.0.w", "bias"):
        assert torch.equal(loaded[name], sd[name])
    c.close()


def test_a_transformed_copy_decodes_only_its_source(tmp_path, monkeypatch, ck):
    read = []
    real_tensor, real_raw = FileStored.tensor, FileStored.raw

    def spy_tensor(self, device="cpu"):  # the torch path
        read.append(self.name)
        return real_tensor(self, device)

    def spy_raw(self):  # the numpy path (this one: float32 transpose and scale)
        read.append(self.name)
        return real_raw(self)

    monkeypatch.setattr(FileStored, "tensor", spy_tensor)
    monkeypatch.setattr(FileStored, "raw", spy_raw)
    p = ck.copy("enc.weight", "dec.weight", ["transpose", "scale(0.5)"])
    assert read == []
    p.save(tmp_path / "o.safetensors")
    assert read == ["enc.weight"]
    assert isinstance(p.stored["dec.weight"], ComputedStored)


def test_the_same_surgery_twice_writes_identical_bytes(tmp_path, fixtures):
    outs = []
    for i in range(2):
        c = wsurgery.load(fixtures / "tiny_lm.pt")
        p = run_plan(
            c,
            [
                ("copy", "layers.0", "layers.1", ["scale(0.5)"]),
                ("tie", "embedding.weight", "projection.weight", []),
                ("tie", "layers.0.mlp.up.weight", "layers.0.mlp.down.weight", ["transpose"]),
                ("copy", "final_norm.weight", "extra.norm", ["cast(bfloat16)"]),
            ],
        )
        out = tmp_path / f"o{i}.safetensors"
        p.save(out)
        outs.append(out.read_bytes())
        c.close()
    assert outs[0] == outs[1]


# ----------------------------------------------------------------------------- devices


def test_device_is_validated_before_any_work(ck):
    with pytest.raises(UsageError, match="unknown device 'gpu0'"):
        ck.copy("emb.weight", "x", ["scale(2)"], device="gpu0")
    with pytest.raises(UsageError, match="not supported"):
        surgery.check_device("meta")
    assert surgery.check_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(ck):
    with pytest.raises(UsageError, match="CUDA is not available"):
        ck.copy("emb.weight", "x", ["scale(2)"], device="cuda")


def test_computed_copies_run_on_the_device_asked_for(monkeypatch, ck):
    seen = []
    real = ComputedStored._compute

    def spy(self, own=False):
        seen.append(self.device)
        return real(self, own)

    monkeypatch.setattr(ComputedStored, "_compute", spy)
    p = ck.copy("emb.weight", "x", ["scale(2)"], device="cpu")
    assert torch.equal(p.tensor("x"), model_sd()["emb.weight"] * 2)
    assert seen == ["cpu"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_copy_computed_on_cuda(tmp_path, ck):
    p = ck.copy("emb.weight", "x", ["transpose", "scale(2)", "cast(bfloat16)"], device="cuda")
    assert p.stored["x"].device == "cuda"
    t = p.tensor("x", device="cuda")
    assert t.device.type == "cuda"
    out = tmp_path / "o.safetensors"
    p.save(out)
    assert torch.equal(load_file(out)["x"], (model_sd()["emb.weight"].t() * 2).to(torch.bfloat16))


def test_tie_misfits_name_a_fix_that_never_undoes_what_was_asked():
    from wsurgery.surgery.ties import _misfit

    def fix(*args, **kwargs):
        p = _misfit("label", *args, **kwargs)
        return p.suggest, p.use

    assert fix((8, 8), "bfloat16", "d", (8, 8), "float32") == ((), "copy")  # a tie cannot cast
    assert fix((3, 8), "float32", "d", (8, 3), "float32") == (("transpose",), None)
    assert fix((3, 8), "float32", "d", (4, 6), "float32") == ((), None)
    # the user's own transpose made it misfit: no second transpose, no "drop it"
    p = _misfit("label", (3, 8), "float32", "d", (8, 3), "float32", source=((8, 3), "float32"))
    assert p.suggest == () and "the source itself is float32 (8, 3)" in p.message


def test_tie_misfit_on_the_command_line_states_the_facts(tmp_path, cli):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(8, 3), "b": torch.zeros(8, 3)}, str(path))
    code, _, err = cli("tie", path, "--src", "a", "--dst", "b", "-t", "transpose", "-o", tmp_path / "o.safetensors")
    assert code == 4 and "the source itself is float32 (8, 3)" in err
    assert "try --transform" not in err and "without" not in err
