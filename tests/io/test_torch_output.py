"""torch output: ``-o x.pt`` (or ``format="torch"``) writes a ``torch.save`` zip file that
``torch.load(weights_only=True)`` reads, ties kept as shared storage, streamed and atomic."""

from __future__ import annotations

import errno
import json
import os
import pickle
import pickletools
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import wsurgery
from wsurgery.errors import OutputError, UsageError
from wsurgery.io import sniff, torch_writer, writer
from wsurgery.io.torch_writer import TorchTensor, build_pickle
from wsurgery.io.writer import TMP_SUFFIX, WriteItem
from wsurgery.transforms import parse
from wsurgery.views import Strided, layout_of, view_steps

from ..conftest import FIXTURES, sha256


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(TMP_SUFFIX))


def tload(path, mmap=False) -> dict:
    return torch.load(path, weights_only=True, mmap=mmap)


def shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# --- the file -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_convert_to_a_torch_suffix_writes_a_torch_zip_file(tmp_path, cli, suffix):
    out = tmp_path / f"model{suffix}"
    code, stdout, stderr = cli("convert", FIXTURES / "tiny_lm.safetensors", "-o", out)
    assert code == 0, stderr
    assert f"wrote {out} (torch)" in stdout
    assert sniff.sniff(str(out))[0] == sniff.TORCH_ZIP
    ref = load_file(FIXTURES / "tiny_lm.safetensors")
    for mmap in (False, True):
        got = tload(out, mmap)
        assert list(got) == wsurgery.load(FIXTURES / "tiny_lm.safetensors").names()
        assert all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)


def test_the_zip_layout_is_torchs(tmp_path):
    out = tmp_path / "m.pt"
    wsurgery.convert(FIXTURES / "shared_storage.pt", out)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # every CRC-32 is right
        names = [i.filename for i in z.infolist()]
        assert names == [
            "archive/data.pkl",
            "archive/.format_version",
            "archive/.storage_alignment",
            "archive/byteorder",
            "archive/data/0",
            "archive/data/1",
            "archive/data/2",
            "archive/version",
            "archive/.data/serialization_id",
        ]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        assert z.read("archive/byteorder") == b"little" and z.read("archive/.storage_alignment") == b"64"
        ops = {op.name for op, _, _ in pickletools.genops(z.read("archive/data.pkl"))}
        assert "PROTO" in ops and "BINPERSID" in ops
        data = out.read_bytes()
        for info in z.infolist():  # data aligned to 64 bytes, as torch writes it
            name_len, extra_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"), 0
            extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_every_dtype_round_trips(tmp_path):
    from wsurgery.dtypes import BY_NAME

    sd = {}
    for i, name in enumerate(BY_NAME):
        base = torch.arange(12).reshape(3, 4)
        sd[name] = base % 2 == 0 if name == "bool" else base.to(torch.float32).to(getattr(torch, name))
        sd[f"{name}.scalar"] = sd[name].reshape(-1)[i % 12].clone()
        sd[f"{name}.empty"] = sd[name][:0].clone()
    wsurgery.save_state_dict(sd, tmp_path / "all.safetensors")
    wsurgery.convert(tmp_path / "all.safetensors", tmp_path / "all.pt")
    for mmap in (False, True):
        got = tload(tmp_path / "all.pt", mmap)
        for k, v in sd.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_many_tensors_and_large_numbers_in_the_pickle(tmp_path):
    sd = {f"t.{i}": torch.full((i % 3 + 1,), float(i)) for i in range(1300)}  # memo past 255, 2 SETITEMS
    sd["wide"] = torch.zeros(1, 70000, dtype=torch.int8)  # a dim past 65535
    out = tmp_path / "many.pt"
    wsurgery.save_state_dict(sd, tmp_path / "many.safetensors")
    wsurgery.convert(tmp_path / "many.safetensors", out)
    got = tload(out)
    assert len(got) == len(sd) and all(torch.equal(got[k], v) for k, v in sd.items())

    # offsets, sizes and strides past 2**31 are LONG1 ints that pickle itself reads back
    big = 2**40 + 3
    t = TorchTensor("x", 0, "float32", (big, 2), (2, 1), big)
    raw = build_pickle([t], [WriteItem("x", "float32", (big, 2), big * 8, None)])

    class Global:
        def __init__(self, module, name):
            self.name = name

        def __call__(self, *args):
            return (self.name, args)

    class Loader(pickle.Unpickler):
        def find_class(self, module, name):
            return Global(module, name)

        def persistent_load(self, pid):
            return pid

    name, args = Loader(__import__("io").BytesIO(raw)).load()["x"]
    assert name == "_rebuild_tensor_v2"
    assert args[0][1].name == "FloatStorage" and args[0][4] == big * 2
    assert args[1:4] == (big, (big, 2), (2, 1))


