"""DCP folders read without torch: a chunk in the torch_save layout is a torch zip at an
offset, read by the pickles package's inert scan and viewed in place. ``inspect``,
``diff``, ``check``, ``convert`` and ``apply`` of a DCP folder import no torch module, and
give the values torch's own loader gives."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wsurgery
from wsurgery.io.ranges import ByteRange, plain_tensor

from ..conftest import FIXTURES, ROOT

DCP_FOLDERS = ["tiny_lm_dcp", "tiny_lm_dcp_sharded"]

RUN_ALL = """
import sys
from wsurgery.cli.app import app
for args in sys.argv[2:]:
    try:
        app(args.split("|"))
    except SystemExit as e:
        assert e.code == 0, (args, e.code)
bad = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1].split(","))
assert not bad, bad[:5]
print("ok")
"""


def _run_all(commands: list[str], unimported: str = "torch") -> None:
    """Run CLI commands (arguments joined by ``|``) in one fresh interpreter; each must
    succeed, and none may import the modules named in ``unimported``."""
    proc = subprocess.run([sys.executable, "-c", RUN_ALL, unimported, *commands], capture_output=True, text=True,
                          cwd=ROOT, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize("name", DCP_FOLDERS)
def test_commands_on_a_dcp_folder_import_no_torch(tmp_path, name):
    src = FIXTURES / name
    recipe = tmp_path / "r.yaml"
    recipe.write_text('version: 1\nsteps:\n  - rename: {pattern: "^layers\\\\.", to: "model.layers."}\n')
    ref = FIXTURES / "tiny_lm.safetensors"
    commands = [
        f"inspect|{src}|--json",
        f"diff|{src}|{ref}|--json",
        f"diff|{src}|{FIXTURES / 'tiny_lm_dcp'}|--quiet",
        f"check|{src}|--src|layers|--dst|layers|--from|{ref}",
        f"convert|{src}|-o|{tmp_path / 'c.safetensors'}",
        f"apply|{recipe}|{src}|-o|{tmp_path / 'a.safetensors'}",
    ]
    _run_all(commands)
    expect = wsurgery.load_state_dict(ref)
    got = wsurgery.load_state_dict(tmp_path / "c.safetensors")
    assert sorted(got) == sorted(expect)
    for key, value in expect.items():
        assert torch.equal(got[key], value), key
    renamed = wsurgery.load_state_dict(tmp_path / "a.safetensors")
    assert torch.equal(renamed["model.layers.0.mlp.up.weight"], expect["layers.0.mlp.up.weight"])


def _blob(value) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _at(tmp_path: Path, blob: bytes, pad: int = 37) -> ByteRange:
    path = tmp_path / "blob.distcp"
    path.write_bytes(b"\0" * pad + blob + b"\0" * 11)
    return ByteRange(str(path), pad, len(blob), f"blob.distcp[{pad}:{pad + len(blob)}]")


@pytest.mark.parametrize(
    "value",
    [
        torch.arange(24, dtype=torch.float32).reshape(4, 6),
        torch.arange(24, dtype=torch.bfloat16).reshape(2, 3, 4),
        torch.tensor(3, dtype=torch.int64),
        torch.zeros(0, 5, dtype=torch.float16),
        torch.tensor([True, False, True]),
    ],
)
def test_a_plain_blob_is_located_as_torch_locates_it(tmp_path, value):
    rng = _at(tmp_path, _blob(value))
    plain = plain_tensor(rng)
    assert plain is not None
    assert (plain.dtype, plain.size) == (str(value.dtype).removeprefix("torch."), tuple(value.shape))
    raw = plain.raw()
    assert raw is not None
    path, offset, nbytes = raw
    with open(path, "rb") as f:
        f.seek(offset)
        assert f.read(nbytes) == value.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_a_strided_blob_is_read_by_its_strides(tmp_path):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    view = base[1:5, 2:7].t()  # an offset, non-contiguous view over a larger storage
    rng = _at(tmp_path, _blob(view))
    plain = plain_tensor(rng)
    assert plain is not None and plain.raw() is None
    assert (plain.offset, plain.size, plain.stride) == (view.storage_offset(), tuple(view.shape), view.stride())


@pytest.mark.parametrize(
    "value",
    [
        {"w": torch.ones(2)},  # a dict: torch's loader decides
        torch.nn.Parameter(torch.ones(2)),  # a Parameter: a global outside the plain set
        torch.ones(2, dtype=torch.complex64).conj(),  # a conjugate flag in the tensor's metadata
    ],
)
def test_anything_but_a_plain_tensor_goes_to_torch(tmp_path, value):
    assert plain_tensor(_at(tmp_path, _blob(value))) is None


@pytest.mark.parametrize("name", ["tiny_lm_dcp", "megatron_tiny"])
def test_inspect_and_convert_of_contiguous_chunks_import_no_numpy(tmp_path, name):
    """Chunks that hold their tensor whole are copied as raw bytes: nothing is decoded."""
    src = FIXTURES / name
    if name == "megatron_tiny":  # its sharded tensors are assembled (numpy): keep the whole ones
        src = tmp_path / name
        _one_chunk_copy(FIXTURES / name, src)
    _run_all([f"inspect|{src}|--json", f"convert|{src}|-o|{tmp_path / 'c.safetensors'}"], "torch,numpy")
    with wsurgery.open(src) as c:
        expect = c.state_dict()
    got = wsurgery.load_state_dict(tmp_path / "c.safetensors")
    assert sorted(got) == sorted(expect)
    assert all(torch.equal(got[k], v) for k, v in expect.items())


def test_tensors_split_along_their_first_dim_are_copied_chunk_by_chunk_without_numpy(tmp_path):
    """A tensor split into contiguous runs (rows: FSDP's dim-0 shards, a column-parallel
    weight) is its chunks' bytes one after another: each copied in the kernel, nothing
    assembled. The fixture's one tensor split along dim 1 is dropped first."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text('version: 1\nsteps:\n  - drop: ["layers.0.mlp.up.weight"]\n')
    out = tmp_path / "c.safetensors"
    _run_all([f"apply|{recipe}|{FIXTURES / 'tiny_lm_dcp_sharded'}|-o|{out}"], "torch,numpy")
    expect = wsurgery.load_state_dict(FIXTURES / "tiny_lm.safetensors")
    got = wsurgery.load_state_dict(out)
    assert sorted(got) == sorted(k for k in expect if k != "layers.0.mlp.up.weight")
    assert all(torch.equal(got[k], expect[k]) for k in got)


