"""Hostile torch pickles: no pickle runs code, training checkpoints still yield their
tensors through inert placeholders, and size bombs are refused before anything is allocated."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import pytest
import torch

import wsurgery
from wsurgery.errors import InputError, UnsafePickleError
from wsurgery.io import pickles
from wsurgery.io.pickles.load import _restricted_load
from wsurgery.io.sniff import TORCH_LEGACY, TORCH_ZIP

from ..conftest import run_module, sha256

# --- crafting ------------------------------------------------------------------------------


class Storage:
    """Pickles as the persistent id torch.save writes for a storage."""

    def __init__(self, key: str, stype=torch.FloatStorage, numel: int = 4, view=None, legacy=False):
        self.pid = ("storage", stype, key, "cpu", numel) + ((view,) if legacy else ())


class Rebuild:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""

    def __init__(self, storage, size=(4,), stride=(1,), offset=0):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class Call:
    """Pickles as a call of ``fn(*args)``: the shape of every code-execution payload."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Storage) else None


def dumps(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def make_zip(path, pkl: bytes, records: dict[str, bytes] | None = None, *, compress_pkl=False, extra=()):
    """A torch zip archive (``archive/data.pkl``, ``archive/data/<key>``, ``version``, ``byteorder``)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl, compress_type=zipfile.ZIP_DEFLATED if compress_pkl else None)
        z.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
        for name, data in extra:
            z.writestr(name, data)
    return path


def make_legacy(path, main: bytes, storages: list[tuple[str, int, bytes]]):
    """The legacy torch format: magic, protocol, sys_info, main pickle, keys, then each storage."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, 2), pickle.dumps(1001, 2), pickle.dumps(sys_info, 2), main]
    parts.append(pickle.dumps([k for k, _, _ in storages], 2))
    for _, numel, data in storages:
        parts.append(struct.pack("<q", numel) + data)
    path.write_bytes(b"".join(parts))
    return path


def floats(*values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def fake_module(monkeypatch, name: str, **classes):
    """Register classes under a module name that is not installed, so pickle can name them."""
    mod = types.ModuleType(name)
    for cls_name, cls in classes.items():
        cls.__module__, cls.__qualname__ = name, cls_name
        setattr(mod, cls_name, cls)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def assert_one_line_exit_3(cli, path, *needles):
    code, stdout, stderr = cli("inspect", path)
    lines = stderr.strip().splitlines()
    assert code == 3, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert str(path) in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- no pickle runs code ---------------------------------------------------------------------


def _payloads(marker: str):
    import builtins

    return {
        "os.system": (Call(os.system, f"touch {marker}"), "posix.system"),
        "os.popen": (Call(os.popen, f"touch {marker}"), "os.popen"),
        "exec": (Call(builtins.exec, f"open({marker!r}, 'w').close()"), "builtins.exec"),
        "eval": (Call(builtins.eval, f"open({marker!r}, 'w')"), "builtins.eval"),
        "subprocess": (Call(subprocess.call, ["touch", marker]), "subprocess.call"),
        "nested-in-config": (
            Call(collections.OrderedDict, [("k", Call(os.system, f"touch {marker}"))]),
            "posix.system",
        ),
    }


@pytest.mark.parametrize("fmt", ["zip", "legacy", "protocol4"])
@pytest.mark.parametrize("payload", list(_payloads("m")))
def test_no_pickle_runs_code(tmp_path, cli, payload, fmt):
    marker = tmp_path / "MARKER"
    evil, glob = _payloads(str(marker))[payload]
    obj = {"weight": torch.ones(3), "evil": evil}
    path = tmp_path / f"evil-{payload}.pt"
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        make_zip(path, dumps({"evil": evil}, protocol=4))
    digest = sha256(path)
    line = assert_one_line_exit_3(cli, path, f"refused to unpickle global {glob}", "never runs code")
    assert not marker.exists(), line
    code, _, _ = cli("convert", path, "-o", tmp_path / "out.safetensors")
    assert code == 3 and not (tmp_path / "out.safetensors").exists() and not marker.exists()
    assert sha256(path) == digest


def _raw_getattr_import_chain(marker: str) -> bytes:
    """getattr(__import__('os'), 'system')('touch MARKER'), spelled in raw opcodes (Python 2 names)."""
    return (
        b"\x80\x02c__builtin__\ngetattr\n"
        b"c__builtin__\n__import__\nX\x02\x00\x00\x00os\x85R"
        b"X\x06\x00\x00\x00system\x86R"
        + b"X"
        + struct.pack("<I", len(f"touch {marker}"))
        + f"touch {marker}".encode()
        + b"\x85R."
    )


@pytest.mark.parametrize("wrap", ["zip", "legacy-magic-only"])
def test_raw_getattr_import_chain_is_refused(tmp_path, cli, wrap):
    marker = tmp_path / "MARKER"
    raw = _raw_getattr_import_chain(str(marker))
    path = tmp_path / "chain.pt"
    if wrap == "zip":
        make_zip(path, raw)
    else:
        path.write_bytes(raw)  # a legacy file whose first pickle is the payload
    assert_one_line_exit_3(cli, path, "refused to unpickle global builtins.getattr")
    assert not marker.exists()


def test_a_dangerous_global_that_is_never_called_still_refuses_the_file(tmp_path, cli):
    path = make_zip(
        tmp_path / "ref.pt", dumps({"fn": os.system, "t": Rebuild(Storage("0"))}), {"0": floats(1, 2, 3, 4)}
    )
    assert_one_line_exit_3(cli, path, "global posix.system")


def test_refusal_in_a_real_process(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Call(os.system, f"touch {marker}")}, path)
    r = run_module("convert", path, cwd=tmp_path)
    assert r.returncode == 3 and "posix.system" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()


# --- training checkpoints yield their tensors ---------------------------------------------------------


class Config:
    def __init__(self):
        self.lr, self.layers = 0.1, [1, 2]


class TrainerState:
    pass


def lightning_like(monkeypatch):
    fake_module(monkeypatch, "not_installed_pkg", Config=Config, TrainerState=TrainerState)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, generator=g)
    sd = {"model.w": w, "model.w_t": w.t(), "model.b": torch.zeros(4)}
    opt = {"state": {0: {"exp_avg": torch.ones(4, 3), "step": torch.tensor(5.0)}}, "param_groups": [{"lr": 0.1}]}
    return {
        "epoch": 2,
        "global_step": 40,
        "state_dict": sd,
        "optimizer_states": [opt],
        "hyper_parameters": {"config": Config(), "name": "run-1"},
        "callbacks": {"Trainer": TrainerState()},
    }, sd


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_training_checkpoint_with_unknown_classes_yields_its_state_dict(tmp_path, cli, monkeypatch, legacy):
    ckpt, sd = lightning_like(monkeypatch)
    path = tmp_path / "train.ckpt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    monkeypatch.delitem(sys.modules, "not_installed_pkg")  # as on a machine without the package
    c = wsurgery.load(path)
    assert set(c.names()) == {"model.w", "model.w_t", "model.b"}
    assert c.aliases["model.w_t"].source == "model.w" and c.aliases["model.w_t"].specs == ["transpose"]
    assert torch.equal(c.tensor("model.w"), sd["model.w"]) and torch.equal(c.tensor("model.w_t"), sd["model.w"].t())
    skipped = "\n".join(c.skipped)
    assert "hyper_parameters: dict holding placeholders for not_installed_pkg.Config" in skipped
    assert "callbacks: dict holding placeholders for not_installed_pkg.TrainerState" in skipped
    assert "epoch: int" in skipped and "optimizer_states: list" in skipped
    assert "restricted unpickler" in c.skipped[0]

    code, stdout, stderr = cli("inspect", path, "--json")
    assert code == 0, stderr
    assert "hyper_parameters: dict holding placeholders for not_installed_pkg.Config" in json.loads(stdout)["skipped"]
    code, stdout, _ = cli("inspect", path)
    assert code == 0 and "placeholders for not_installed_pkg.Config" in " ".join(stdout.split())