def test_zip64_records_are_read_by_torch_and_zipfile(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_writer, "_ZIP64_LIMIT", 100)  # every member and offset past it: zip64
    out = tmp_path / "z64.pt"
    wsurgery.convert(FIXTURES / "shared_storage.pt", out)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    ref = tload(FIXTURES / "shared_storage.pt")
    for mmap in (False, True):
        got = tload(out, mmap)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    c = wsurgery.load(out)
    assert c.aliases["decoder.weight"].record() == {"source": "encoder.weight", "transform": ["transpose"]}


# --- ties -------------------------------------------------------------------------------------


def test_ties_are_shared_storage(tmp_path, cli):
    out = tmp_path / "tied.pt"
    code, _, stderr = cli(
        "tie", FIXTURES / "tiny_lm.safetensors", "--src", "embedding.weight", "--dst", "projection.weight", "-o", out
    )
    assert code == 0, stderr
    sd = tload(out)
    assert sd["projection.weight"].data_ptr() == sd["embedding.weight"].data_ptr()
    assert sd["projection.weight"].stride() == sd["embedding.weight"].stride()
    with zipfile.ZipFile(out) as z:  # the embedding's bytes are stored once
        assert len([n for n in z.namelist() if "/data/" in n]) == 14

    pt = tmp_path / "shared.pt"
    wsurgery.convert(FIXTURES / "shared_storage.pt", pt)
    sd = tload(pt)
    enc, dec = sd["encoder.weight"], sd["decoder.weight"]
    assert shares(enc, dec) and dec.stride() == enc.stride()[::-1] and torch.equal(dec, enc.t())


# (transform, source shape) -> what it reads back as: the canonical spelling
VIEW_TIES = [
    (["transpose"], (6, 4), ["transpose"]),
    (["slice(0,1,5)"], (6, 4), ["slice(0,1,5)"]),
    (["slice(1,0,2)"], (6, 4), ["slice(1,0,2)"]),
    (["permute(2,0,1)"], (2, 3, 4), ["permute(2,0,1)"]),
    (["transpose(0,2)"], (2, 3, 4), ["transpose(0,2)"]),
    (["reshape(4,6)"], (6, 4), ["reshape(4,6)"]),
    (["reshape(-1)"], (6, 4), ["reshape(24)"]),
    (["slice(0,0,3)", "transpose"], (6, 4), ["slice(0,0,3)", "transpose"]),
    (["transpose", "slice(1,0,3)"], (6, 4), ["slice(0,0,3)", "transpose"]),
    (["slice(0,2,4)", "reshape(8)"], (6, 4), ["reshape(24)", "slice(0,8,16)"]),
]


@pytest.mark.parametrize("specs,shape,back", VIEW_TIES, ids=[" -> ".join(v[0]) for v in VIEW_TIES])
def test_view_ties_are_views_and_read_back_as_ties(tmp_path, specs, shape, back):
    src = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    expected = parse(specs).apply(src)
    st = tmp_path / "m.safetensors"
    save_file({"src": src, "dst": torch.zeros(expected.shape)}, st)
    with wsurgery.open(st) as c:
        c.tie("src", "dst", specs).save(tmp_path / "m.pt")
    sd = tload(tmp_path / "m.pt")
    assert shares(sd["src"], sd["dst"]) and torch.equal(sd["dst"], expected)
    assert sd["dst"].stride() == expected.stride() and sd["dst"].storage_offset() == expected.storage_offset()
    back_ckpt = wsurgery.load(tmp_path / "m.pt")
    assert back_ckpt.aliases["dst"].record() == {"source": "src", "transform": back}
    # and back to safetensors: the same tie, the same values
    wsurgery.convert(tmp_path / "m.pt", tmp_path / "back.safetensors")
    assert wsurgery.load(tmp_path / "back.safetensors").aliases["dst"].record()["transform"] == back
    assert wsurgery.diff(tmp_path / "m.pt", tmp_path / "back.safetensors").equal


def test_inspect_and_convert_of_the_output_show_the_same_aliases(tmp_path, cli):
    out = tmp_path / "shared.pt"
    code, _, stderr = cli("convert", FIXTURES / "shared_storage.pt", "-o", out)
    assert code == 0, stderr
    code, stdout, _ = cli("inspect", out, "--json")
    got = {t["name"]: t["alias_of"] for t in json.loads(stdout)["tensors"]}
    code, stdout, _ = cli("inspect", FIXTURES / "shared_storage.pt", "--json")
    assert got == {t["name"]: t["alias_of"] for t in json.loads(stdout)["tensors"]}
    code, stdout, _ = cli("diff", out, FIXTURES / "shared_storage.pt", "--json")
    assert code == 0 and json.loads(stdout)["equal"]


