"""merge: exactness against a float64 reference rounded once, mergekit itself as the oracle
of its methods, ties and names across inputs, and every bad input refused with nothing
written."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import wsurgery  # noqa: E402
from wsurgery import merge  # noqa: E402
from wsurgery.errors import SurgeryError  # noqa: E402
from wsurgery.merging import round_once, trim_cut, trim_mask  # noqa: E402

from ..models import tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _save(path, sd, aliases=None):
    wsurgery.save_state_dict(sd, path, aliases=aliases)
    return path


def _inputs(tmp_path, n=3, dtype=torch.bfloat16, seed=0, tie=False):
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        sd = {
            "embed.weight": (torch.randn(40, 16, generator=g) * (i + 1)).to(dtype),
            "layers.0.fc.weight": torch.randn(33, 16, generator=g).to(dtype),
            "layers.0.fc.bias": torch.randn(33, generator=g).to(torch.float32),
            "position_ids": torch.arange(8),
        }
        aliases = {"head.weight": ("embed.weight", [])} if tie else None
        paths.append(_save(tmp_path / f"m{i}.safetensors", sd, aliases))
    return paths


def _ulps(a, ref64):
    """Distance in units of the last place of ``a``'s dtype between a and the float64 reference."""
    ulp = torch.finfo(a.dtype).eps * ref64.abs().clamp_min(torch.finfo(a.dtype).tiny) * 2
    return ((a.double() - ref64).abs() / ulp).max().item()


def test_mean_is_the_float64_mean_rounded_once(tmp_path):
    paths = _inputs(tmp_path)
    merge(paths, weights=[1, 2, 0.5]).save(tmp_path / "out.safetensors")
    out = wsurgery.load_state_dict(tmp_path / "out.safetensors")
    ins = [wsurgery.load_state_dict(p) for p in paths]
    for name in ("embed.weight", "layers.0.fc.weight", "layers.0.fc.bias"):
        ref = (ins[0][name].double() + 2 * ins[1][name].double() + 0.5 * ins[2][name].double()) / 3.5
        assert out[name].dtype == ins[0][name].dtype
        assert torch.equal(out[name], round_once(ref, str(out[name].dtype).removeprefix("torch.")))
        assert _ulps(out[name], ref) <= 1
    assert torch.equal(out["position_ids"], torch.arange(8))


def test_round_once_rounds_float64_directly():
    # x lies just above the midpoint of two bfloat16 values but rounds to float32 onto it:
    # float64 -> float32 -> bfloat16 would round down (ties to even); one rounding goes up.
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    step = 2.0**-7  # bfloat16's spacing at 1
    x = torch.tensor([1.0 + step / 2 + 2.0**-40], dtype=torch.float64)
    assert x.to(torch.bfloat16).item() == lo.item()  # torch's double rounding
    assert round_once(x, "bfloat16").item() == 1.0 + step


def test_task_arithmetic_is_exact(tmp_path):
    paths = _inputs(tmp_path, dtype=torch.float16)
    merge(paths[1:], method="task-arithmetic", base=paths[0], weights=[0.7, -0.3]).save(tmp_path / "o.safetensors")
    out = wsurgery.load_state_dict(tmp_path / "o.safetensors")
    b, x1, x2 = (wsurgery.load_state_dict(p) for p in paths)
    for name in ("embed.weight", "layers.0.fc.weight"):
        B = b[name].double()
        ref = B + ((x1[name].double() - B) * 0.7 + (x2[name].double() - B) * -0.3)
        assert _ulps(out[name], ref) <= 1
        assert torch.equal(out[name], round_once(ref, "float16"))


def test_trim_keeps_k_largest_with_lower_index_first_on_ties():
    tv = torch.tensor([1.0, -3.0, 3.0, 0.5, 3.0, -2.0], dtype=torch.float64)
    cut = trim_cut(tv, 0.5)  # k = 3: the two 3s after -3 ... all |3|, lower indices first
    mask, _ = trim_mask(tv, cut, 0)
    assert mask.tolist() == [False, True, True, False, True, False]
    cut = trim_cut(tv, 0.34)  # k = 2: index 1 and 2 of the three equal magnitudes
    first, eq = trim_mask(tv[:2], cut, 0)
    second, _ = trim_mask(tv[2:], cut, eq)  # chunked: the count carries over
    assert torch.cat([first, second]).tolist() == [False, True, True, False, False, False]
    assert trim_mask(tv, trim_cut(tv, 0.01), 0)[0].sum() == 1  # k = max(1, floor(...))


