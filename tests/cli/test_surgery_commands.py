"""Command-line tests for `wsurgery copy`, `tie` and `untie`: results, plans, refusals, interop."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model
from torch import nn

import wsurgery
from tests.conftest import run_module

# ----------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden temporaries included) with its hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def header_metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def shares_storage(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def ok(cli, *args) -> str:
    code, out, err = cli(*args)
    assert code == 0, err
    assert err == ""
    return out


def ok_json(cli, *args) -> dict:
    return json.loads(ok(cli, *args, "--json"))


def refused(cli, folder: Path, code: int, *args, json_out: bool = False) -> str:
    """Run a command that must fail: its exit code, one `error:` line, nothing written."""
    before = snapshot(folder)
    got, out, err = cli(*args, *(["--json"] if json_out else []))
    assert got == code, (got, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert snapshot(folder) == before
    if json_out:
        obj = json.loads(out)
        assert obj["error"]["exit_code"] == code and obj["schema"].startswith("wsurgery.")
    else:
        assert out == ""
    return lines[0]


def lm() -> dict[str, torch.Tensor]:
    return load_file(Path(__file__).resolve().parents[2] / "fixtures" / "tiny_lm.safetensors")


def shared() -> dict[str, torch.Tensor]:
    return torch.load(Path(__file__).resolve().parents[2] / "fixtures" / "shared_storage.pt", weights_only=True)


# ----------------------------------------------------------------------------- copy


def test_copy_with_a_transform_json(cli, fixtures):
    out = fixtures / "out.safetensors"
    obj = ok_json(
        cli,
        "copy",
        fixtures / "tiny_lm.safetensors",
        "--src",
        "embedding.weight",
        "--dst",
        "projection.weight",
        "-t",
        "scale(2)",
        "--transform",
        "cast(float32)",
        "-o",
        out,
    )
    assert obj["schema"] == "wsurgery.copy/1"
    assert obj["output"] == str(out) and obj["dry_run"] is False
    assert obj["stored"] == 15 and obj["aliases"] == [] and obj["untied"] == []
    assert obj["copied"] == [
        {
            "src": "embedding.weight",
            "dst": "projection.weight",
            "source": "embedding.weight",
            "from": None,
            "transform": ["scale(2.0)", "cast(float32)"],
        }
    ]
    assert obj["plan"][0]["shape"] == [32, 8] and obj["plan"][0]["dtype"] == "float32"
    got, src = load_file(out), lm()
    assert torch.equal(got["projection.weight"], src["embedding.weight"] * 2)
    assert torch.equal(got["layers.1.mlp.up.weight"], src["layers.1.mlp.up.weight"])


def test_copy_new_tensor_and_default_output_is_the_first_checkpoint(cli, fixtures):
    folder = fixtures / "solo"
    folder.mkdir()
    (folder / "m.pt").write_bytes((fixtures / "tiny_lm.pt").read_bytes())
    obj = ok_json(
        cli, "copy", folder / "m.pt", "--src", "layers.0.norm.weight", "--dst", "extra.norm", "-t", "cast(bf16)"
    )
    assert obj["output"] == str(folder / "m.safetensors")
    got = load_file(folder / "m.safetensors")
    assert got["extra.norm"].dtype == torch.bfloat16 and len(got) == 16


def test_copy_from_a_second_checkpoint_with_module_prefixes(cli, fixtures):
    out = fixtures / "out.safetensors"
    obj = ok_json(
        cli,
        "copy",
        fixtures / "tiny_lm.pt",
        "--from",
        fixtures / "lightning.ckpt",
        "--src",
        "model.layers.1",
        "--dst",
        "layers.0",
        "-o",
        out,
    )
    assert {c["dst"] for c in obj["copied"]} == {
        f"layers.0.{s}"
        for s in (
            "attn.qkv.weight",
            "attn.qkv.bias",
            "attn.out.weight",
            "mlp.up.weight",
            "mlp.down.weight",
            "norm.weight",
        )
    }
    assert all(c["from"] == str(fixtures / "lightning.ckpt") for c in obj["copied"])
    assert all(step["replaces"] for step in obj["plan"])
    theirs = torch.load(fixtures / "lightning.ckpt", weights_only=True)["state_dict"]
    got = load_file(out)
    assert torch.equal(got["layers.0.mlp.up.weight"], theirs["model.layers.1.mlp.up.weight"])
    assert torch.equal(got["layers.1.mlp.up.weight"], lm()["layers.1.mlp.up.weight"])

    # from a sharded checkpoint, into new names, transformed
    obj = ok_json(
        cli,
        "copy",
        fixtures / "tiny_lm.pt",
        "--from",
        fixtures / "tiny_lm_sharded",
        "--src",
        "layers.1.attn",
        "--dst",
        "cross.attn",
        "-t",
        "scale(0.5)",
        "-o",
        out,
        "--force",
    )
    assert len(obj["copied"]) == 3 and obj["stored"] == 18
    assert torch.equal(load_file(out)["cross.attn.qkv.bias"], lm()["layers.1.attn.qkv.bias"] * 0.5)


def test_copy_from_an_alias_of_the_second_checkpoint(cli, fixtures):
    out = fixtures / "out.safetensors"
    obj = ok_json(
        cli,
        "copy",
        fixtures / "tiny_lm.safetensors",
        "--from",
        fixtures / "shared_storage.pt",
        "--src",
        "decoder.weight",
        "--dst",
        "layers.0.mlp.down.weight",
        "-o",
        out,
    )
    assert obj["plan"][0]["source"] == "encoder.weight" and obj["plan"][0]["transform"] == ["transpose"]
    assert torch.equal(load_file(out)["layers.0.mlp.down.weight"], shared()["decoder.weight"])


def test_copy_onto_an_alias_unties_it(cli, fixtures):
    out = fixtures / "out.safetensors"
    obj = ok_json(
        cli,
        "copy",
        fixtures / "shared_storage.pt",
        "--src",
        "embedding.weight",
        "--dst",
        "projection.weight",
        "-t",
        "scale(-1)",
        "-o",
        out,
    )
    assert obj["plan"][0]["note"] == "was an alias of embedding.weight"
    assert [a["name"] for a in obj["aliases"]] == ["decoder.weight"]
    meta = header_metadata(out)
    assert "projection.weight" not in meta and "projection.weight" not in json.loads(meta["wsurgery.aliases"])
    got = load_file(out)
    assert torch.equal(got["projection.weight"], -shared()["embedding.weight"])
    assert torch.equal(got["embedding.weight"], shared()["embedding.weight"])


def test_copy_onto_the_source_of_an_alias_unties_the_alias_first(cli, fixtures):
    out = fixtures / "out.safetensors"
    obj = ok_json(
        cli,
        "copy",
        fixtures / "shared_storage.pt",
        "--src",
        "encoder.weight",
        "--dst",
        "encoder.weight",
        "-t",
        "scale(3)",
        "-o",
        out,
    )
    assert [(s["op"], s["dst"]) for s in obj["plan"]] == [("copy", "encoder.weight"), ("untie", "decoder.weight")]
    assert obj["untied"] == [{"name": "decoder.weight", "source": "encoder.weight", "transform": ["transpose"]}]
    got, src = load_file(out), shared()
    assert torch.equal(got["encoder.weight"], src["encoder.weight"] * 3)
    assert torch.equal(got["decoder.weight"], src["decoder.weight"])


def test_copy_dry_run_prints_the_plan_and_writes_nothing(cli, fixtures):
    before = snapshot(fixtures)
    out = ok(
        cli,
        "copy",
        fixtures / "tiny_lm.pt",
        "--from",
        fixtures / "tiny_lm_sharded",
        "--src",
        "layers.0.mlp",
        "--dst",
        "layers.1.mlp",
        "-t",
        "scale(2)",
        "-o",
        fixtures / "never.safetensors",
        "--dry-run",
    )
    assert snapshot(fixtures) == before
    assert "plan" in out and "would write" in out and str(fixtures / "never.safetensors") in out
    assert "layers.1.mlp.up.weight (replaced)" in out and "model.safetensors.index.json:layers.0.mlp.up.weight" in out
    assert "scale(2.0)" in out and "(16, 8)" in out and "float32" in out
    obj = ok_json(
        cli, "copy", fixtures / "tiny_lm.pt", "--src", "final_norm.weight", "--dst", "b2", "-n", "-o", fixtures / "x"
    )
    assert obj == {**obj, "dry_run": True}
    assert snapshot(fixtures) == before


def test_copy_in_place_replaces_the_input(cli, fixtures):
    path = fixtures / "tiny_lm.safetensors"
    refused(cli, fixtures, 5, "copy", path, "--src", "embedding.weight", "--dst", "projection.weight")
    ok(cli, "copy", path, "--src", "embedding.weight", "--dst", "projection.weight", "--in-place")
    got = load_file(path)
    assert torch.equal(got["projection.weight"], lm()["embedding.weight"])
    assert not [p for p in fixtures.iterdir() if p.name.endswith(".wsurgery-tmp")]


def test_copy_refusals(cli, fixtures):
    st = fixtures / "tiny_lm.safetensors"
    out = fixtures / "out.safetensors"
    line = refused(cli, fixtures, 3, "copy", st, "--src", "embeding.weight", "--dst", "x", "-o", out)
    assert "embedding.weight" in line
    refused(cli, fixtures, 3, "copy", fixtures / "missing.pt", "--src", "a", "--dst", "b", "-o", out)
    refused(cli, fixtures, 3, "copy", st, "--from", fixtures / "missing.pt", "--src", "a", "--dst", "b", "-o", out)
    line = refused(
        cli, fixtures, 4, "tie", st, "--src", "layers.0.mlp.up.weight", "--dst", "layers.0.mlp.down.weight", "-o", out
    )
    assert "(16, 8)" in line and "(8, 16)" in line and "--transform transpose" in line
    line = refused(
        cli, fixtures, 4, "copy", st, "--src", "embedding.weight", "--dst", "x", "-t", "reshape(5,-1)", "-o", out
    )
    assert "step 1 'reshape(5,-1)'" in line and "(32, 8)" in line
    refused(cli, fixtures, 4, "copy", st, "--src", "layers.0", "--dst", "embedding.weight", "-o", out)
    refused(cli, fixtures, 4, "copy", st, "--src", "embedding.weight", "--dst", "x", "-t", "bogus(1)", "-o", out)
    refused(cli, fixtures, 5, "copy", st, "--src", "embedding.weight", "--dst", "x", "-o", fixtures / "tiny_lm.pt")
    # the --from checkpoint is an input too
    refused(
        cli,
        fixtures,
        5,
        "copy",
        fixtures / "tiny_lm.pt",
        "--from",
        st,
        "--src",
        "final_norm.weight",
        "--dst",
        "x",
        "-o",
        st,
    )
    shard = fixtures / "tiny_lm_sharded" / "model-00001-of-00002.safetensors"
    refused(
        cli,
        fixtures,
        5,
        "copy",
        st,
        "--from",
        fixtures / "tiny_lm_sharded",
        "--src",
        "final_norm.weight",
        "--dst",
        "x",
        "-o",
        shard,
        "--force",
    )
    refused(cli, fixtures, 2, "copy", st, "--src", "embedding.weight", "--dst", "x", "--device", "tpu9", "-o", out)
    line = refused(
        cli, fixtures, 4, "copy", st, "--src", "embedding.weight", "--dst", "x", "-t", "flip", "-o", out, json_out=True
    )
    assert "unknown step 'flip'" in line


def test_copy_usage_errors_exit_2_and_write_nothing(cli, fixtures):
    before = snapshot(fixtures)
    code, _, _ = cli("copy", fixtures / "tiny_lm.pt", "--dst", "x")
    assert code == 2
    code, _, _ = cli("untie", fixtures / "tiny_lm.pt", "--bogus")
    assert code == 2
    assert snapshot(fixtures) == before


def test_copy_twice_gives_identical_bytes(cli, fixtures):
    args = ["--src", "layers.0", "--dst", "layers.1", "-t", "scale(0.25)", "--from", fixtures / "tiny_lm_sharded"]
    ok(cli, "copy", fixtures / "tiny_lm.pt", *args, "-o", fixtures / "a.safetensors")
    ok(cli, "copy", fixtures / "tiny_lm.pt", *args, "-o", fixtures / "b.safetensors")
    assert (fixtures / "a.safetensors").read_bytes() == (fixtures / "b.safetensors").read_bytes()


# ----------------------------------------------------------------------------- tie


@pytest.mark.parametrize(
    ("src", "dst", "steps", "expect"),
    [
        ("layers.0.mlp.up.weight", "layers.0.mlp.down.weight", ["TRANSPOSE"], lambda t: t.t()),
        ("layers.0.attn.qkv.weight", "layers.1.attn.out.weight", ["slice(0,8,16)"], lambda t: t[8:16]),
        ("layers.0.mlp.up.weight", "flat", ["reshape(-1)"], lambda t: t.reshape(-1)),
        (
            "layers.0.attn.qkv.weight",
            "qkv3",
            ["reshape(3,8,8)", "permute(1,0,2)"],
            lambda t: t.view(3, 8, 8).permute(1, 0, 2),
        ),
        ("embedding.weight", "projection.weight", ["same"], lambda t: t),
    ],
    ids=["transpose", "slice", "reshape", "reshape-permute", "same"],
)
def test_tie_view_steps_round_trip_as_views(cli, fixtures, src, dst, steps, expect):
    out = fixtures / "tied.safetensors"
    args = [a for s in steps for a in ("-t", s)]
    obj = ok_json(cli, "tie", fixtures / "tiny_lm.pt", "--src", src, "--dst", dst, *args, "-o", out)
    assert obj["schema"] == "wsurgery.tie/1" and obj["copied"] == []
    record = next(a for a in obj["aliases"] if a["name"] == dst)
    assert record["source"] == src
    sd = wsurgery.load_state_dict(out)
    assert torch.equal(sd[dst], expect(lm()[src]))
    assert shares_storage(sd[dst], sd[src])
    assert dst not in load_file(out)


def test_tie_onto_an_alias_resolves_and_composes(cli, fixtures):
    out = fixtures / "tied.safetensors"
    obj = ok_json(
        cli,
        "tie",
        fixtures / "shared_storage.pt",
        "--src",
        "decoder.weight",
        "--dst",
        "head",
        "-t",
        "slice(1,0,4)",
        "-o",
        out,
    )
    head = next(a for a in obj["aliases"] if a["name"] == "head")
    assert head == {"name": "head", "source": "encoder.weight", "transform": ["transpose", "slice(1,0,4)"]}
    sd = wsurgery.load_state_dict(out)
    assert torch.equal(sd["head"], shared()["decoder.weight"][:, 0:4])


TIE_REFUSALS = [
    # (exit code, --src, --dst, transform steps, substrings of the error line)
    (4, "projection.weight", "embedding.weight", [], ["cycle"]),
    (4, "embedding.weight", "x", ["cast(float16)"], ["cast(float16)", "view steps only"]),
    (4, "encoder.weight", "x", ["transpose", "reshape(-1)"], ["not a view"]),
    (4, "bias", "encoder.weight", ["reshape(1,8)"], ["(1, 8)", "(16, 8)"]),
    (4, "embedding.weight", "encoder.weight", ["slice(0,0,16)"], ["stored source of decoder.weight"]),
    (3, "nothing", "x", [], ["nothing"]),
]


@pytest.mark.parametrize("code,src,dst,steps,expected", TIE_REFUSALS)
def test_tie_refusals(cli, fixtures, code, src, dst, steps, expected):
    transforms = [arg for step in steps for arg in ("-t", step)]
    out = fixtures / "out.safetensors"
    line = refused(
        cli, fixtures, code, "tie", fixtures / "shared_storage.pt", "--src", src, "--dst", dst, *transforms, "-o", out
    )
    for text in expected:
        assert text in line


def test_tie_dry_run_prints_the_plan(cli, fixtures):
    before = snapshot(fixtures)
    out = ok(
        cli,
        "tie",
        fixtures / "tiny_lm.pt",
        "--src",
        "embedding.weight",
        "--dst",
        "projection.weight",
        "-n",
        "-o",
        fixtures / "o.safetensors",
    )
    assert "plan" in out and "tie" in out and "projection.weight (replaced)" in out and "(32, 8)" in out
    assert "would write" in out and "projection.weight = same(embedding.weight)" in out
    assert snapshot(fixtures) == before


# ----------------------------------------------------------------------------- untie


def test_untie_everything_by_default(cli, fixtures):
    out = fixtures / "untied.safetensors"
    obj = ok_json(cli, "untie", fixtures / "shared_storage.pt", "-o", out)
    assert obj["schema"] == "wsurgery.untie/1" and obj["aliases"] == [] and obj["stored"] == 5
    assert {u["name"] for u in obj["untied"]} == {"projection.weight", "decoder.weight"}
    meta = header_metadata(out)
    assert meta == {"format": "pt"}
    got, src = load_file(out), shared()
    assert set(got) == set(src)
    for name in src:
        assert torch.equal(got[name], src[name])


def test_untie_named_aliases_only(cli, fixtures):
    tied = fixtures / "tied.safetensors"
    ok(cli, "convert", fixtures / "shared_storage.pt", "-o", tied)
    out = fixtures / "out.safetensors"
    obj = ok_json(cli, "untie", tied, "--dst", "decoder.weight", "--dst", "decoder", "-o", out)
    assert [u["name"] for u in obj["untied"]] == ["decoder.weight"]
    assert obj["aliases"] == [{"name": "projection.weight", "source": "embedding.weight", "transform": []}]
    meta = header_metadata(out)
    assert meta["projection.weight"] == "embedding.weight" and "decoder.weight" not in meta
    # a stored name unties its aliases
    obj = ok_json(cli, "untie", tied, "--dst", "embedding.weight", "-o", out, "--force")
    assert [u["name"] for u in obj["untied"]] == ["projection.weight"]


def test_untie_dry_run_and_refusals(cli, fixtures):
    pt = fixtures / "shared_storage.pt"
    out = fixtures / "out.safetensors"
    before = snapshot(fixtures)
    text = ok(cli, "untie", pt, "--dry-run", "-o", out)
    assert "untie  decoder.weight " in text and "(replaced)" not in text and "transpose" in text and "(8, 16)" in text
    assert "would write" in text and "0 aliases" in text
    assert snapshot(fixtures) == before
    assert "no alias points at it" in refused(cli, fixtures, 4, "untie", pt, "--dst", "bias", "-o", out)
    refused(cli, fixtures, 3, "untie", pt, "--dst", "nope", "-o", out)
    refused(cli, fixtures, 5, "untie", pt, "-o", pt)
    refused(cli, fixtures, 2, "untie", pt, "--device", "warp", "-o", out, json_out=True)


# ----------------------------------------------------------------------------- as a user runs it


def test_subprocess_copy(fixtures):
    out = fixtures / "o.safetensors"
    r = run_module(
        "copy",
        fixtures / "tiny_lm.pt",
        "--src",
        "layers.0",
        "--dst",
        "layers.1",
        "--from",
        fixtures / "tiny_lm.safetensors",
        "-t",
        "scale(0)",
        "-o",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "6 copied" in r.stdout
    assert torch.count_nonzero(load_file(out)["layers.1.mlp.up.weight"]) == 0
    before = snapshot(fixtures)
    r = run_module("copy", fixtures / "tiny_lm.pt", "--src", "bias", "--dst", "x", "-o", fixtures / "p.safetensors")
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.startswith("error: no tensor or module named 'bias'") and r.stderr.count("\n") == 1
    assert snapshot(fixtures) == before


def test_subprocess_tie(fixtures):
    out = fixtures / "o.safetensors"
    r = run_module(
        "tie",
        fixtures / "tiny_lm.safetensors",
        "--src",
        "layers.0.mlp.up.weight",
        "--dst",
        "layers.0.mlp.down.weight",
        "-t",
        "transpose",
        "-o",
        out,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["aliases"][0]["transform"] == ["transpose"]
    r = run_module(
        "tie",
        fixtures / "tiny_lm.safetensors",
        "--src",
        "embedding.weight",
        "--dst",
        "x",
        "-t",
        "scale(2)",
        "-o",
        fixtures / "p.safetensors",
    )
    assert r.returncode == 4 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_subprocess_untie(fixtures):
    out = fixtures / "o.safetensors"
    r = run_module("untie", fixtures / "shared_storage.pt", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "0 aliases" in r.stdout and "2 untied" in r.stdout
    assert len(load_file(out)) == 5
    r = run_module("untie", fixtures / "shared_storage.pt", "-o", out)
    assert r.returncode == 5 and "exists" in r.stderr and r.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- interop with safetensors and torch


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(32, 8)
        self.projection = nn.Linear(8, 32, bias=False)
        self.projection.weight = self.embedding.weight


def test_a_tie_output_loads_with_safetensors_and_into_a_tied_module(cli, fixtures):
    sd = {
        "embedding.weight": torch.randn(32, 8, generator=torch.Generator().manual_seed(3)),
        "projection.weight": torch.zeros(32, 8),
    }
    from safetensors.torch import save_file

    src = fixtures / "pair.safetensors"
    save_file(sd, str(src))
    out = fixtures / "tied.safetensors"
    ok(cli, "tie", src, "--src", "embedding.weight", "--dst", "projection.weight", "-o", out)
    flat = load_file(out)
    assert list(flat) == ["embedding.weight"]  # the source is stored once
    assert out.stat().st_size < src.stat().st_size
    assert header_metadata(out)["projection.weight"] == "embedding.weight"

    model = TiedLM()
    missing, unexpected = load_model(model, str(out))  # strict: raises on a missing or unexpected name
    assert not missing and not unexpected
    assert torch.equal(model.projection.weight, sd["embedding.weight"])


def test_an_untie_output_needs_no_alias_metadata(cli, fixtures):
    out = fixtures / "untied.safetensors"
    ok(cli, "untie", fixtures / "shared_storage.pt", "-o", out)
    assert "wsurgery.aliases" not in header_metadata(out)
    flat, src = load_file(out), shared()
    assert torch.equal(flat["decoder.weight"], src["encoder.weight"].t())
    assert not shares_storage(flat["decoder.weight"], flat["encoder.weight"])
    back = wsurgery.load(out)
    assert back.aliases == {}
    back.close()


def test_a_transposed_tie_round_trips_as_a_view(cli, fixtures):
    out = fixtures / "tied.safetensors"
    ok(
        cli,
        "tie",
        fixtures / "tiny_lm.pt",
        "--src",
        "layers.1.mlp.up.weight",
        "--dst",
        "layers.1.mlp.down.weight",
        "-t",
        "transpose",
        "-o",
        out,
    )
    assert "layers.1.mlp.down.weight" not in header_metadata(out)  # never the plain entry for a transformed tie
    sd = wsurgery.load_state_dict(out)
    up, down = sd["layers.1.mlp.up.weight"], sd["layers.1.mlp.down.weight"]
    assert shares_storage(up, down) and torch.equal(down, up.t())
    up.mul_(2)
    assert torch.equal(down, up.t())  # one value