def test_torch_saved_views_read_as_ties(tmp_path):
    w = torch.arange(24.0).reshape(6, 4)
    torch.save({"w": w, "rows": w[1:5], "cols": w[:, :2], "flat": w.view(-1)}, tmp_path / "v.pt")
    c = wsurgery.load(tmp_path / "v.pt")
    assert {n: a.record()["transform"] for n, a in c.aliases.items()} == {
        "rows": ["slice(0,1,5)"],
        "cols": ["slice(1,0,2)"],
        "flat": ["reshape(24)"],
    }
    assert all(a.source == "w" for a in c.aliases.values())


def test_view_arithmetic_agrees_with_torch():
    """``layout_of`` places a view where torch does; ``view_steps`` finds steps that give it."""
    rng = random.Random(3)
    for _ in range(600):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
        base = torch.arange(torch.Size(shape).numel()).reshape(shape)
        cur, specs = base, []
        for _ in range(rng.randint(1, 3)):
            r = cur.dim()
            kind = rng.choice(["transpose", "permute", "reshape", "slice"])
            if kind == "transpose" and r >= 2:
                step = "transpose({},{})".format(*rng.sample(range(r), 2))
            elif kind == "permute":
                dims = list(range(r))
                rng.shuffle(dims)
                step = f"permute({','.join(map(str, dims))})"
            elif kind == "slice":
                d = rng.randrange(r)
                a = rng.randrange(cur.shape[d])
                step = f"slice({d},{a},{rng.randint(a + 1, cur.shape[d])})"
            else:
                n, dims = cur.numel(), []
                while n > 1:
                    f = rng.choice([k for k in range(1, n + 1) if n % k == 0])
                    dims.append(f)
                    n //= f
                step = f"reshape({','.join(map(str, dims or [1]))})"
            try:
                cur = parse([step]).apply(cur)
            except Exception:
                continue
            specs.append(step)
        layout = layout_of(parse(specs), shape, "int64")
        assert layout.same_as(Strided.of(cur)), (shape, specs)
        found = view_steps(Strided.of(base), layout)
        assert found is not None, (shape, specs)
        assert torch.equal(parse(found).apply(base), cur) and Strided.of(parse(found).apply(base)).same_as(layout)


# --- in place, defaults, formats ------------------------------------------------------------------


def test_in_place_on_a_pt_keeps_the_torch_format(tmp_path, cli):
    path = tmp_path / "m.pt"
    torch.save({"a": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2, 3)}, path)
    code, stdout, stderr = cli("tie", path, "--src", "a", "--dst", "b", "--in-place")
    assert code == 0, stderr
    assert f"wrote {path} (torch)" in stdout
    assert sniff.sniff(str(path))[0] == sniff.TORCH_ZIP
    sd = tload(path)
    assert sd["b"].data_ptr() == sd["a"].data_ptr() and torch.equal(sd["b"], torch.arange(6.0).reshape(2, 3))
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]
    # and -o naming the input, with --in-place, is the same thing
    code, _, stderr = cli("untie", path, "-o", path, "--in-place")
    assert code == 0, stderr
    sd = tload(path)
    assert sd["b"].data_ptr() != sd["a"].data_ptr() and torch.equal(sd["a"], sd["b"])


def test_default_output_follows_the_format(tmp_path, cli):
    st = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2, 2), "b": torch.zeros(2, 2)}, st)
    code, _, stderr = cli("tie", st, "--src", "a", "--dst", "b", "--format", "torch")
    assert code == 0, stderr
    assert sniff.sniff(str(tmp_path / "m.pt"))[0] == sniff.TORCH_ZIP
    # the default .pt of a .pt input is the input: refused unless in place
    code, _, stderr = cli("untie", tmp_path / "m.pt", "--format", "torch")
    assert code == 5 and "is an input" in stderr
    # without --format, the default stays <input>.safetensors
    code, _, stderr = cli("untie", tmp_path / "m.pt")
    assert code == 5 and "m.safetensors exists" in stderr


@pytest.mark.parametrize(
    "args,flag,words",
    [
        (["--format", "torch", "-o", "out.safetensors"], "--format", "does not match"),
        (["--format", "safetensors", "-o", "out.pt"], "--format", "does not match"),
        (["--format", "onnx", "-o", "out.onnx"], "--format", "is not one of safetensors, torch"),
    ],
)
def test_format_conflicts_are_usage_errors(tmp_path, cli, args, flag, words):
    for extra in ([], ["--dry-run"]):
        command = ["convert"] if not extra else ["untie"]
        code, stdout, stderr = cli(*command, FIXTURES / "shared_storage.pt", *args, *extra)
        assert code == 2, stderr
        assert stderr.startswith(f"error: {flag}") and words in stderr and stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_library_format_argument(tmp_path):
    with wsurgery.open(FIXTURES / "tiny_lm.safetensors") as c:
        r = c.save(tmp_path / "out.weights", format="torch")
        assert r.format == "torch" and sniff.sniff(str(tmp_path / "out.weights"))[0] == sniff.TORCH_ZIP
        shards = c.save(tmp_path / "x", format="torch", max_shard_size="1KB")  # torch shards, as transformers'
        assert shards.format == "torch" and len(shards.shards or []) > 1
        with pytest.raises(UsageError, match="does not match"):
            c.save(tmp_path / "x.safetensors", format="torch")
    r = wsurgery.convert(FIXTURES / "tiny_lm.pt", tmp_path / "conv", format="torch")
    assert r.format == "torch" and set(tload(tmp_path / "conv")) == set(tload(FIXTURES / "tiny_lm.pt"))
    assert wsurgery.convert(FIXTURES / "tiny_lm.pt", tmp_path / "c.pt").format == "torch"


