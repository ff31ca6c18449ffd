"""Hostile distributed checkpoints: a DCP ``.metadata`` that names any other global, chunk
boxes that overlap, leave gaps or exceed their tensor, storage records past the end of
their file or outside the folder, chunk blobs with dangerous globals, ``.nemo`` archives
with ``../`` names, links, devices or a decompression bomb, a ``common.pt`` with a
dangerous global. Each is refused with exit 3 and one line; nothing runs, nothing is
imported."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

import wsurgery
from wsurgery.errors import InputError, UnsafePickleError
from wsurgery.io import nemo

from ..conftest import FIXTURES
from ..hostile.test_pickles import Call, dumps, make_zip

MARKER = "wsurgery-hostile-MARKER"
SENTINEL = "wsurgery_sentinel_mod"


def refused(cli, path, fragment: str, command: str = "inspect", tmp: Path | None = None) -> str:
    """Run ``command`` on ``path``: exit 3, one line on stderr that names ``fragment``."""
    args = [command, path] + (["-o", (tmp or Path(path).parent) / "out.safetensors"] if command == "convert" else [])
    code, out, err = cli(*args)
    assert code == 3, (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    return err


def copy_of(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    if (FIXTURES / name).is_dir():
        shutil.copytree(FIXTURES / name, dst)
    else:
        shutil.copy(FIXTURES / name, dst)
    return dst


def rewrite_metadata(folder: Path, change) -> Path:
    """Load a fixture's ``.metadata`` with pickle (our own file: trusted), change it, write it back."""
    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)
    change(md)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return folder


def chunks(md, name: str, boxes):
    md.state_dict_metadata[name].chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]


def storage_key(md, name: str):
    return next(k for k in md.storage_data if k.fqn == name)


@pytest.fixture
def dcp(tmp_path) -> Path:
    return copy_of(tmp_path, "tiny_lm_dcp")


@pytest.fixture(autouse=True)
def no_marker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a payload that ran would create the marker here
    yield
    assert not (tmp_path / MARKER).exists(), "a checkpoint ran code"


# ----------------------------------------------------------------------------- .metadata globals


def test_metadata_naming_another_global_imports_nothing(cli, dcp, tmp_path, monkeypatch):
    """A module that would announce its import exists on the path: it is never imported."""
    (tmp_path / f"{SENTINEL}.py").write_text(f"open({MARKER!r}, 'w').close()\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (dcp / ".metadata").write_bytes(b"\x80\x02c" + SENTINEL.encode() + b"\nEvil\n)\x81.")
    with pytest.raises(UnsafePickleError, match=f"global {SENTINEL}.Evil"):
        wsurgery.open(dcp)
    assert SENTINEL not in sys.modules
    refused(cli, dcp, f"refused to unpickle global {SENTINEL}.Evil")


@pytest.mark.parametrize("payload", [(os.system, f"touch {MARKER}"), (eval, "1+1"), (print, "x")])
def test_metadata_with_a_callable_among_real_records(cli, dcp, payload):
    def plant(md):
        md.planner_data = {"x": Call(*payload)}

    rewrite_metadata(dcp, plant)
    err = refused(cli, dcp, "refused to unpickle global")
    assert "DCP metadata" in err


def test_metadata_global_that_is_allowed_elsewhere_is_refused_here(cli, dcp):
    """torch.load's allow-list is not DCP's: a tensor rebuild in .metadata is refused."""
    rewrite_metadata(dcp, lambda md: setattr(md, "planner_data", {"t": torch.ones(2)}))
    refused(cli, dcp, "torch._utils._rebuild_tensor_v2")