class _Src:
    def __init__(self, name: str):
        self.name = name


@pytest.mark.parametrize(
    ("shape", "boxes", "order"),
    [
        ((4, 6), [((2, 0), (2, 6)), ((0, 0), (2, 6))], [1, 0]),  # rows, listed out of order
        ((2, 4, 6), [((1, 0, 0), (1, 4, 6)), ((0, 0, 0), (1, 4, 6))], [1, 0]),
        # each box inside one outer slice, split along dim 1: still one run each
        ((2, 4, 6), [((0, 0, 0), (1, 2, 6)), ((1, 2, 0), (1, 2, 6)), ((0, 2, 0), (1, 2, 6)), ((1, 0, 0), (1, 2, 6))],
         [0, 2, 3, 1]),
        ((2, 4, 6), [((0, 0, 0), (2, 2, 6)), ((0, 2, 0), (2, 2, 6))], None),  # dim 1 of both layers: not runs
        ((4, 6), [((0, 0), (4, 3)), ((0, 3), (4, 3))], None),  # columns
        ((4,), [((0,), (0,)), ((0,), (4,))], [1]),  # an empty chunk holds no bytes
    ],
)  # fmt: skip
def test_chunks_are_runs_only_when_each_is_contiguous_in_the_tensor(shape, boxes, order):
    from wsurgery.io.dcp import TensorPlan
    from wsurgery.io.dcp_metadata import Chunk, tiling_problem

    chunks = [(Chunk(o, s), _Src(str(i))) for i, (o, s) in enumerate(boxes)]
    assert tiling_problem(shape, [c for c, _ in chunks]) is None
    runs = TensorPlan("t", "float32", shape, chunks).runs()  # type: ignore[arg-type]
    assert (None if runs is None else [int(r.name) for r in runs]) == order