def test_metadata_a_torch_file_cannot_keep_is_reported(tmp_path, cli):
    st = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2)}, st, metadata={"format": "pt", "note": "hello", "step": "3"})
    r = wsurgery.convert(st, tmp_path / "m.pt")
    assert r.dropped_metadata == ["note", "step"]
    code, stdout, _ = cli("convert", st, "-o", tmp_path / "n.pt", "--json")
    assert json.loads(stdout)["dropped_metadata"] == ["note", "step"] and json.loads(stdout)["format"] == "torch"
    code, stdout, _ = cli("convert", st, "-o", tmp_path / "o.pt")
    assert "metadata not kept (a torch file holds tensors only): note, step" in stdout


# --- determinism, streaming, atomicity -------------------------------------------------------------


def test_the_same_checkpoint_gives_the_same_bytes(tmp_path):
    sd = {"emb": torch.randn(16, 4), "head": torch.zeros(16, 4), "x": torch.randn(3, dtype=torch.float64)}
    save_file(sd, tmp_path / "m.safetensors")
    torch.save(sd, tmp_path / "m.pt")
    outs = []
    for i, (src, sync) in enumerate([("m.safetensors", True), ("m.safetensors", False), ("m.pt", True)]):
        with wsurgery.open(tmp_path / src) as c:
            c.tie("emb", "head").save(tmp_path / f"out{i}.pt", sync=sync)
        outs.append((tmp_path / f"out{i}.pt").read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_writing_from_safetensors_never_imports_torch(tmp_path):
    code = (
        "import sys, wsurgery\n"
        "with wsurgery.open(sys.argv[1]) as c:\n"
        "    c.tie('embedding.weight', 'projection.weight', 'slice(0,0,32)').copy('layers.0', 'layers.9', 'scale(2)')"
        ".save(sys.argv[2])\n"
        "assert 'torch' not in sys.modules\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, FIXTURES / "tiny_lm.safetensors", tmp_path / "o.pt"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    sd = tload(tmp_path / "o.pt")
    assert shares(sd["embedding.weight"], sd["projection.weight"])


def test_a_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path, monkeypatch, cli):
    dest = tmp_path / "out.pt"
    dest.write_bytes(b"old contents")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "copy_file_range", full, raising=False)
    code, _, stderr = cli("convert", FIXTURES / "tiny_lm.safetensors", "-o", dest, "--force")
    assert code == 5 and "No space left on device" in stderr and stderr.count("\n") == 1
    assert dest.read_bytes() == b"old contents" and leftovers(tmp_path) == []

    monkeypatch.undo()
    from wsurgery.io.safetensors import FileStored

    def bug(self, f):
        f.write_bytes(b"partial")
        raise RuntimeError("bug")

    monkeypatch.setattr(FileStored, "write", bug)
    with pytest.raises(RuntimeError, match="bug"):
        wsurgery.convert(FIXTURES / "tiny_lm.safetensors", tmp_path / "new.pt")
    assert not (tmp_path / "new.pt").exists() and leftovers(tmp_path) == []


def test_refuses_non_regular_outputs_and_existing_files(tmp_path):
    with pytest.raises(OutputError) as info:
        wsurgery.convert(FIXTURES / "tiny_lm.pt", "/dev/null", format="torch", overwrite=True)
    assert info.value.reason == "not_regular"
    (tmp_path / "x.pt").write_bytes(b"keep")
    with pytest.raises(OutputError) as info:
        wsurgery.convert(FIXTURES / "tiny_lm.pt", tmp_path / "x.pt")
    assert info.value.reason == "exists" and (tmp_path / "x.pt").read_bytes() == b"keep"
    digest = sha256(FIXTURES / "tiny_lm.pt")
    with pytest.raises(OutputError) as info:
        wsurgery.convert(FIXTURES / "tiny_lm.pt", FIXTURES / "tiny_lm.pt")
    assert info.value.reason == "is_input" and sha256(FIXTURES / "tiny_lm.pt") == digest