def test_metadata_allowed_class_in_the_wrong_place(cli, dcp):
    rewrite_metadata(dcp, lambda md: setattr(md, "state_dict_metadata", [1, 2]))
    refused(cli, dcp, "invalid DCP metadata: state_dict_metadata is list")
    (dcp / ".metadata").write_bytes(b"\x80\x02ctorch\nSize\n)\x81.")
    refused(cli, dcp, "not a metadata record")
    (dcp / ".metadata").write_bytes(b"\x80\x02(((((((((.")
    refused(cli, dcp, "invalid DCP metadata")


# ----------------------------------------------------------------------------- chunk boxes


@pytest.mark.parametrize(
    ("boxes", "fragment"),
    [
        ([((0, 0), (32, 8)), ((16, 0), (16, 8))], "overlap"),
        ([((0, 0), (16, 8)), ((16, 0), (16, 4))], "a gap"),
        ([((0, 0), (16, 8))], "cover 128 of its 256 elements"),
        ([((0, 0), (33, 8))], "exceeds dim 0 (32)"),
        ([((0, 4), (32, 8))], "exceeds dim 1 (8)"),
        ([((0,), (32,))], "1 offsets and 1 sizes for a 2-dim tensor"),
        ([((0, -1), (32, 8))], "not a non-negative integer"),
        ([((0, 0), (32, 2**70))], "not a non-negative integer"),
    ],
)
def test_chunks_must_tile_their_tensor(cli, dcp, boxes, fragment):
    rewrite_metadata(dcp, lambda md: chunks(md, "embedding.weight", boxes))
    refused(cli, dcp, fragment)


def test_chunk_without_storage_record(cli, dcp):
    def split(md):
        chunks(md, "embedding.weight", [((0, 0), (16, 8)), ((16, 0), (16, 8))])

    rewrite_metadata(dcp, split)
    refused(cli, dcp, "chunk at [16, 0] of 'embedding.weight' has no storage record")


def test_storage_record_for_an_unknown_item(cli, dcp):
    rewrite_metadata(
        dcp, lambda md: md.storage_data.update({MetadataIndex("ghost", [0]): _StorageInfo("__0_0.distcp", 0, 1)})
    )
    refused(cli, dcp, "a storage record for 'ghost'")


# ----------------------------------------------------------------------------- storage records


@pytest.mark.parametrize(
    ("rel", "offset", "length", "fragment"),
    [
        ("__0_0.distcp", 31000, 1000, "past the end of the 31188-byte file"),
        ("__0_0.distcp", 2**62, 1, "not a non-negative integer below 2**62"),
        ("__0_0.distcp", 2**61, 1, "past the end"),
        ("../tiny_lm.pt", 0, 10, "leaves its folder (..)"),
        ("sub/../../x", 0, 10, "leaves its folder (..)"),
        ("/etc/passwd", 0, 10, "is an absolute path"),
        ("__0_0.distcp\x00.pt", 0, 10, "holds a NUL or a backslash"),
        ("..\\x.distcp", 0, 10, "holds a NUL or a backslash"),
        ("__9_0.distcp", 0, 10, "no such file"),
        ("", 0, 10, "not a usable relative path"),
    ],
)
def test_storage_records_stay_inside_their_files_and_folder(cli, dcp, rel, offset, length, fragment):
    def point(md):
        md.storage_data[storage_key(md, "embedding.weight")] = _StorageInfo(rel, offset, length)

    rewrite_metadata(dcp, point)
    refused(cli, dcp, fragment)


def test_a_link_out_of_the_folder_is_refused(cli, dcp, tmp_path):
    outside = tmp_path / "outside.distcp"
    shutil.copy(dcp / "__0_0.distcp", outside)
    (dcp / "__0_0.distcp").unlink()
    (dcp / "__0_0.distcp").symlink_to(outside)
    refused(cli, dcp, "a link that leaves the checkpoint's folder")


def _point_at_blob(dcp: Path, name: str, blob: bytes) -> None:
    with open(dcp / "__0_0.distcp", "ab") as f:
        offset = f.tell()
        f.write(blob)

    def point(md):
        md.storage_data[storage_key(md, name)] = _StorageInfo("__0_0.distcp", offset, len(blob))

    rewrite_metadata(dcp, point)