def test_placeholder_classes_are_never_imported_nor_called(tmp_path, monkeypatch):
    """The class's real module exists on disk; importing it or running its methods would leave a marker."""
    marker = tmp_path / "MARKER"
    pkg = tmp_path / "pkgdir"
    pkg.mkdir()
    (pkg / "trap_pkg.py").write_text(
        f"open({str(marker)!r}, 'a').write('imported\\n')\n"
        "class Trap:\n"
        f"    def __init__(self, *a, **k): open({str(marker)!r}, 'a').write('init\\n')\n"
        f"    def __setstate__(self, s): open({str(marker)!r}, 'a').write('setstate\\n')\n"
        f"    def __reduce__(self): open({str(marker)!r}, 'a').write('reduce\\n')\n"
    )

    class Trap:  # the stand-in used to write the pickle: same module and name as the real one
        def __init__(self):
            self.payload = "x"

    fake_module(monkeypatch, "trap_pkg", Trap=Trap)
    path = tmp_path / "trap.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "trap": Trap(), "made": Call(Trap)}, path)
    monkeypatch.delitem(sys.modules, "trap_pkg")
    r = run_module("inspect", path, "--json", env={"PYTHONPATH": str(pkg)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [t["name"] for t in report["tensors"]] == ["w"]
    assert "trap: placeholder for trap_pkg.Trap" in report["skipped"]
    assert not marker.exists(), marker.read_text()


def test_whole_pickled_module_yields_its_state_dict(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model.register_buffer("scratch", torch.ones(2), persistent=False)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    c = wsurgery.load(path)
    expected = model.state_dict()
    assert set(c.names()) == set(expected) and "scratch" not in c.names()
    for name, value in expected.items():
        assert torch.equal(c.tensor(name), value), name


def test_model_pickled_under_the_model_key(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "wrapped.pt"
    torch.save({"model": model, "epoch": 1}, path)
    c = wsurgery.load(path)
    assert c.container == "model" and set(c.names()) == {"weight", "bias"} and "epoch: int" in c.skipped


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_higher_pickle_protocols_load(tmp_path, protocol):
    sd = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    path = tmp_path / f"p{protocol}.pt"
    torch.save(sd, path, pickle_protocol=protocol)
    got = wsurgery.load_state_dict(path)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_both_routes_agree_on_a_plain_checkpoint(fixtures):
    path = str(fixtures / "shared_storage.pt")
    layout = pickles.scan(path, zip_format=True)
    via_torch = pickles.extract_state_dict(pickles.torch_load(path, mmap=True), path).tensors
    obj, notes, placeholders = _restricted_load(layout)
    via_ours = pickles.extract_state_dict(obj, path).tensors
    assert via_torch.keys() == via_ours.keys() and not notes and not placeholders
    for k in via_torch:
        t, o = via_torch[k], via_ours[k]
        assert torch.equal(t, o) and t.stride() == o.stride() and t.storage_offset() == o.storage_offset()
    assert via_ours["projection.weight"].data_ptr() == via_ours["embedding.weight"].data_ptr()


def test_the_restricted_loader_never_writes_to_the_file(tmp_path, monkeypatch):
    ckpt, _ = lightning_like(monkeypatch)
    path = tmp_path / "train.ckpt"
    torch.save(ckpt, path)
    digest = sha256(path)
    sd = wsurgery.load_state_dict(path)
    sd["model.w"].add_(100.0)  # a private (copy-on-write) mapping: the file keeps its bytes
    del sd
    assert sha256(path) == digest


# --- size bombs and malformed archives -------------------------------------------------------------


def test_storage_claiming_more_than_its_zip_entry(tmp_path, cli):
    pkl = dumps({"w": Rebuild(Storage("0", numel=10**12), size=(10**12,))})
    path = make_zip(tmp_path / "bomb.pt", pkl, {"0": floats(1, 2, 3, 4)})
    assert_one_line_exit_3(cli, path, "storage '0' claims 4000000000000 bytes", "its zip entry holds 16")


def test_storage_with_no_zip_entry(tmp_path, cli):
    path = make_zip(tmp_path / "missing.pt", dumps({"w": Rebuild(Storage("7"))}), {"0": floats(1, 2, 3, 4)})
    assert_one_line_exit_3(cli, path, "storage '7' has no zip entry data/7")


def test_storage_claimed_twice_with_different_sizes(tmp_path, cli):
    pkl = dumps({"a": Rebuild(Storage("0", numel=4)), "b": Rebuild(Storage("0", numel=2), size=(2,))})
    path = make_zip(tmp_path / "twice.pt", pkl, {"0": floats(1, 2, 3, 4)})
    assert_one_line_exit_3(cli, path, "claimed twice")


def _patch_central_size(data: bytes, name: bytes, new_size: int) -> bytes:
    """Set the compressed and uncompressed sizes of ``name`` in the central directory."""
    i = data.index(name, data.index(b"PK\x01\x02"))
    head = data.rindex(b"PK\x01\x02", 0, i)
    return data[: head + 20] + struct.pack("<II", new_size, new_size) + data[head + 28 :]


def test_zip_entry_claiming_more_bytes_than_the_file(tmp_path, cli):
    good = make_zip(tmp_path / "good.pt", dumps({"w": Rebuild(Storage("0"))}), {"0": floats(1, 2, 3, 4)})
    path = tmp_path / "liar.pt"
    path.write_bytes(_patch_central_size(good.read_bytes(), b"archive/data/0", 0x7FFFFFF0))
    assert_one_line_exit_3(cli, path, "past the end of the file")


def test_deflate_bomb_is_refused_before_inflating(tmp_path, cli):
    pkl = dumps({"w": Rebuild(Storage("0")), "pad": "x" * (1 << 20)})
    path = make_zip(tmp_path / "deflated.pt", pkl, {"0": floats(1, 2, 3, 4)}, compress_pkl=True)
    data = path.read_bytes()
    assert len(data) < 1 << 16 and wsurgery.load_state_dict(path)["w"].tolist() == [1, 2, 3, 4]  # honest: loads
    liar = tmp_path / "bomb.pt"
    head = data.index(b"archive/data.pkl", data.index(b"PK\x01\x02"))
    cd = data.rindex(b"PK\x01\x02", 0, head)
    liar.write_bytes(data[: cd + 24] + struct.pack("<I", 0xFFFFFFF0) + data[cd + 28 :])  # uncompressed size
    assert_one_line_exit_3(cli, liar, "claims to inflate to 4294967280 bytes")


def test_overlapping_zip_entries(tmp_path, cli):
    good = make_zip(tmp_path / "good.pt", dumps({"w": Rebuild(Storage("0"))}), {"0": floats(1, 2, 3, 4)})
    data = bytearray(good.read_bytes())
    # Point data/0's central-directory record at data.pkl's local header.
    head = data.index(b"archive/data/0", data.index(b"PK\x01\x02"))
    cd = data.rindex(b"PK\x01\x02", 0, head)
    data[cd + 42 : cd + 46] = struct.pack("<I", 0)
    (tmp_path / "overlap.pt").write_bytes(bytes(data))
    assert_one_line_exit_3(cli, tmp_path / "overlap.pt", "overlap")


def test_duplicate_zip_entries(tmp_path, cli):
    path = tmp_path / "dup.pt"
    make_zip(path, dumps({"w": Rebuild(Storage("0"))}), {"0": floats(1, 2, 3, 4)})
    with pytest.warns(UserWarning), zipfile.ZipFile(path, "a") as z:
        z.writestr("archive/data/0", floats(9, 9, 9, 9))
    assert_one_line_exit_3(cli, path, "appears twice")


def test_torchscript_archive_is_refused(tmp_path, cli):
    path = make_zip(tmp_path / "ts.pt", dumps({}), extra=[("archive/constants.pkl", dumps(()))])
    assert_one_line_exit_3(cli, path, "TorchScript archive")


def test_legacy_storage_claiming_more_than_its_data(tmp_path, cli):
    main = dumps({"w": Rebuild(Storage("1", numel=2**40, legacy=True), size=(4,))})
    path = make_legacy(tmp_path / "legacy-bomb.pt", main, [("1", 4, floats(1, 2, 3, 4))])
    assert_one_line_exit_3(cli, path, "storage '1': the pickle claims 4398046511104 bytes")


def test_legacy_storage_running_past_the_end(tmp_path, cli):
    main = dumps({"w": Rebuild(Storage("1", numel=1000, legacy=True), size=(4,))})
    path = make_legacy(tmp_path / "legacy-short.pt", main, [("1", 1000, floats(1, 2, 3, 4))])
    assert_one_line_exit_3(cli, path, "runs 3984 bytes past the end")


def test_legacy_craft_is_valid_when_honest(tmp_path):
    main = dumps({"w": Rebuild(Storage("1", numel=4, legacy=True))})
    path = make_legacy(tmp_path / "legacy.pt", main, [("1", 4, floats(1, 2, 3, 4))])
    assert wsurgery.load_state_dict(path)["w"].tolist() == [1, 2, 3, 4]


def test_expanded_view_size_bomb(tmp_path, cli):
    path = tmp_path / "expand.pt"
    torch.save({"w": torch.zeros(1).expand(10**6, 10**6)}, path)
    assert_one_line_exit_3(cli, path, "tensor 'w' is a (1000000, 1000000) view over 4 bytes", "size bomb")


def test_small_expanded_view_is_materialised(tmp_path):
    path = tmp_path / "small.pt"
    torch.save({"w": torch.arange(3.0).expand(2, 3)}, path)
    assert wsurgery.load_state_dict(path)["w"].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_out_of_bounds_view_is_refused(tmp_path, cli):
    pkl = dumps({"w": Rebuild(Storage("0"), size=(8,))})
    path = make_zip(tmp_path / "oob.pt", pkl, {"0": floats(1, 2, 3, 4)})
    assert_one_line_exit_3(cli, path, "reaches 32 bytes into a storage of 16", "a view larger than its storage")


def test_deep_dict_key_that_would_crash_the_interpreter(tmp_path):
    """Hashing a key nested 300,000 deep overflows the C stack (torch.load(weights_only=True)
    dies with SIGSEGV on this 300 kB file); the scan refuses it before anything hashes it."""
    n = 300_000
    pkl = b"\x80\x02}" + b")" + b"\x85" * n + b"Ns."
    path = make_zip(tmp_path / "deep.pt", pkl)
    r = run_module("inspect", path)
    assert r.returncode == 3, (r.returncode, r.stderr[-300:])
    assert "nested more than 64 deep" in r.stderr


def test_self_referencing_state_dict_does_not_hang(tmp_path, cli):
    pkl = b"\x80\x02}q\x00(X\x01\x00\x00\x00ah\x00X\x01\x00\x00\x00bh\x00u."  # d = {}; d['a'] = d; d['b'] = d
    path = make_zip(tmp_path / "cycle.pt", pkl)
    code, _, stderr = cli("inspect", path)
    assert code == 0, stderr


@pytest.mark.parametrize(
    "pkl, rule",
    [
        (b"\x80\x02}", "truncated pickle"),
        (b"\x80\x02}X\xff\xff\xff\x7f", "truncated pickle"),
        (b"\x80\x02s.", "stack underflow"),
        (b"\x80\x02h\x05.", "memo entry 5 read before it was written"),
        (b"\x80\x02I12\n.", "unsupported pickle opcode 0x49"),
        (b"\x80\x02\x82\x01.", "unsupported pickle opcode 0x82"),
        (b"\x80\x09}.", "pickle protocol 9"),
        (b"\x80\x02}N.", "not balanced at STOP"),
        (b"\x80\x02X\x01\x00\x00\x00a)R.", "not an allowed function"),
        (b"\x80\x02}(]X\x01\x00\x00\x00au.", "unhashable list"),
        (b"\x80\x02K\x01Q.", "a persistent id is a 1, not a tuple"),
    ],
)
def test_malformed_pickles(tmp_path, cli, pkl, rule):
    path = make_zip(tmp_path / "bad.pt", pkl)
    assert_one_line_exit_3(cli, path, rule)


@pytest.mark.parametrize(
    "data, rule",
    [
        (b"\x80", "truncated pickle"),
        (b"\x80\x02K\x05.", "wrong magic number"),
        (b"PK\x03\x04" + b"\0" * 40, "not a readable zip archive"),
    ],
)
def test_malformed_files(tmp_path, cli, data, rule):
    path = tmp_path / "bad.pt"
    path.write_bytes(data)
    assert_one_line_exit_3(cli, path, rule)


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.99])
def test_truncated_real_checkpoints(fixtures, cli, cut):
    for name in ("tiny_lm.pt", "lightning.ckpt"):
        data = (fixtures / name).read_bytes()
        path = fixtures / f"cut-{name}"
        path.write_bytes(data[: int(len(data) * cut)])
        assert_one_line_exit_3(cli, path)


def test_single_tensor_and_non_dict_files(tmp_path, cli):
    torch.save(torch.ones(3), tmp_path / "t.pt")
    assert_one_line_exit_3(cli, tmp_path / "t.pt", "single tensor, not a state dict")
    torch.save([torch.ones(3)], tmp_path / "l.pt")
    assert_one_line_exit_3(cli, tmp_path / "l.pt", "expected a dict of tensors, found list")


def test_non_unicode_tensor_name(tmp_path, cli):
    path = make_zip(tmp_path / "sur.pt", dumps({"bad\udc80": Rebuild(Storage("0"))}), {"0": floats(1, 2, 3, 4)})
    assert_one_line_exit_3(cli, path, "is not valid Unicode")


def test_load_pickle_error_classes(tmp_path):
    torch.save({"x": Call(os.system, "true")}, tmp_path / "e.pt")
    with pytest.raises(UnsafePickleError):
        wsurgery.load(tmp_path / "e.pt")
    (tmp_path / "b.pt").write_bytes(b"\x80\x02}")
    with pytest.raises(InputError):
        wsurgery.load(tmp_path / "b.pt")


def test_refused_global_policy():
    refused = [
        "os.system",
        "posix.system",
        "nt.system",
        "subprocess.Popen",
        "builtins.eval",
        "builtins.exec",
        "builtins.getattr",
        "builtins.__import__",
        "__builtin__.open",
        "sys.modules",
        "importlib.import_module",
        "shutil.rmtree",
        "socket.socket",
        "ctypes.CDLL",
        "runpy._run_code",
        "torch.load",
        "torch.jit.load",
        "operator.attrgetter",
        "types.FunctionType",
        "my_pkg.Config.__init__",
        "numpy.load",
        "io.open",
    ]
    inert = [
        "my_pkg.Config",
        "argparse.Namespace",
        "pathlib.PosixPath",
        "functools.partial",
        "numpy.dtype",
        "omegaconf.dictconfig.DictConfig",
        "torch.nn.modules.linear.Linear",
        "builtins.int",
        "collections.deque",
        "numpy.random._pickle.__randomstate_ctor",
    ]
    for q in refused:
        module, _, name = q.rpartition(".")
        assert pickles.refused_global(module, name), q
    for q in inert:
        module, _, name = q.rpartition(".")
        assert not pickles.refused_global(module, name), q


def test_sniffed_formats_of_the_crafts(tmp_path):
    from wsurgery.io.sniff import sniff

    z = make_zip(tmp_path / "a.pt", dumps({}))
    main = dumps({})
    legacy = make_legacy(tmp_path / "b.pt", main, [])
    assert sniff(str(z))[0] == TORCH_ZIP and sniff(str(legacy))[0] == TORCH_LEGACY


@pytest.mark.parametrize("legacy", [False, True])
def test_a_training_scripts_own_classes_become_placeholders(tmp_path, legacy):
    """Classes defined in the training script pickle as ``__main__.X``: inert, not refused."""
    path = tmp_path / "run.ckpt"
    script = (
        "import sys, torch\n"
        "class Config:\n"
        "    def __init__(self):\n"
        "        self.lr = 0.1\n"
        f"torch.save({{'state_dict': {{'w': torch.arange(4.0)}}, 'hparams': Config()}}, sys.argv[1], "
        f"_use_new_zipfile_serialization={not legacy})\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    c = wsurgery.load(path)
    assert torch.equal(c.tensor("w"), torch.arange(4.0))
    assert any("__main__.Config" in s for s in c.skipped)
    r = run_module("inspect", path)
    assert r.returncode == 0 and "__main__.Config" in r.stdout and "Config.was" not in r.stdout
    # a dunder *name* is still refused, whatever the module
    assert pickles.refused_global("__main__", "__builtins__")
    assert pickles.refused_global("mypkg.__init__", "x") is True
    assert not pickles.refused_global("__main__", "Config")
