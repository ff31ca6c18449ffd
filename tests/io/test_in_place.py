"""In place on a model folder replaces only the weights, their index and config.json;
everything else stays. A crash at any point leaves the old weights or the new ones,
whole, for a reader that prefers the single file (transformers) and for one that
prefers the index (wsurgery)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import wsurgery
from wsurgery.io import in_place

from ..io.test_model_folder import hf_folder, weights


def _tree(folder) -> dict:
    """Every entry under ``folder`` (links as their target, not followed) -> its bytes."""
    out = {}
    for top, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(top, n)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                out[rel] = open(p, "rb").read()
            else:
                out[rel] = "dir"
    return out


def _extras(folder):
    (folder / "original").mkdir()
    torch.save({"x": torch.zeros(1)}, folder / "original" / "consolidated.00.pth")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"onnx bytes")
    (folder / "model.onnx").write_bytes(b"more onnx")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    os.symlink("README.md", folder / "README.link")


@pytest.mark.parametrize("as_", ["safetensors", "sharded"])
def test_in_place_leaves_every_other_file(tmp_path, cli, as_):
    src = hf_folder(tmp_path / "m", weights(tied="no"), as_=as_)
    _extras(src)
    before = _tree(src)
    code, text, err = cli("cast", src, "bfloat16", "--in-place", "--dry-run")
    assert code == 0, err
    assert "in place: would replace" in text and "original" in text and _tree(src) == before
    code, text, err = cli("cast", src, "bfloat16", "--in-place")
    assert code == 0, err
    after = _tree(src)
    ours = {"config.json", "model.safetensors", "model.safetensors.index.json"}
    for name, value in before.items():
        if name not in ours and not name.startswith("model-"):
            assert after.get(name) == value, name
    assert "in place: wrote" in text
    with wsurgery.open(src) as c:
        assert {c.stored[n].dtype for n in c.stored} == {"bfloat16"}
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".wsurgery-tmp")]


def _read_like_transformers(folder) -> dict:
    if os.path.exists(folder / "model.safetensors"):
        return load_file(folder / "model.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for name, shard in index["weight_map"].items():
        out[name] = load_file(folder / shard)[name]
    return out


def _read_like_wsurgery(folder) -> dict:
    return wsurgery.load(folder).state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("old_as", "shards"), [("sharded", 300), ("safetensors", 300), ("sharded", None)])
def test_a_crash_at_any_step_leaves_old_or_new_weights(tmp_path, old_as, shards):
    """The process is killed (os._exit) at the k-th rename or removal of the switch, for
    every k; each time the folder reads as the old weights or the new, whole."""
    src = hf_folder(tmp_path / "m", weights(tied="no"), as_=old_as)
    _extras(src)
    old = _read_like_transformers(src)
    new = {k: v.to(torch.bfloat16) for k, v in old.items()}
    pristine = _tree(src)
    k = 0
    while True:
        k += 1
        _restore(src, pristine)
        pid = os.fork()
        if pid == 0:  # the child: dies at the k-th step of the switch
            _cast_dying_at(k, src, shards)
        _, status = os.waitpid(pid, 0)
        for read in (_read_like_transformers, _read_like_wsurgery):
            got = read(src)
            assert _same(got, old) or _same(got, new), (k, read.__name__, sorted(os.listdir(src)))
        for name, value in pristine.items():
            if name != "config.json" and (not name.startswith("model") or name.startswith("model.onnx")):
                assert _tree(src).get(name) == value, (k, name)
        if os.WEXITSTATUS(status) == 0:
            break
    assert k > 3
    assert _same(_read_like_transformers(src), new) and _same(_read_like_wsurgery(src), new)


def _cast_dying_at(k: int, src, shards) -> None:
    """In a forked child: cast ``src`` in place, the process exiting at the k-th rename
    or removal the in-place switch makes."""
    calls = [0]

    def step(fn):
        def wrapped(*a, **kw):
            calls[0] += 1
            if calls[0] == k:
                os._exit(17)
            return fn(*a, **kw)

        return wrapped

    in_place.os.replace = step(os.replace)  # the module's os is the os module: the child's own copy
    in_place.os.unlink = step(os.unlink)
    try:
        with wsurgery.open(src) as c:
            c.cast("bfloat16").save(src, overwrite=True, max_shard_size=shards, sync=False)
    finally:
        os._exit(0)


def _restore(folder, tree: dict) -> None:
    import shutil

    shutil.rmtree(folder)
    for parent in [p for p in (folder.parent).iterdir() if p.name.endswith(".wsurgery-tmp")]:
        shutil.rmtree(parent)
    folder.mkdir()
    for rel in sorted(tree):
        p = folder / rel
        v = tree[rel]
        if v == "dir":
            p.mkdir(exist_ok=True)
        elif isinstance(v, str):
            os.symlink(v[5:], p)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(v)
