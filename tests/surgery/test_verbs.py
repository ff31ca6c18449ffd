"""The surgery verbs beyond tie/copy/untie (rename, drop, keep, cast, concat, split, stack,
unstack), through the library and the command line; typo checks and tie --verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import wsurgery
from wsurgery.errors import SurgeryError, UnknownNameError, UsageError

# ----------------------------------------------------------------------------- factories


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def model_sd(layers: int = 3) -> dict[str, torch.Tensor]:
    """A small transformer-like state dict with a DDP prefix, a tied head and an int buffer."""
    sd = {"module.embed.weight": rand(10, 4, seed=1), "module.norm.weight": rand(4, seed=2)}
    for i in range(layers):
        sd[f"module.layers.{i}.q.weight"] = rand(4, 4, seed=10 + i)
        sd[f"module.layers.{i}.k.weight"] = rand(4, 4, seed=20 + i)
        sd[f"module.layers.{i}.v.weight"] = rand(4, 4, seed=30 + i)
        sd[f"module.layers.{i}.fc.weight"] = rand(8, 4, seed=40 + i)
        sd[f"module.layers.{i}.fc.bias"] = rand(8, seed=50 + i)
    sd["module.steps"] = torch.tensor([7], dtype=torch.int64)
    return sd


def write(tmp_path: Path, sd=None, name="m.safetensors", aliases=None) -> Path:
    path = tmp_path / name
    wsurgery.save_state_dict(model_sd() if sd is None else sd, path, aliases=aliases)
    return path


def tied(tmp_path: Path) -> Path:
    """model_sd with module.head.weight = module.embed.weight (same) and a transposed tie."""
    return write(
        tmp_path,
        aliases={
            "module.head.weight": ("module.embed.weight", []),
            "module.fc_t": ("module.layers.0.fc.weight", ["transpose"]),
        },
        name="tied.safetensors",
    )


def saved(ckpt, tmp_path: Path, name="out.safetensors") -> dict[str, torch.Tensor]:
    out = tmp_path / name
    ckpt.save(out, overwrite=True)
    return wsurgery.load_state_dict(out)


def problem(fn, *args, **kwargs) -> str:
    with pytest.raises(SurgeryError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------- rename


def test_rename_strips_a_prefix_with_groups_and_aliases_follow(tmp_path):
    with wsurgery.open(tied(tmp_path)) as c:
        r = c.rename(r"^module\.(.*)$", r"\1")
        assert "embed.weight" in r and "module.embed.weight" not in r
        assert r.aliases["head.weight"].source == "embed.weight"
        assert r.aliases["fc_t"].source == "layers.0.fc.weight"
        sd = saved(r, tmp_path)
    src = model_sd()
    assert torch.equal(sd["embed.weight"], src["module.embed.weight"])
    assert sd["head.weight"].data_ptr() == sd["embed.weight"].data_ptr()  # still a tie
    assert torch.equal(sd["fc_t"], src["module.layers.0.fc.weight"].t())


def test_rename_refuses_two_names_onto_one_a_pattern_that_matches_nothing_and_a_bad_regex(tmp_path):
    with wsurgery.open(write(tmp_path)) as c:
        text = problem(c.rename, r"\.(q|k)\.", ".qk.")
        assert "would all become" in text and "module.layers.0.q.weight" in text
        with pytest.raises(UnknownNameError, match="matches no name"):  # nothing selected: exit 3, as every verb
            c.rename("^nothing", "x")
        assert "not a valid regular expression" in problem(c.rename, "(", "x")


def test_a_chain_of_renames_reads_nothing_and_costs_like_one(tmp_path):
    with wsurgery.open(write(tmp_path)) as c:
        r = c
        for _ in range(20):
            r = r.rename("^module", "module")  # a no-op
        assert r.keys() == c.keys() and r.stored == c.stored  # the very same entries, nothing copied


# ----------------------------------------------------------------------------- drop / keep


def test_drop_by_glob_and_prefix_and_keep(tmp_path):
    with wsurgery.open(write(tmp_path)) as c:
        d = c.drop(["module.layers.2", "*.bias"])
        assert not any(n.startswith("module.layers.2.") or n.endswith(".bias") for n in d.keys())
        k = c.keep("module.layers.0")
        assert set(k.keys()) == {n for n in c.keys() if n.startswith("module.layers.0.")}
        with pytest.raises(UnknownNameError, match="matches no tensor name"):
            c.drop("nope.*")


def test_a_source_that_an_alias_still_uses_cannot_be_dropped(tmp_path):
    with wsurgery.open(tied(tmp_path)) as c:
        text = problem(c.drop, "module.embed.weight")
        assert "module.head.weight" in text
        both = c.drop(["module.embed.weight", "module.head.weight"])
        assert "module.embed.weight" not in both and "module.head.weight" not in both
        assert "module.head.weight" in problem(c.keep, ["module.head.weight"])


# ----------------------------------------------------------------------------- cast


def test_cast_casts_floats_only_and_ties_survive(tmp_path):
    with wsurgery.open(tied(tmp_path)) as c:
        r = c.cast("bfloat16", exclude=["*norm*"])
        assert r.aliases["module.head.weight"].dtype == "bfloat16"
        sd = saved(r, tmp_path)
    src = model_sd()
    assert sd["module.steps"].dtype == torch.int64 and sd["module.norm.weight"].dtype == torch.float32
    assert torch.equal(sd["module.embed.weight"], src["module.embed.weight"].to(torch.bfloat16))
    assert sd["module.head.weight"].data_ptr() == sd["module.embed.weight"].data_ptr()
    assert torch.equal(sd["module.fc_t"], src["module.layers.0.fc.weight"].to(torch.bfloat16).t())


def test_cast_refuses_a_tie_group_its_globs_split_and_a_non_float_dtype(tmp_path):
    with wsurgery.open(tied(tmp_path)) as c:
        text = problem(c.cast, "float16", only=["module.head.*"])
        assert "module.embed.weight" in text and "module.head.weight" in text
        assert "not a floating dtype" in problem(c.cast, "int8")


# ----------------------------------------------------------------------------- concat / split


def test_concat_and_split_round_trip_qkv(tmp_path):
    src = model_sd()
    names = [f"module.layers.0.{p}.weight" for p in "qkv"]
    with wsurgery.open(write(tmp_path)) as c:
        fused = c.concat(names, "module.layers.0.qkv.weight", 0)
        assert not any(n in fused for n in names)
        sd = saved(fused, tmp_path, "fused.safetensors")
        assert torch.equal(sd["module.layers.0.qkv.weight"], torch.cat([src[n] for n in names]))
        back = fused.split("module.layers.0.qkv.weight", names, 0, [4, 4, 4])
        saved(back, tmp_path, "back.safetensors")
    assert wsurgery.diff(tmp_path / "m.safetensors", tmp_path / "back.safetensors").equal


def test_concat_along_a_later_dim_and_of_aliases(tmp_path):
    src = model_sd()
    with wsurgery.open(tied(tmp_path)) as c:
        r = c.untie("module.fc_t").concat(
            ["module.layers.0.fc.weight", "module.layers.1.fc.weight"], "wide", 1, new=True
        )
        sd = saved(r, tmp_path)
    want = torch.cat([src["module.layers.0.fc.weight"], src["module.layers.1.fc.weight"]], 1)
    assert torch.equal(sd["wide"], want)


def test_concat_and_split_refusals(tmp_path):
    with wsurgery.open(tied(tmp_path)) as c:
        assert "must agree" in problem(c.concat, ["module.embed.weight", "module.norm.weight"], "x")
        assert "module.head.weight" in problem(c.concat, ["module.embed.weight", "module.layers.0.q.weight"], "x", 0)
        assert "add up to 9" in problem(c.split, "module.layers.0.fc.weight", ["a", "b"], 0, [4, 5])
        with pytest.raises(UnknownNameError):
            c.concat(["nope", "module.norm.weight"], "x")
        with pytest.raises(UsageError):
            c.concat(["module.norm.weight"], "x")


# ----------------------------------------------------------------------------- stack / unstack


def test_stack_and_unstack_module_prefixes_round_trip(tmp_path):
    src = model_sd()
    with wsurgery.open(write(tmp_path)) as c:
        s = c.stack("module.layers.{i}", "module.stacked")
        assert s.shape_dtype("module.stacked.fc.weight") == ((3, 8, 4), "float32")
        sd = saved(s, tmp_path, "stacked.safetensors")
        assert torch.equal(
            sd["module.stacked.q.weight"], torch.stack([src[f"module.layers.{i}.q.weight"] for i in range(3)])
        )
        u = s.unstack("module.stacked", "module.layers.{i}")
        saved(u, tmp_path, "unstacked.safetensors")
    assert wsurgery.diff(tmp_path / "m.safetensors", tmp_path / "unstacked.safetensors").equal


def test_stack_one_tensor_name_on_a_later_axis(tmp_path):
    src = model_sd()
    with wsurgery.open(write(tmp_path)) as c:
        s = c.stack("module.layers.{i}.fc.bias", "biases", dim=1, new=True)
        sd = saved(s, tmp_path)
    assert torch.equal(sd["biases"], torch.stack([src[f"module.layers.{i}.fc.bias"] for i in range(3)], 1))


def test_stack_refuses_gaps_and_templates_without_i(tmp_path):
    with wsurgery.open(write(tmp_path)) as c:
        gap = c.drop("module.layers.1")
        assert "no i = 1" in problem(gap.stack, "module.layers.{i}", "s")
        assert "matches no tensor" in problem(c.stack, "nothing.{i}", "s")
        with pytest.raises(UsageError):
            c.stack("module.layers.0", "s")


# ----------------------------------------------------------------------------- typos and verify


def test_a_new_destination_one_edit_away_is_refused_unless_new(tmp_path):
    with wsurgery.open(write(tmp_path)) as c:
        text = problem(c.copy, "module.layers.0.q.weight", "module.layers.0.q.wieght")
        assert "module.layers.0.q.weight" in text
        with pytest.raises(SurgeryError) as info:
            c.copy("module.layers.0.q.weight", "module.layers.0.q.wieght")
        assert info.value.problems[0].new_name  # the fix (new=True) is data; each front end words it
        assert "typo" in problem(c.copy, "module.norm.weight", "Module.Norm.Weight")
        c.copy("module.layers.0.q.weight", "module.layers.0.q.wieght", new=True)
        c.copy("module.layers.0", "module.layers.12")  # a new layer, not a typo
        c.copy("module.layers.0.q.weight", "module.layers.0.k2.weight")


_WORDS = ["layers", "layer", "lyaers", "weight", "wieght", "Weight", "bias", "q", "k", "0", "1", "12", "norm", "nrom"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=4).map(".".join), max_size=30, unique=True),
    st.lists(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=4).map(".".join), min_size=1, max_size=5),
)
def test_close_names_are_those_found_by_comparing_every_pair(existing, fresh):
    from wsurgery.model import natural_key
    from wsurgery.surgery.ops import _one_edit, close_names

    found = close_names(existing, fresh)
    for n in fresh:
        every = {e for e in existing if (e != n and e.lower() == n.lower()) or _one_edit(n, e)}
        assert found[n] == sorted(every, key=natural_key)


def test_the_typo_check_of_many_long_names_holds_no_index_of_them(tmp_path):
    """1,200 names of about 4,000 characters (4.9 M in all): an index of every one-character
    deletion of every name would take some 20 GB; the check streams the names instead."""
    from safetensors.numpy import save_file

    from ..bounded import bounded

    names = [f"{'abcd.' * 800}layer{i:05d}.weight" for i in range(1200)]
    path = tmp_path / "long.safetensors"
    save_file({n: np.zeros(1, dtype=np.float32) for n in names}, str(path))
    typo = names[7].replace(".weight", ".wieght")
    r = bounded(cli=["copy", path, "--src", names[7], "--dst", typo, "-o", tmp_path / "o.safetensors"])
    assert r.returncode == 4, r.stderr
    assert "a typo?" in r.stderr and f"{names[7][-20:]}" in r.stderr
    assert r.peak_rss_mib is not None and r.peak_rss_mib < 600, r.peak_rss_mib


def test_tie_verify_dedupes_a_head_stored_twice_and_refuses_different_values(tmp_path):
    sd = model_sd()
    sd["module.head.weight"] = sd["module.embed.weight"].clone()
    path = write(tmp_path, sd)
    with wsurgery.open(path) as c:
        r = c.tie("module.embed.weight", "module.head.weight", verify=True)
        assert "module.head.weight" in r.aliases
        text = problem(c.tie, "module.embed.weight", "module.layers.0.fc.weight", ["slice(0,0,8)"], verify=True)
        assert "the values differ" in text
        c.tie("module.layers.0.q.weight", "module.layers.0.k.weight", verify=True, atol=10)


# ----------------------------------------------------------------------------- the command line


def test_cli_verbs_chain_on_files(tmp_path, cli):
    m = write(tmp_path)
    steps = [
        ("rename", m, r"^module\.", "", "-o", tmp_path / "1.safetensors"),
        ("drop", tmp_path / "1.safetensors", "*.bias", "-o", tmp_path / "2.safetensors"),
        ("cast", tmp_path / "2.safetensors", "bfloat16", "--except", "*norm*", "-o", tmp_path / "3.safetensors"),
        (
            "concat",
            tmp_path / "3.safetensors",
            *("--src", "layers.0.q.weight", "--src", "layers.0.k.weight", "--src", "layers.0.v.weight"),
            *("--dst", "layers.0.qkv.weight", "-o", tmp_path / "4.safetensors"),
        ),
        (
            "stack",
            tmp_path / "4.safetensors",
            "--src",
            "layers.{i}.fc.weight",
            "--dst",
            "fc.weight",
            "--new",
            "-o",
            tmp_path / "5.safetensors",
        ),
        ("keep", tmp_path / "5.safetensors", "fc.weight", "embed.weight", "-o", tmp_path / "6.safetensors"),
    ]
    for args in steps:
        code, out, err = cli(*args)
        assert code == 0, (args, err)
    got = load_file(tmp_path / "6.safetensors")
    src = model_sd()
    assert set(got) == {"fc.weight", "embed.weight"}
    want = torch.stack([src[f"module.layers.{i}.fc.weight"] for i in range(3)]).to(torch.bfloat16)
    assert torch.equal(got["fc.weight"], want)


def test_cli_split_unstack_and_json(tmp_path, cli):
    m = write(tmp_path)
    code, out, err = cli(
        "split",
        m,
        "--src",
        "module.layers.0.fc.weight",
        "--dst",
        "module.a",
        "--dst",
        "module.b",
        "--sizes",
        "3,5",
        "--new",
        "-o",
        tmp_path / "s.safetensors",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["schema"] == "wsurgery.split/1" and [p["dst"] for p in report["plan"]] == ["module.a", "module.b"]
    code, out, err = cli("split", m, "--src", "module.layers.0.fc.weight", "--dst", "module.a", "--sizes", "3,x")
    assert code == 2 and "--sizes" in err
    code, _, err = cli(
        "unstack",
        m,
        "--src",
        "module.layers.0.fc.weight",
        "--dst",
        "row.{i}",
        "--new",
        "-o",
        tmp_path / "u.safetensors",
    )
    assert code == 0, err
    assert len([n for n in load_file(tmp_path / "u.safetensors") if n.startswith("row.")]) == 8


def test_cli_copy_applies_every_pair_in_order_and_counts_must_match(tmp_path, cli):
    """The reproducer: two --src/--dst pairs used to apply only the last one."""
    m = write(tmp_path)
    out = tmp_path / "o.safetensors"
    code, _, err = cli(
        "copy",
        m,
        "--src",
        "module.layers.1",
        "--dst",
        "module.layers.2",
        "--src",
        "module.layers.0",
        "--dst",
        "module.layers.3",
        "-o",
        out,
    )
    assert code == 0, err
    got, src = load_file(out), model_sd()
    assert torch.equal(got["module.layers.2.q.weight"], src["module.layers.1.q.weight"])
    assert torch.equal(got["module.layers.3.q.weight"], src["module.layers.0.q.weight"])
    code, _, err = cli("copy", m, "--src", "module.layers.1", "--src", "module.layers.0", "--dst", "module.layers.2")
    assert code == 2 and "2 sources but 1 destinations" in err


def test_cli_readme_example_cast_copy_in_place(tmp_path, cli):
    """The README's own example used to exit 4: a copy onto the same name with a cast replaces it."""
    m = write(tmp_path)
    code, _, err = cli(
        "copy", m, "--src", "module.embed.weight", "--dst", "module.embed.weight", "-t", "cast(bfloat16)", "--in-place"
    )
    assert code == 0, err
    assert load_file(m)["module.embed.weight"].dtype == torch.bfloat16