def test_ties_kept_when_every_input_agrees_and_values_otherwise(tmp_path):
    paths = _inputs(tmp_path, tie=True)
    m = merge(paths)
    assert m.aliases["head.weight"].source == "embed.weight"
    m.save(tmp_path / "tied.safetensors")
    with wsurgery.open(tmp_path / "tied.safetensors") as c:
        assert "head.weight" in c.aliases
    # one input stores the head as values of its own
    sd = wsurgery.load_state_dict(paths[2])
    sd = {k: v.clone() for k, v in sd.items()}
    _save(paths[2], sd)
    m = merge(paths)
    assert "head.weight" in m.stored
    assert any(op.dst == "head.weight" and "tie" in op.note for op in m.changes)
    ins = [wsurgery.load_state_dict(p) for p in paths]
    ref = sum(i["head.weight"].double() for i in ins) / 3
    assert torch.equal(m.get_tensor("head.weight"), round_once(ref, "bfloat16"))


def test_only_merges_a_selection_and_carries_the_rest(tmp_path):
    paths = _inputs(tmp_path)
    m = merge(paths, only=["layers.0"], dtype="float32")
    first = wsurgery.load_state_dict(paths[0])
    assert torch.equal(m.get_tensor("embed.weight"), first["embed.weight"])
    assert m.get_tensor("layers.0.fc.weight").dtype == torch.float32
    with pytest.raises(wsurgery.UnknownNameError):
        merge(paths, only=["nothing.*"])


def test_names_missing_from_an_input_are_listed(tmp_path):
    paths = _inputs(tmp_path)
    sd = dict(wsurgery.load_state_dict(paths[1]))
    del sd["layers.0.fc.bias"], sd["embed.weight"]
    _save(paths[1], sd)
    with pytest.raises(SurgeryError) as err:
        merge(paths)
    assert "layers.0.fc.bias" in str(err.value) and "embed.weight" in str(err.value)


def test_non_floating_tensors_must_be_equal(tmp_path):
    paths = _inputs(tmp_path, n=2)
    sd = dict(wsurgery.load_state_dict(paths[1]))
    sd["position_ids"] = torch.arange(8) + 1
    _save(paths[1], sd)
    with pytest.raises(SurgeryError, match="position_ids"):
        merge(paths).save(tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_slerp_t0_gives_the_first_and_matches_the_formula(tmp_path):
    paths = _inputs(tmp_path, n=2, dtype=torch.float32)
    a, b = (wsurgery.load_state_dict(p)["layers.0.fc.weight"].double() for p in paths)
    assert torch.equal(merge(paths, method="slerp", t=0.0).get_tensor("layers.0.fc.weight"), a.float())
    got = merge(paths, method="slerp", t=0.3).get_tensor("layers.0.fc.weight")
    cos = (a.flatten() @ b.flatten()) / (a.norm() * b.norm())
    th = math.acos(cos)
    ref = (math.sin(0.7 * th) * a + math.sin(0.3 * th) * b) / math.sin(th)
    assert torch.equal(got, ref.float())


def test_cuda_gives_the_cpu_bytes(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    paths = _inputs(tmp_path)
    for kw in ({}, {"method": "ties", "base": paths[0], "density": 0.4}):
        ins = paths if not kw else paths[1:]
        cpu = merge(ins, **kw).state_dict()
        gpu = merge(ins, device="cuda", **kw).state_dict()
        for k in cpu:
            assert torch.equal(cpu[k], gpu[k]), k


# --- bad input: one clear error, exit 2 or 4, nothing written --------------------------------


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--weights", "1,-1"], 2, "sum to zero"),
        (["--method", "slerp"], 2, "exactly two"),
        (["--method", "slerp", "--t", "1.5"], 2, "t must be in"),
        (["--method", "ties", "--base", "BASE", "--density", "0"], 2, "density must be in"),
        (["--method", "ties", "--base", "BASE", "--density", "1.5"], 2, "density must be in"),
        (["--method", "ties"], 2, "needs a base"),
        (["--method", "task-arithmetic"], 2, "needs a base"),
        (["--method", "nope"], 2, "unknown merge method"),
    ],
)
def test_cli_bad_parameters(tmp_path, cli, args, code, words):
    paths = _inputs(tmp_path, n=2)
    if args[0] == "--method" and args[1] == "slerp" and "--t" not in args:
        paths = _inputs(tmp_path, n=3)
    args = [str(paths[0]) if a == "BASE" else a for a in args]
    out = tmp_path / "out.safetensors"
    got, _, err = cli("merge", *map(str, paths), *args, "-o", str(out))
    assert got == code, err
    assert words in err and err.startswith("error:")
    assert not out.exists()