def test_a_chunk_with_a_dangerous_global_never_runs(cli, dcp, tmp_path):
    blob = make_zip(io.BytesIO(), dumps(Call(os.system, f"touch {MARKER}"))).getvalue()
    _point_at_blob(dcp, "final_norm.weight", blob)
    code, _, _ = cli("inspect", dcp)
    assert code == 0  # inspect reads no chunk
    err = refused(cli, dcp, "refused to unpickle global", command="convert", tmp=tmp_path)
    assert "__0_0.distcp[" in err and "'final_norm.weight'" in err and "/proc/self" not in err
    with pytest.raises(UnsafePickleError):
        wsurgery.load_state_dict(dcp)


def test_a_chunk_torch_refuses_is_refused(cli, dcp, tmp_path):
    """A global the scan finds inert but torch's weights-only loader refuses: no fallback for chunks."""
    blob = make_zip(io.BytesIO(), dumps(Call(collections_namedtuple(), "T", "a"))).getvalue()
    _point_at_blob(dcp, "final_norm.weight", blob)
    refused(cli, dcp, "weights-only loader refused", command="convert", tmp=tmp_path)


def collections_namedtuple():
    import collections

    return collections.namedtuple


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"w": torch.ones(2)}, "expected one tensor, found dict"),
        (torch.ones(32, 8, dtype=torch.float16), "a float16 tensor of shape [32, 8], the metadata says float32"),
        (torch.ones(8, 32), "shape [8, 32], the metadata says float32 [32, 8]"),
    ],
)
def test_a_chunk_must_hold_the_tensor_the_metadata_describes(cli, dcp, tmp_path, value, fragment):
    buf = io.BytesIO()
    torch.save(value, buf)
    _point_at_blob(dcp, "embedding.weight", buf.getvalue())
    refused(cli, dcp, fragment, command="convert", tmp=tmp_path)


def test_a_chunk_cannot_claim_more_bytes_than_its_record(cli, dcp):
    """The metadata of a tiny folder cannot make wsurgery allocate a huge tensor."""

    def huge(md):
        md.state_dict_metadata["embedding.weight"].size = torch.Size([2**40, 8])
        chunks(md, "embedding.weight", [((0, 0), (2**40, 8))])

    rewrite_metadata(dcp, huge)
    refused(cli, dcp, "needs 35184372088832 bytes but its storage record holds")


def test_an_expanded_chunk_is_refused(cli, dcp, tmp_path):
    buf = io.BytesIO()
    torch.save(torch.zeros(1).expand(32, 8), buf)
    blob = buf.getvalue() + bytes(1024)  # a record long enough for the bytes it claims
    _point_at_blob(dcp, "embedding.weight", blob)
    refused(cli, dcp, "a view larger than its storage", command="convert", tmp=tmp_path)


def test_a_chunk_that_is_not_a_zip(cli, dcp, tmp_path):
    _point_at_blob(dcp, "final_norm.weight", b"PK" + bytes(200))
    refused(cli, dcp, "not a readable zip archive", command="convert", tmp=tmp_path)


def test_a_stream_transform_is_refused_when_read(cli, dcp, tmp_path):
    def zstd(md):
        key = storage_key(md, "embedding.weight")
        info = md.storage_data[key]
        md.storage_data[key] = _StorageInfo(info.relative_path, info.offset, info.length, ["stream.zstd/1"])

    rewrite_metadata(dcp, zstd)
    refused(cli, dcp, "stream transform stream.zstd/1", command="convert", tmp=tmp_path)


# ----------------------------------------------------------------------------- Megatron, DCP safetensors


def test_common_pt_with_a_dangerous_global(cli, tmp_path):
    folder = copy_of(tmp_path, "megatron_tiny")
    make_zip(folder / "common.pt", dumps({"args": Call(os.system, f"touch {MARKER}")}))
    refused(cli, folder, "common.pt: refused to unpickle global")