def _one_chunk_copy(src: Path, dst: Path) -> None:
    """A Megatron folder like ``src`` whose DCP data torch wrote in one process: every
    tensor one chunk (common.pt, with its tensor, and metadata.json copied)."""
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp

    with wsurgery.open(src) as c:
        sd = {k: v.clone() for k, v in c.state_dict().items() if k != "rng_state_seed"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: one process
        dcp.save(sd, checkpoint_id=str(dst))
    for name in ("metadata.json", "common.pt"):
        shutil.copyfile(src / name, dst / name)


def test_plain_chunk_values_match_torch_on_every_fixture_chunk():
    for name in DCP_FOLDERS:
        with wsurgery.open(FIXTURES / name) as c:
            for key, stored in c.stored.items():
                for _, src in stored.plan.chunks:
                    mine = src.tensor()
                    src._plain, src._probed = None, False
                    theirs = src._load()  # through torch.load(weights_only=True)
                    assert torch.equal(mine, theirs), (name, key)


def test_the_storage_class_tables_are_torchs():
    from wsurgery.io.pickles.allowlist import _constructors, _storage_types

    for dtype, cls in torch.storage._dtype_to_storage_type_map().items():
        st = _storage_types()[f"torch.{cls}"]
        assert (st.dtype_name, st.itemsize) == (str(dtype).removeprefix("torch."), torch._utils._element_size(dtype))
    assert len(_storage_types()) == len(torch.storage._dtype_to_storage_type_map()) + 2
    theirs = {
        f"{c.__module__}.{c.__name__}": getattr(c, "dtype", torch.float32).itemsize for c in torch._tensor_classes
    }
    assert {k: v for k, v in _constructors().items() if k in theirs} == theirs


def _tensorless_common(folder: Path) -> dict:
    """Megatron's common.pt as training writes it: arguments and counters, no tensor."""
    import argparse

    torch.save({"args": argparse.Namespace(lr=0.1), "checkpoint_version": 3.0, "iteration": 7}, folder / "common.pt")
    return {}


def _common_with_tensors(folder: Path) -> dict:
    """A common.pt that holds tensors beside the arguments: nested dicts and lists, an
    OrderedDict, several dtypes, a strided view and an empty tensor (seeded). Returns the
    names its tensors flatten to, with torch.load's values."""
    import argparse
    from collections import OrderedDict

    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 8, generator=g)
    common = {
        "args": argparse.Namespace(lr=0.1, params_dtype=torch.bfloat16, seq_length=torch.Size([4])),
        "checkpoint_version": 3.0,
        "iteration": 7,
        "rng_state": [
            {
                "random_rng_state": torch.randint(0, 255, (16,), generator=g, dtype=torch.uint8),
                "cuda_rng_state": torch.zeros(0, dtype=torch.int64),
            }
        ],  # fmt: skip
        "grad_scaler": OrderedDict(scale=torch.tensor(65536.0), growth=torch.tensor(3, dtype=torch.int32)),
        "extra": {
            "half": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "view": base[1:5, 2:7].t(),
            "mask": torch.tensor([True, False, True]),
        },  # fmt: skip
    }
    torch.save(common, folder / "common.pt")
    loaded = torch.load(folder / "common.pt", weights_only=False)
    rng = loaded["rng_state"][0]
    return {
        "rng_state.0.random_rng_state": rng["random_rng_state"],
        "rng_state.0.cuda_rng_state": rng["cuda_rng_state"],
        "grad_scaler.scale": loaded["grad_scaler"]["scale"],
        "grad_scaler.growth": loaded["grad_scaler"]["growth"],
        "extra.half": loaded["extra"]["half"],
        "extra.view": loaded["extra"]["view"],
        "extra.mask": loaded["extra"]["mask"],
    }


@pytest.mark.parametrize("common", [_tensorless_common, _common_with_tensors])
@pytest.mark.parametrize(("name", "weights"), [("megatron_tiny", "."), ("nemo2_tiny", "weights")])
def test_megatron_and_nemo2_folders_import_no_torch(tmp_path, name, weights, common):
    import shutil

    src = tmp_path / name
    shutil.copytree(FIXTURES / name, src)
    expect = common(src / weights)
    ref = tmp_path / "ref.safetensors"
    with wsurgery.open(FIXTURES / name) as c:
        sharded = {k: v for k, v in c.state_dict().items() if k != "rng_state_seed"}
    wsurgery.save_state_dict({**sharded, **{k: v.contiguous() for k, v in expect.items()}}, ref)
    commands = [f"inspect|{src}|--json", f"diff|{src}|{ref}|--quiet", f"convert|{src}|-o|{tmp_path / 'c.safetensors'}"]
    _run_all(commands)
    with wsurgery.open(src) as c:
        assert "common.pt: args: placeholder for argparse.Namespace" in c.skipped
        assert "common.pt: iteration: int" in c.skipped
    got = wsurgery.load_state_dict(tmp_path / "c.safetensors")
    assert sorted(got) == sorted({**sharded, **expect})
    for key, value in expect.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


