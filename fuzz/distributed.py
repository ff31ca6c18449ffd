"""Fuzz targets for the distributed layouts: DCP ``.metadata`` and ``.distcp`` bytes,
structural DCP layouts (random chunk boxes, storage records and file names over real
``torch.save`` blobs), DCP's safetensors sharding info, and ``.nemo`` archives (byte
mutations, random member lists, tar and tar.gz).

Each target obeys the contract of ``tests/fuzz/test_formats.py`` (:func:`exercise`): a load,
then reading every tensor and writing the checkpoint back, either succeeds or raises a
one-line wsurgery error; never another exception, never a hang, never code run. A
structural layout that is valid by construction must load, with the values it was built
from. ``tests/fuzz/test_distributed.py`` runs them bounded; ``fuzz/campaign.py`` runs
them for minutes beside the others.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import math
import pickle
import shutil
import struct
import tarfile
import warnings
from pathlib import Path

import torch
from hypothesis import strategies as st

from tests.fuzz.test_formats import MARKER, exercise, mutated, workdir

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def _fresh(name: str) -> Path:
    folder = workdir() / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _no_marker() -> None:
    assert not (workdir() / MARKER).exists() and not Path(MARKER).exists(), "a checkpoint ran code"


# ----------------------------------------------------------------------------- byte mutations


def mutated_dcp_metadata(data: bytes) -> None:
    folder = _fresh("dcp-meta")
    for f in (FIXTURES / "tiny_lm_dcp_sharded").iterdir():
        shutil.copy(f, folder / f.name)
    (folder / ".metadata").write_bytes(data)
    exercise(folder)
    _no_marker()


def mutated_dcp_chunks(data: bytes) -> None:
    folder = _fresh("dcp-chunks")
    shutil.copy(FIXTURES / "tiny_lm_dcp" / ".metadata", folder / ".metadata")
    (folder / "__0_0.distcp").write_bytes(data)
    exercise(folder)
    _no_marker()


def mutated_nemo(case: tuple[str, bytes]) -> None:
    kind, data = case
    path = workdir() / f"m-{kind}.nemo"
    path.write_bytes(data)
    exercise(path)
    _no_marker()


# ----------------------------------------------------------------------------- structural DCP

HOSTILE_FILES = ["__0_0.distcp", "__1_0.distcp", "../x.distcp", "/etc/passwd", "", "a/../../b", "x\x00y", "missing"]
DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@st.composite
def dcp_layout(draw):
    """A tensor split into a grid of chunks, each saved as a real blob, then perhaps broken:
    a chunk moved, resized, dropped or repeated, a record pointed elsewhere. Returns
    ``(shape, dtype, chunks, records, valid)``; ``records`` are ``(file, offset, length)``
    of each chunk, ``valid`` whether nothing was broken."""
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    cuts = []
    for n in shape:
        inner = sorted(draw(st.sets(st.integers(1, n - 1), max_size=2)) if n > 1 else set())
        cuts.append([0, *inner, n])
    boxes = [((), ())]
    for d in range(len(shape)):
        boxes = [(o + (a,), s + (b - a,)) for o, s in boxes for a, b in zip(cuts[d], cuts[d][1:], strict=False)]
    valid = True
    edit = draw(st.sampled_from(["none", "none", "none", "move", "grow", "drop", "repeat", "record"]))
    records = [("__0_0.distcp" if i % 2 == 0 else "__1_0.distcp", None, None) for i in range(len(boxes))]
    if edit != "none":
        i = draw(st.integers(0, len(boxes) - 1))
        o, s = boxes[i]
        d = draw(st.integers(0, len(shape) - 1))
        if edit == "move":
            o = o[:d] + (o[d] + draw(st.sampled_from([-1, 1, 2, 2**62])),) + o[d + 1 :]
            boxes[i] = (o, s)
        elif edit == "grow":
            boxes[i] = (o, s[:d] + (s[d] + draw(st.sampled_from([-1, 1, 2**62])),) + s[d + 1 :])
        elif edit == "drop":
            del boxes[i]
            del records[i]
        elif edit == "repeat":
            boxes.append(boxes[i])
            records.append(records[i])
        else:
            records[i] = (
                draw(st.sampled_from(HOSTILE_FILES)),
                draw(st.sampled_from([None, 0, 1, 2**40, -1])),
                draw(st.sampled_from([None, 0, 7, 2**40])),
            )
        valid = False
    return shape, dtype, boxes, records, valid


def _values(shape, dtype) -> torch.Tensor:
    full = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    return (full % 2).to(torch.bool) if dtype == torch.bool else (full % 200).to(dtype)


def structural_dcp(case) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    shape, dtype, boxes, records, valid = case
    folder = _fresh("dcp-struct")
    full = _values(shape, dtype)
    files: dict[str, io.BytesIO] = {"__0_0.distcp": io.BytesIO(), "__1_0.distcp": io.BytesIO()}
    storage = {}
    chunks = []
    for (o, s), (rel, offset, length) in zip(boxes, records, strict=True):
        chunks.append(ChunkStorageMetadata(torch.Size(o), torch.Size(s)))
        if any(a < 0 or a + b > n for a, b, n in zip(o, s, shape, strict=False)) or any(b < 0 for b in s):
            part = torch.zeros(tuple(max(0, min(b, 4)) for b in s), dtype=dtype)
        else:
            part = full[tuple(slice(a, a + b) for a, b in zip(o, s, strict=True))].clone()
        target = files.get(rel, files["__0_0.distcp"])
        start = target.tell()
        torch.save(part, target)
        size = target.tell() - start
        index = MetadataIndex("w", o)
        storage[index] = _StorageInfo(rel, start if offset is None else offset, size if length is None else length)
    props = TensorProperties(dtype=dtype)
    md = Metadata({"w": TensorStorageMetadata(props, torch.Size(shape), chunks)}, storage_data=storage)
    for name, buf in files.items():
        (folder / name).write_bytes(buf.getvalue())
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)
    outcome = exercise(folder)
    assert outcome == "loaded" or not valid, "a valid DCP layout was refused"
    if valid:
        import wsurgery

        assert torch.equal(wsurgery.load_state_dict(folder)["w"], full)


def dcp_safetensors_offsets(case) -> None:
    """Random DCP_SHARDING_INFO offsets over the two real shards of ``tiny_lm_dcp_hf``."""
    name, offsets = case
    folder = _fresh("dcp-hf")
    for f in (FIXTURES / "tiny_lm_dcp_hf").iterdir():
        shutil.copy(f, folder / f.name)
    shard = folder / "shard-00002-model-00001-of-00001.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
    info[name] = {"saved_offsets": offsets} if offsets != "drop" else None
    if offsets == "drop":
        del info[name]
    header["__metadata__"]["DCP_SHARDING_INFO"] = json.dumps(info)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    exercise(folder)


# ----------------------------------------------------------------------------- structural .nemo

MEMBER_NAMES = ["./model_config.yaml", "./model_weights.ckpt", "model_weights.ckpt", "mp_rank_00/model_weights.ckpt",
                "tp_rank_01_pp_rank_000/model_weights.ckpt", "../evil", "/abs", "a/../../b", "a\\b", "model_weights/x",
                ".", "mp_rank_00", "x" * 300]  # fmt: skip
KINDS = [tarfile.REGTYPE] * 6 + [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]


@st.composite
def nemo_members(draw):
    members = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(MEMBER_NAMES) | st.text(max_size=12))
        kind = draw(st.sampled_from(KINDS))
        content = draw(st.sampled_from(["weights", "config", "junk", "empty"]))
        members.append((name, kind, content))
    return members, draw(st.booleans()), draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))


def structural_nemo(case) -> None:
    members, gz, fmt = case
    weights = (FIXTURES / "tiny_lm.pt").read_bytes()
    data = {"weights": weights, "config": b"num_layers: 2\n", "junk": b"\x00\xff" * 40, "empty": b""}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with tarfile.open(fileobj=buf, mode="w:", format=fmt) as tar:
                for name, kind, content in members:
                    info = tarfile.TarInfo(name)
                    info.type = kind
                    body = data[content] if kind == tarfile.REGTYPE else b""
                    info.size = len(body)
                    info.linkname = "model_weights.ckpt" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                    tar.addfile(info, io.BytesIO(body) if body else None)
        except (ValueError, UnicodeError):
            return  # a name tar itself cannot write
    raw = buf.getvalue()
    path = workdir() / "s.nemo"
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    exercise(path)
    _no_marker()


# ----------------------------------------------------------------------------- chunk grids


def _cells_oracle(shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether ``boxes`` tile ``shape`` exactly, by counting every element (small shapes)."""
    import numpy as np

    count = np.zeros(shape, dtype=np.int64)
    for o, s in boxes:
        if any(a + b > n for a, b, n in zip(o, s, shape, strict=True)):
            return False
        count[tuple(slice(a, a + b) for a, b in zip(o, s, strict=True))] += 1
    return bool(np.all(count == 1))