def test_megatron_other_backend(cli, tmp_path):
    folder = copy_of(tmp_path, "megatron_tiny")
    (folder / "metadata.json").write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
    refused(cli, folder, "sharded backend 'zarr': wsurgery reads torch_dist checkpoints only")


def _hf_header(path: Path, change) -> None:
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


@pytest.mark.parametrize(
    ("info", "fragment"),
    [
        ({"embedding.weight": {"saved_offsets": [8, 0]}}, "overlap"),
        ({"embedding.weight": {"saved_offsets": [20, 0]}}, "a gap"),
        ({"embedding.weight": {"saved_offsets": [0]}}, "no valid saved_offsets for 'embedding.weight'"),
        ({"embedding.weight": {"saved_offsets": [-16, 0]}}, "no valid saved_offsets"),
        ({}, "no valid saved_offsets"),
    ],
)
def test_dcp_safetensors_sharding_info(cli, tmp_path, info, fragment):
    import json

    folder = copy_of(tmp_path, "tiny_lm_dcp_hf")
    shard = folder / "shard-00002-model-00001-of-00001.safetensors"

    def change(header):
        old = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
        old.pop("embedding.weight")
        header["__metadata__"]["DCP_SHARDING_INFO"] = json.dumps({**old, **info})

    _hf_header(shard, change)
    refused(cli, folder, fragment)


# ----------------------------------------------------------------------------- .nemo archives


def _member(name: str, data: bytes = b"", kind=tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def write_tar(path: Path, members, *, gz: bool = False) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    data = buf.getvalue()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def _weights() -> bytes:
    return (FIXTURES / "tiny_lm.pt").read_bytes()


GOOD = [_member("./model_config.yaml", b"num_layers: 2\n"), _member("./model_weights.ckpt", _weights())]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (_member("../evil.ckpt", b"x"), "leaves its folder (..)"),
        (_member("./a/../../evil", b"x"), "leaves its folder (..)"),
        (_member("/abs/evil", b"x"), "is an absolute path"),
        (_member("a\\..\\evil", b"x"), "holds a NUL or a backslash"),
        (_member("link", kind=tarfile.SYMTYPE, link="/etc/passwd"), "member 'link' is a link"),
        (_member("hard", kind=tarfile.LNKTYPE, link="model_config.yaml"), "member 'hard' is a link"),
        (_member("dev", kind=tarfile.CHRTYPE), "is a device or a pipe"),
        (_member("blk", kind=tarfile.BLKTYPE), "is a device or a pipe"),
        (_member("fifo", kind=tarfile.FIFOTYPE), "is a device or a pipe"),
        (_member("model_weights.ckpt", b"second"), "appears twice"),
        (_member("../up", kind=tarfile.DIRTYPE), "leaves its folder (..)"),
    ],
)
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_nemo_unsafe_members(cli, tmp_path, extra, fragment, gz):
    path = write_tar(tmp_path / "model.nemo", [*GOOD, extra], gz=gz)
    refused(cli, path, fragment)
    assert not (tmp_path.parent / "evil.ckpt").exists()


def test_nemo_decompression_bomb_claimed_by_a_header(cli, tmp_path):
    """A tar.gz whose header claims a terabyte is refused before anything is inflated."""
    huge = tarfile.TarInfo("model_weights.ckpt")
    huge.size = 1 << 40
    data = _member("model_config.yaml", b"x: 1\n")[0].tobuf(tarfile.GNU_FORMAT) + b"x: 1\n".ljust(512, b"\0")
    data += huge.tobuf(tarfile.GNU_FORMAT) + bytes(4096)
    path = tmp_path / "bomb.nemo"
    path.write_bytes(gzip.compress(data, mtime=0))
    refused(cli, path, "a decompression bomb")