NEMO_ARCHIVES = ["tiny_lm.nemo", "tiny_lm_gz.nemo", "tiny_lm_mp.nemo/mp_rank_01", "megatron_tiny.nemo"]


@pytest.mark.parametrize("name", NEMO_ARCHIVES)
def test_nemo_archives_import_no_torch_and_read_torchs_values(tmp_path, name):
    src = FIXTURES / name
    out = tmp_path / "c.safetensors"
    commands = [f"inspect|{src}|--json", f"convert|{src}|-o|{out}"]
    _run_all(commands)
    expect = _torch_loaded_archive(src, tmp_path)
    got = wsurgery.load_state_dict(out)
    assert sorted(got) == sorted(expect)
    for key, value in expect.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def _torch_loaded_archive(src: Path, tmp_path: Path) -> dict:
    """The archive's tensors as torch.load reads its members (extracted with tarfile)."""
    import tarfile

    archive, rank = (src, None) if src.exists() else (src.parent, src.name)
    with tarfile.open(archive) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    root = tmp_path / "x"
    weights = root / (rank or ".") / "model_weights.ckpt"
    if weights.exists():
        return dict(torch.load(weights, weights_only=True))
    with wsurgery.open(root / "model_weights") as c:  # torch_dist inside: its DCP data beside common.pt
        out = {k: v for k, v in c.state_dict().items() if k != "rng_state_seed"}
    common = torch.load(root / "model_weights" / "common.pt", weights_only=False)
    return {**out, "rng_state_seed": common["rng_state_seed"]}


def _saved(tmp_path: Path, value) -> ByteRange:
    path = tmp_path / "state.pt"
    torch.save(value, path)
    return ByteRange(str(path), 0, path.stat().st_size, "state.pt")


def test_a_plain_state_has_torchs_names_values_and_skipped_entries(tmp_path):
    from collections import OrderedDict

    from wsurgery.io.dcp import PlainChunk
    from wsurgery.io.pickles import load_pickle
    from wsurgery.io.ranges import FileMaps, plain_state

    g = torch.Generator().manual_seed(11)
    value = OrderedDict(
        [("w", torch.randn(4, 3, generator=g)), ("layers", [torch.arange(5, dtype=torch.int16), {"b": torch.ones(2)}]),
         (3, torch.tensor(2.5, dtype=torch.float64)), ("note", "text"), ("steps", [1, 2, 3])]
    )  # fmt: skip
    rng = _saved(tmp_path, value)
    state = plain_state(rng)
    assert state is not None
    theirs = load_pickle(rng.path, zip_format=True)
    assert list(state.tensors) == list(theirs.tensors)
    assert state.skipped == theirs.skipped == ["note: str", "steps: list"]
    maps = FileMaps()
    for key, t in theirs.tensors.items():
        mine = PlainChunk(state.tensors[key], maps).tensor()
        assert mine.dtype == t.dtype and torch.equal(mine, t), key
    maps.close()


class _Holder:
    """A class outside every allow-list: the scan sees a placeholder."""

    def __init__(self, t):
        self.t = t


@pytest.mark.parametrize(
    "make",
    [
        lambda t: {"a": t, "b": t},  # a tie: shared storage becomes an alias through torch's path
        lambda t: {"a": t[:2], "b": t[2:]},  # two views of one storage
        lambda t: {"p": torch.nn.Parameter(t)},  # a global outside the plain set
        lambda t: {"a": t, "held": _Holder(t.clone())},  # a storage reached only through an object
        lambda t: {"c": t.to(torch.complex128)},  # a dtype safetensors cannot store
        lambda t: t,  # not a state dict
    ],
)
def test_anything_but_plain_tensors_leaves_the_state_to_torchs_path(tmp_path, make):
    from wsurgery.io.ranges import plain_state

    assert plain_state(_saved(tmp_path, make(torch.arange(4, dtype=torch.float32)))) is None