def test_cli_shape_mismatch_exit_4(tmp_path, cli):
    paths = _inputs(tmp_path, n=2)
    sd = dict(wsurgery.load_state_dict(paths[1]))
    sd["layers.0.fc.weight"] = torch.zeros(16, 33, dtype=torch.bfloat16)
    _save(paths[1], sd)
    out = tmp_path / "out.safetensors"
    code, _, err = cli("merge", *map(str, paths), "-o", str(out))
    assert code == 4 and "layers.0.fc.weight" in err and "[33, 16]" in err
    assert not out.exists()


def test_cli_merge_json(tmp_path, cli):
    paths = _inputs(tmp_path)
    code, out, err = cli("merge", *map(str, paths), "--weights", "1,1,2", "-o", str(tmp_path / "avg.pt"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "wsurgery.merge/1" and doc["format"] == "torch"
    sd = torch.load(tmp_path / "avg.pt", weights_only=True)
    ins = [wsurgery.load_state_dict(p) for p in paths]
    ref = (ins[0]["embed.weight"].double() + ins[1]["embed.weight"].double() + 2 * ins[2]["embed.weight"].double()) / 4
    assert torch.equal(sd["embed.weight"], round_once(ref, "bfloat16"))


def test_mixed_formats(tmp_path):
    paths = _inputs(tmp_path, n=2)
    sd = {k: v.clone() for k, v in wsurgery.load_state_dict(paths[1]).items()}
    torch.save({"state_dict": sd}, tmp_path / "m1.pt")
    a = merge([paths[0], paths[1]]).state_dict()
    b = merge([paths[0], tmp_path / "m1.pt"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- mergekit itself ----------------------------------------------------------------------------


MERGEKIT = ROOT / ".venv-peers" / "bin" / "mergekit-yaml"


def _mergekit() -> Path:
    """mergekit's own command line, from the environment ``make test`` gives it
    (``.venv-peers``: mergekit pins its own safetensors, click and accelerate, so it does
    not share wsurgery's environment)."""
    if not MERGEKIT.exists():
        pytest.skip(f"mergekit is not installed at {MERGEKIT} (make peers installs it)")
    return MERGEKIT


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llamas")
    base = tiny_llama(0)
    base.save_pretrained(root / "base")
    out = [root / "base"]
    for i in range(2):
        m = tiny_llama(0)  # the base's weights
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        m.save_pretrained(root / f"ft{i}")
        out.append(root / f"ft{i}")
    return out


def _kit(method: str, models: list, base: str | None = None, **parameters) -> dict:
    """A mergekit configuration: ``models`` as (name, its parameters)."""
    config: dict = {"merge_method": method, "dtype": "float32"}
    config["models"] = [{"model": m, **({"parameters": p} if p else {})} for m, p in models]
    if base is not None:
        config["base_model"] = base
    if parameters:
        config["parameters"] = parameters
    return config


MERGEKIT_CASES = [
    ("mean", {"weights": [1.0, 3.0]}, _kit("linear", [("FT0", {"weight": 1.0}), ("FT1", {"weight": 3.0})])),
    (
        "task-arithmetic",
        {"weights": [0.6, 0.8]},
        _kit("task_arithmetic", [("FT0", {"weight": 0.6}), ("FT1", {"weight": 0.8})], "BASE"),
    ),
    (
        "ties",
        {"weights": [1.0, 0.5], "density": 0.4},
        _kit(
            "ties",
            [("FT0", {"weight": 1.0, "density": 0.4}), ("FT1", {"weight": 0.5, "density": 0.4})],
            "BASE",
            normalize=True,
        ),
    ),
    ("slerp", {"t": 0.3}, _kit("slerp", [("FT0", {}), ("FT1", {})], "FT0", t=0.3)),
]


@pytest.mark.parametrize("method, ours, theirs", MERGEKIT_CASES)
def test_agrees_with_mergekit(tmp_path, tiny_llamas, method, ours, theirs):
    mergekit_yaml = _mergekit()
    base, ft0, ft1 = tiny_llamas
    text = json.dumps(theirs).replace("BASE", str(base)).replace("FT0", str(ft0)).replace("FT1", str(ft1))
    (tmp_path / "config.yml").write_text(text)  # JSON is YAML
    run = subprocess.run(
        [str(mergekit_yaml), str(tmp_path / "config.yml"), str(tmp_path / "mk"), "--no-copy-tokenizer"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    kit = wsurgery.load_state_dict(tmp_path / "mk")
    kw = dict(ours)
    if method in ("task-arithmetic", "ties"):
        kw["base"] = base
    mine = merge([ft0, ft1], method=method, **kw)
    mine.save(tmp_path / "ours")
    got = wsurgery.load_state_dict(tmp_path / "ours")
    assert set(kit) <= set(got)
    assert (tmp_path / "ours" / "config.json").exists()  # model folder in, model folder out
    for name, ref in kit.items():
        torch.testing.assert_close(got[name], ref.to(got[name].dtype), rtol=1e-5, atol=2e-6, msg=name)


def test_cli_default_output_is_beside_the_first_input(tmp_path, cli):
    paths = _inputs(tmp_path, n=2)
    before = [p.read_bytes() for p in paths]
    code, _, err = cli("merge", *map(str, paths))
    assert code == 0, err
    assert (tmp_path / "m0.merged.safetensors").exists()
    assert [p.read_bytes() for p in paths] == before


def test_closing_the_result_closes_every_input(tmp_path):
    paths = _inputs(tmp_path, n=3)
    m = merge(paths[1:], method="ties", base=paths[0], density=0.5)
    m.get_tensor("embed.weight")  # maps every input's file
    files = {id(s.file): s.file for s in (m.stored["embed.weight"].stored_inputs())}
    assert len(files) == 3 and all(f._mmap is not None for f in files.values())
    m.close()
    assert all(f._mmap is None for f in files.values())


def test_only_a_tied_source_leaves_its_alias_with_the_first_inputs_values(tmp_path):
    paths = _inputs(tmp_path, tie=True)
    m = merge(paths, only=["embed.weight"])
    first = wsurgery.load_state_dict(paths[0])
    assert "head.weight" in m.stored and not m.aliases
    assert torch.equal(m.get_tensor("head.weight"), first["embed.weight"])
    assert not torch.equal(m.get_tensor("embed.weight"), first["embed.weight"])
    m.save(tmp_path / "o.safetensors")
    assert torch.equal(wsurgery.load_state_dict(tmp_path / "o.safetensors")["head.weight"], first["embed.weight"])


def _unaligned_safetensors(path, t):
    """A safetensors file whose data starts at an odd offset (the format allows it)."""
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": list(t.shape), "data_offsets": [0, t.numel() * 4]}})
    if (8 + len(header)) % 4 == 0:
        header += " "
    data = t.contiguous().numpy().tobytes()
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + data)
    return path


def test_inputs_whose_bytes_are_not_aligned_are_read_chunk_by_chunk(tmp_path, monkeypatch):
    import wsurgery.merging as merging

    monkeypatch.setattr(merging, "CHUNK", 7)
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(5, 9, generator=g) for _ in range(2)]
    paths = [_unaligned_safetensors(tmp_path / f"u{i}.safetensors", t) for i, t in enumerate(ts)]
    with wsurgery.open(paths[0]) as c:
        assert merging._Flat(c.stored["w"], "cpu").u8 is not None  # the path under test
    got = merge(paths, weights=[1, 2]).get_tensor("w")
    ref = (ts[0].double() + 2 * ts[1].double()) / 3
    assert torch.equal(got, ref.float())