def test_nemo_decompression_bomb_that_inflates(cli, tmp_path, monkeypatch):
    """Highly compressible data past the budget: refused as it inflates, nothing left behind."""
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(nemo, "MIN_INFLATE_BUDGET", 1 << 20)
    zeros = _member("./model_weights.ckpt", bytes(4 << 20))
    path = write_tar(tmp_path / "zeros.nemo", [GOOD[0], zeros], gz=True)
    assert path.stat().st_size < 64 << 10
    refused(cli, path, "decompression bomb")
    assert os.listdir(scratch) == []


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME], ids=["pax", "gnu-longname"])
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_nemo_metadata_record_bomb(cli, tmp_path, kind, gz):
    """A PAX or long-name record claiming a GiB would be read into memory by tarfile: refused."""
    info = tarfile.TarInfo("././@PaxHeader" if kind == tarfile.XHDTYPE else "././@LongLink")
    info.type, info.size = kind, 1 << 30
    data = info.tobuf(tarfile.GNU_FORMAT) + bytes(1 << 16)
    path = tmp_path / "records.nemo"
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    refused(cli, path, "claims more than 16,777,216 bytes of metadata")


def test_nemo_too_many_members(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(nemo, "MAX_MEMBERS", 3)
    path = write_tar(tmp_path / "many.nemo", [*GOOD, *(_member(f"f{i}", b"") for i in range(3))])
    refused(cli, path, "more than 3 members")


def test_dcp_metadata_size_is_bounded(cli, dcp, monkeypatch):
    from wsurgery.io import dcp_metadata

    monkeypatch.setattr(dcp_metadata, "MAX_METADATA_BYTES", 1000)
    monkeypatch.setattr("wsurgery.io.dcp.MAX_METADATA_BYTES", 1000)
    refused(cli, dcp, "more than the 1000 expected")


def test_nemo_truncated_and_malformed(cli, tmp_path):
    good = write_tar(tmp_path / "good.nemo", GOOD)
    data = good.read_bytes()
    (tmp_path / "cut.nemo").write_bytes(data[:3000])
    refused(cli, tmp_path / "cut.nemo", "cut.nemo")
    (tmp_path / "bad.nemo").write_bytes(gzip.compress(b"not a tar at all" * 100))
    refused(cli, tmp_path / "bad.nemo", "not a readable .nemo archive")
    write_tar(tmp_path / "empty.nemo", [GOOD[0]])
    refused(cli, tmp_path / "empty.nemo", "holds no model_weights.ckpt")


def test_nemo_weights_with_a_dangerous_global(cli, tmp_path):
    payload = make_zip(io.BytesIO(), dumps({"w": Call(os.system, f"touch {MARKER}")})).getvalue()
    for gz in (False, True):
        path = write_tar(tmp_path / f"evil{int(gz)}.nemo", [GOOD[0], _member("model_weights.ckpt", payload)], gz=gz)
        err = refused(cli, path, "refused to unpickle global")
        assert "model_weights.ckpt" in err and "/proc/self" not in err


def test_unsafe_names_are_refused_by_the_library_too(tmp_path):
    path = write_tar(tmp_path / "m.nemo", [*GOOD, _member("../x", b"1")])
    with pytest.raises(InputError, match="leaves its folder"):
        wsurgery.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError):
            wsurgery.open(tmp_path / "m.nemo" / "mp_rank_00")


def test_a_safetensors_distcp_must_hold_the_chunk_the_metadata_describes(cli, dcp, tmp_path):
    from safetensors.torch import save_file

    save_file({"embedding.weight": torch.ones(8, 32)}, str(dcp / "__0_0.distcp"))
    refused(cli, dcp, "holds a float32 tensor of shape [8, 32] under 'embedding.weight'")
    save_file({"other": torch.ones(2)}, str(dcp / "__0_0.distcp"))
    refused(cli, dcp, "holds nothing under")