@st.composite
def chunk_grid(draw):
    """A tensor of 1-4 dims cut into many chunks: a regular grid (down to 1x1x1x1), a
    brick wall (each row cut at its own points), or random cuts; then perhaps broken (a
    chunk duplicated, dropped, shifted or grown, an empty chunk added, the list shuffled)."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 12), min_size=ndim, max_size=ndim)))
    kind = draw(st.sampled_from(["unit", "grid", "bricks"]))
    boxes: list = []
    if kind == "bricks" and ndim >= 2:
        for r in range(shape[0]):
            inner = sorted(draw(st.sets(st.integers(1, max(1, shape[1] - 1)), max_size=3)) if shape[1] > 1 else set())
            cuts = [0, *inner, shape[1]]
            rest = tuple(shape[2:])
            boxes += [((r, a, *(0,) * len(rest)), (1, b - a, *rest)) for a, b in zip(cuts, cuts[1:], strict=False)]
    else:
        step = [1 if kind == "unit" else draw(st.integers(1, n)) for n in shape]
        for o in itertools.product(*[range(0, n, k) for n, k in zip(shape, step, strict=True)]):
            boxes.append((tuple(o), tuple(min(k, n - a) for a, k, n in zip(o, step, shape, strict=True))))
    edit = draw(st.sampled_from(["none", "none", "duplicate", "drop", "shift", "grow", "empty", "shuffle"]))
    i = draw(st.integers(0, len(boxes) - 1))
    o, s = boxes[i]
    d = draw(st.integers(0, ndim - 1))
    if edit == "duplicate":
        boxes.append(boxes[i])
    elif edit == "drop" and len(boxes) > 1:
        del boxes[i]
    elif edit == "shift":
        boxes[i] = (o[:d] + (max(0, o[d] + draw(st.sampled_from([-1, 1]))),) + o[d + 1 :], s)
    elif edit == "grow":
        boxes[i] = (o, s[:d] + (s[d] + 1,) + s[d + 1 :])
    elif edit == "empty":
        boxes.append((o, s[:d] + (0,) + s[d + 1 :]))
    if edit == "shuffle" or draw(st.booleans()):
        draw(st.randoms(use_true_random=False)).shuffle(boxes)
    return shape, boxes


def dcp_chunk_grid(case) -> None:
    """The tiling check agrees with an element count on every layout, in bounded time,
    and a metadata file of the layout parses and validates to the same verdict."""
    import time

    from tests.fuzz.test_formats import TRIED
    from wsurgery.errors import InputError
    from wsurgery.io.dcp_metadata import Chunk, parse_metadata, tiling_problem, validate

    shape, boxes = case
    TRIED["inputs"] += 1
    start = time.perf_counter()
    why = tiling_problem(shape, [Chunk(o, s) for o, s in boxes])
    assert time.perf_counter() - start < 5, "the tiling check is slow"
    assert (why is None) == _cells_oracle(shape, boxes), why
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]
    storage = {MetadataIndex("w", torch.Size(o), i): _StorageInfo("__0_0.distcp", 0, 4 * math.prod(s))
               for i, (o, s) in enumerate(boxes)}  # fmt: skip
    md = Metadata({"w": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape), chunks)},
                  storage_data=storage)  # fmt: skip
    try:
        pieces, _ = validate(parse_metadata(pickle.dumps(md), "grid/.metadata"), "grid/.metadata")
    except InputError as exc:
        assert "\n" not in str(exc)
        assert why is not None or "storage record" in str(exc) or "chunks" in str(exc), str(exc)
        TRIED["refused"] += 1
        return
    assert why is None, f"validate accepted a layout the tiling check refuses: {why}"
    assert len(pieces["w"]) == len(boxes)
    TRIED["loaded"] += 1


# ----------------------------------------------------------------------------- .nemo member paths

_COMPONENTS = ["a", "model_weights", ".", "..", "", "mp_rank_00", "x" * 255, "é", "model_weights.ckpt"]


@st.composite
def nemo_member_path(draw):
    """A ``.nemo`` holding the real weights and one member (file or folder) whose path is
    drawn: deep (up to 2,000 folders), long, with ``.``, ``..`` and empty components."""
    depth = draw(st.sampled_from([1, 2, 3, 31, 32, 33, 64, 1400, 2000]))
    part = draw(st.sampled_from(_COMPONENTS))
    mixed = draw(st.booleans())
    parts = [draw(st.sampled_from(_COMPONENTS)) if mixed else part for _ in range(depth)]
    under = draw(st.sampled_from(["", "model_weights/", "mp_rank_00/", "./"]))
    return under + "/".join(parts), draw(st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE])), draw(st.booleans())


def nemo_member_paths(case) -> None:
    name, kind, gz = case
    weights = (FIXTURES / "tiny_lm.pt").read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.GNU_FORMAT) as tar:
        for n, body, k in (("model_weights.ckpt", weights, tarfile.REGTYPE), (name, b"x", kind)):
            info = tarfile.TarInfo(n)
            info.type = k
            info.size = len(body) if k == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(body) if k == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    path = workdir() / "p.nemo"
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    exercise(path)
    _no_marker()


# ----------------------------------------------------------------------------- registry


def _seed(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


NEMO_SEEDS = {"tar": _seed("tiny_lm.nemo"), "gz": _seed("tiny_lm_gz.nemo"), "dist": _seed("megatron_tiny.nemo")}

# name -> (strategy of one input, target), as tests/fuzz/test_formats.py's TARGETS
TARGETS = {
    "mutated_dcp_metadata": (mutated(_seed("tiny_lm_dcp_sharded/.metadata")), mutated_dcp_metadata),
    "mutated_dcp_chunks": (mutated(_seed("tiny_lm_dcp/__0_0.distcp")), mutated_dcp_chunks),
    "structural_dcp": (dcp_layout(), structural_dcp),
    "dcp_safetensors_offsets": (
        st.tuples(
            st.sampled_from(["embedding.weight", "layers.0.mlp.up.weight", "final_norm.weight", "ghost"]),
            st.sampled_from(["drop", [0, 0], [16, 0], [0, 4], [8, 0], [0], [-1, 0], [2**63, 0], "x", [0.5, 0]]),
        ),
        dcp_safetensors_offsets,
    ),
    "mutated_nemo": (
        st.sampled_from(sorted(NEMO_SEEDS)).flatmap(lambda k: mutated(NEMO_SEEDS[k]).map(lambda d: (k, d))),
        mutated_nemo,
    ),
    "structural_nemo": (nemo_members(), structural_nemo),
    "dcp_chunk_grid": (chunk_grid(), dcp_chunk_grid),
    "nemo_member_paths": (nemo_member_path(), nemo_member_paths),
}