def test_cli_typo_needs_new_and_tie_verify(tmp_path, cli):
    m = write(tmp_path)
    code, _, err = cli(
        "copy", m, "--src", "module.norm.weight", "--dst", "module.norm.wieght", "-o", tmp_path / "o.safetensors"
    )
    assert code == 4 and "--new" in err and "module.norm.weight" in err
    code, _, err = cli(
        "copy",
        m,
        "--src",
        "module.norm.weight",
        "--dst",
        "module.norm.wieght",
        "--new",
        "-o",
        tmp_path / "o.safetensors",
    )
    assert code == 0, err
    code, _, err = cli(
        "tie", m, "--src", "module.layers.0.q.weight", "--dst", "module.layers.0.k.weight", "--verify", "-n"
    )
    assert code == 4 and "the values differ" in err


@pytest.mark.parametrize(
    "args",
    [
        ("drop", "module.embed.weight"),
        ("keep", "module.head.weight"),
        ("concat", "--src", "module.embed.weight", "--src", "module.embed.weight", "--dst", "x2"),
        ("cast", "float16", "--only", "module.head.*"),
    ],
)
def test_cli_refusals_that_would_break_a_tie_name_the_alias(tmp_path, cli, args):
    path = tied(tmp_path)
    before = path.read_bytes()
    code, _, err = cli(args[0], path, *args[1:], "-o", tmp_path / "o.safetensors")
    assert code == 4 and "module.head.weight" in err and len(err.strip().splitlines()) == 1
    assert path.read_bytes() == before and not (tmp_path / "o.safetensors").exists()
