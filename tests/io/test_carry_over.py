"""Nothing is read from outside the input: a model folder's carry-over takes only regular
files whose real path lies inside it; links out and special files are named, not carried.
A NeMo 2 folder whose weights/ or context/ link out of it is refused."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import wsurgery
from wsurgery.errors import InputError

from ..io.test_model_folder import hf_folder, weights


def test_links_out_of_the_folder_are_not_carried_and_are_named(tmp_path, cli):
    src = hf_folder(tmp_path / "m", weights())
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy")
    os.remove(src / "tokenizer.json")
    os.symlink(secret, src / "tokenizer.json")
    os.symlink("/proc/self/environ", src / "environ.json")
    os.symlink("README.md", src / "README.link.md")  # a link to a file beside it: carried
    os.mkfifo(src / "pipe")
    out = tmp_path / "out"
    code, text, err = cli("cast", src, "bfloat16", "-o", out)
    assert code == 0, err
    assert not (out / "tokenizer.json").exists() and not (out / "environ.json").exists()
    assert not (out / "pipe").exists()
    assert (out / "README.link.md").read_text() == "# tiny\n" and not os.path.islink(out / "README.link.md")
    assert "tokenizer.json (a link out of the folder)" in text
    assert "environ.json (a link out of the folder)" in text and "pipe (not a regular file)" in text
    for f in out.iterdir():
        assert "do not copy" not in f.read_text(errors="replace")


def test_a_hugging_face_cache_snapshot_is_carried(tmp_path):
    """In the hub cache every file of a snapshot links to the repository's blobs/."""
    repo = tmp_path / "models--org--tiny"
    src = hf_folder(tmp_path / "plain", weights())
    snap = repo / "snapshots" / "abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        os.symlink(os.path.join("..", "..", "blobs", f.name), snap / f.name)
    with wsurgery.open(snap) as c:
        assert "tokenizer.json" in c.model_folder.files and c.model_folder.left == []
        c.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == {"model": {"vocab": {"a": 0}}}


@pytest.mark.parametrize("sub", ["weights", "context"])
def test_nemo2_parts_that_link_out_are_refused(fixtures, tmp_path, sub):
    folder = tmp_path / "nemo2"
    shutil.copytree(fixtures / "nemo2_tiny", folder, symlinks=True)
    outside = tmp_path / f"elsewhere-{sub}"
    shutil.move(folder / sub, outside)
    os.symlink(outside, folder / sub)
    with pytest.raises(InputError, match="leaves the checkpoint's folder"):
        wsurgery.open(folder)
