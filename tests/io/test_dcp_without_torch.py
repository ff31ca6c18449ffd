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
for args in sys.argv[1:]:
    try:
        app(args.split("|"))
    except SystemExit as e:
        assert e.code == 0, (args, e.code)
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not bad, bad[:5]
print("ok")
"""


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
    proc = subprocess.run([sys.executable, "-c", RUN_ALL, *commands], capture_output=True, text=True, cwd=ROOT,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
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


def _tensorless_common(folder: Path) -> None:
    """Megatron's common.pt as training writes it: arguments and counters, no tensor."""
    import argparse

    torch.save({"args": argparse.Namespace(lr=0.1), "checkpoint_version": 3.0, "iteration": 7}, folder / "common.pt")


@pytest.mark.parametrize(("name", "weights"), [("megatron_tiny", "."), ("nemo2_tiny", "weights")])
def test_megatron_and_nemo2_folders_import_no_torch_when_common_pt_holds_no_tensor(tmp_path, name, weights):
    import shutil

    src = tmp_path / name
    shutil.copytree(FIXTURES / name, src)
    _tensorless_common(src / weights)
    ref = tmp_path / "ref.safetensors"
    with wsurgery.open(FIXTURES / name) as c:  # the fixture's own common.pt holds a tensor: read through torch
        wsurgery.save_state_dict({k: v for k, v in c.state_dict().items() if k != "rng_state_seed"}, ref)
    commands = [f"inspect|{src}|--json", f"diff|{src}|{ref}|--quiet", f"convert|{src}|-o|{tmp_path / 'c.safetensors'}"]
    proc = subprocess.run([sys.executable, "-c", RUN_ALL, *commands], capture_output=True, text=True, cwd=ROOT,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with wsurgery.open(src) as c:
        assert "common.pt: args: placeholder for argparse.Namespace" in c.skipped
        assert "common.pt: iteration: int" in c.skipped
    got = wsurgery.load_state_dict(tmp_path / "c.safetensors")
    assert sorted(got) == sorted(wsurgery.load_state_dict(ref))
