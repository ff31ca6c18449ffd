"""Writes are atomic: a failed or killed write leaves nothing at the destination (and an
existing destination as it was), and no command ever modifies an input."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import wsurgery
from wsurgery.errors import InputError, OutputError
from wsurgery.io import writer
from wsurgery.io.writer import TMP_SUFFIX, WriteItem, atomic_file, write_safetensors

from ..conftest import FIXTURES, run_module, sha256

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "tests" / "recipes"


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(TMP_SUFFIX))


def big_safetensors(path: Path, mib: int, tensors: int = 1) -> Path:
    """``mib`` MiB of seeded float32 data in ``tensors`` tensors (numpy only: no torch needed)."""
    rng = np.random.default_rng(7)
    per = (mib << 20) // 4 // tensors
    save_file({f"layer.{i}.weight": rng.standard_normal(per, dtype=np.float32) for i in range(tensors)}, str(path))
    return path


# --- atomic_file ----------------------------------------------------------------------------------


def test_error_in_the_body_removes_the_temporary_and_keeps_the_destination(tmp_path):
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="boom"), atomic_file(dest) as f:
        f.write(b"partial new contents")
        raise RuntimeError("boom")
    assert dest.read_bytes() == b"old contents" and leftovers(tmp_path) == []


def test_disk_full_at_fsync_is_an_output_error(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "fsync", full)
    dest = tmp_path / "out.safetensors"
    with pytest.raises(OutputError, match="No space left on device") as info:
        write_safetensors(dest, [WriteItem("a", "uint8", (3,), 3, lambda f: f.write(b"abc"))], None)
    assert info.value.reason == "no_space" and "free some disk space" in (info.value.hint or "")
    assert not dest.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("call", ["copy_file_range", "splice"])
def test_disk_full_in_copy_file_range(tmp_path, monkeypatch, cli, call):
    src = big_safetensors(tmp_path / "in.safetensors", 1)

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    # the route taken wherever the test runs: splice on a local file system, else copy_file_range
    monkeypatch.setattr(writer, "_fs_type", lambda fd: "ext4" if call == "splice" else "nfs4")
    monkeypatch.setattr(writer.os, call, full, raising=False)
    code, _, stderr = cli("convert", src, "-o", tmp_path / "out.safetensors")
    assert code == 5 and stderr.count("\n") == 1 and "No space left on device" in stderr
    assert not (tmp_path / "out.safetensors").exists() and leftovers(tmp_path) == []


def test_source_that_shrinks_while_copying_is_an_input_error(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 10)
    with pytest.raises(InputError, match="ended 90 bytes early"), atomic_file(tmp_path / "out") as f:
        writer.copy_range(str(src), 0, 100, f)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_unwritable_destination_folder_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        with atomic_file(tmp_path / "no-such-folder" / "out.safetensors") as f:
            f.write(b"x")


def test_internal_duplicate_names_never_write_a_corrupt_file(tmp_path):
    items = [WriteItem("a", "uint8", (1,), 1, lambda f: f.write(b"a")) for _ in range(2)]
    with pytest.raises(OutputError, match="written twice"):
        write_safetensors(tmp_path / "dup.safetensors", items, None)
    assert os.listdir(tmp_path) == []


# --- file-size limit: a real process, a real EFBIG -------------------------------------------------


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run_limited(args, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m wsurgery ARGS`` under a file-size limit of ``limit`` bytes."""
    return run_module(
        *args, env={"PYTHONDONTWRITEBYTECODE": "1"}, cwd=cwd, timeout=180, preexec_fn=_limit_file_size(limit)
    )


@pytest.mark.parametrize("out_suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_file_size_limit_exits_5_and_leaves_nothing(tmp_path, kind, out_suffix):
    if kind == "safetensors":
        src = big_safetensors(tmp_path / "in.safetensors", 4, tensors=4)  # copied with copy_file_range
    else:
        src = tmp_path / "in.pt"
        torch.save({f"w{i}": torch.randn(256, 1024, generator=torch.Generator().manual_seed(i)) for i in range(4)}, src)
    digest = sha256(src)
    dest = tmp_path / f"out{out_suffix}"
    r = run_limited(["convert", src, "-o", dest], 1 << 20, tmp_path)
    assert r.returncode == 5, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {dest}: File too large"), r.stderr
    assert "ulimit -f" in lines[0] and "Traceback" not in r.stderr
    assert not dest.exists() and leftovers(tmp_path) == []
    assert sha256(src) == digest


def test_file_size_limit_keeps_an_existing_destination_whole(tmp_path):
    src = big_safetensors(tmp_path / "in.safetensors", 4, tensors=2)
    dest = tmp_path / "out.safetensors"
    big_safetensors(dest, 1)
    before = sha256(dest)
    r = run_limited(["convert", src, "-o", dest, "--force"], 2 << 20, tmp_path)
    assert r.returncode == 5, r.stderr
    assert sha256(dest) == before and leftovers(tmp_path) == []


def test_file_size_limit_on_sharded_output(tmp_path):
    src = big_safetensors(tmp_path / "in.safetensors", 4, tensors=4)
    dest = tmp_path / "shards"
    r = run_limited(["convert", src, "-o", dest, "--max-shard-size", "1MiB"], 512 << 10, tmp_path)
    assert r.returncode == 5 and r.stderr.count("\n") == 1, r.stderr
    assert not dest.exists() and leftovers(tmp_path) == []


# --- SIGKILL mid-write ---------------------------------------------------------------------------------

# The real CLI, with each tensor's copy followed by a short pause, so that "mid-write" is a
# moment the test can reach on a loaded machine (copy_file_range moves 200 MB in a blink).
_THROTTLED = """
import sys, time
import wsurgery.io.writer as c
from wsurgery.cli.app import main
_copy = c.copy_range
def slow(*args):
    _copy(*args)
    time.sleep(0.02)
c.copy_range = slow
sys.argv = ["wsurgery", *sys.argv[1:]]
main()
"""


def _kill_mid_write(args, folder: Path, dest_name: str, min_bytes: int, sig=signal.SIGKILL):
    proc = subprocess.Popen(
        [sys.executable, "-c", _THROTTLED, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
        cwd=folder,
    )
    deadline = time.monotonic() + 120
    killed_at = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = [folder / n for n in os.listdir(folder) if n.startswith(f".{dest_name}.") and n.endswith(TMP_SUFFIX)]
            size = sum(_size(p) for p in tmp)
            if size >= min_bytes:
                proc.send_signal(sig)
                killed_at = size
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    assert killed_at is not None, "the write finished before the test could kill it"
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig)
    return killed_at


def _size(p: Path) -> int:
    try:
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size
    except OSError:
        return 0


def test_sigkill_mid_write_leaves_nothing_at_the_destination(tmp_path):
    src = big_safetensors(tmp_path / "in.safetensors", 200, tensors=100)
    digest = sha256(src)
    dest = tmp_path / "out.safetensors"
    killed_at = _kill_mid_write(["convert", src, "-o", dest], tmp_path, dest.name, 20 << 20)
    assert 0 < killed_at < src.stat().st_size
    assert not dest.exists()
    assert sha256(src) == digest
    # What a kill leaves is one hidden temporary beside the destination, never the destination.
    assert all(n.startswith(".out.safetensors.") for n in leftovers(tmp_path))
    # And the same command, not killed, then writes the whole file.
    r = subprocess.run([sys.executable, "-m", "wsurgery", "convert", src, "-o", dest], capture_output=True, timeout=180)
    assert r.returncode == 0 and wsurgery.load(dest).names() == wsurgery.load(src).names()


def test_sigterm_mid_write_removes_its_temporary_too(tmp_path):
    src = big_safetensors(tmp_path / "in.safetensors", 64, tensors=32)
    digest = sha256(src)
    cases = (
        (tmp_path / "out.safetensors", []),
        (tmp_path / "shards", ["--max-shard-size", "8MiB"]),
        (tmp_path / "out.pt", []),
        (tmp_path / "folder", ["--format", "torch"]),
    )
    for dest, extra in cases:
        target = f"{dest}/" if dest.name == "folder" else dest
        _kill_mid_write(["convert", src, "-o", target, *extra], tmp_path, dest.name, 8 << 20, sig=signal.SIGTERM)
        assert not dest.exists() and sha256(src) == digest
        assert leftovers(tmp_path) == []


def test_sigkill_mid_sharded_write_leaves_nothing_at_the_destination(tmp_path):
    src = big_safetensors(tmp_path / "in.safetensors", 64, tensors=32)
    digest = sha256(src)
    dest = tmp_path / "shards"
    _kill_mid_write(["convert", src, "-o", dest, "--max-shard-size", "8MiB"], tmp_path, dest.name, 8 << 20)
    assert not dest.exists() and sha256(src) == digest


# --- no command modifies an input ------------------------------------------------------------------

# Every command, over every fixture format, including invocations that fail.
INVOCATIONS = {
    "inspect": [["inspect", "{ckpt}"], ["inspect", "{ckpt}", "--json", "--tree"], ["inspect", "{ckpt}", "--tree"]],
    "convert": [
        ["convert", "{ckpt}", "-o", "{out}"],
        ["convert", "{ckpt}", "-o", "{out}", "--max-shard-size", "1KB"],
        ["convert", "{ckpt}", "-o", "{out}.pt"],
        ["convert", "{ckpt}", "-o", "{out}.folder/", "--format", "torch"],
    ],
    "tie": [
        ["tie", "{ckpt}", "--src", "{a}", "--dst", "{b}", "-o", "{out}"],
        ["tie", "{ckpt}", "--src", "{a}", "--dst", "nope", "-o", "{out}"],
        ["tie", "{ckpt}", "--src", "missing", "--dst", "{b}", "-o", "{out}"],
        ["tie", "{ckpt}", "--src", "{a}", "--dst", "{b}", "-o", "{out}.pt"],
        ["tie", "{ckpt}", "--src", "{a}", "--dst", "{b}", "-o", "{out}.folder/"],
    ],
    "copy": [
        ["copy", "{ckpt}", "--src", "{a}", "--dst", "new.{a}", "-o", "{out}"],
        ["copy", "{ckpt}", "--src", "{a}", "--dst", "{b}", "--transform", "scale(2)", "-o", "{out}"],
        ["copy", "{ckpt}", "--src", "{a}", "--dst", "{b}", "--from", "{other}", "-o", "{out}"],
        ["copy", "{ckpt}", "--src", "{a}", "--dst", "{b}", "--transform", "cast(float16)", "-o", "{out}", "--dry-run"],
    ],
    "untie": [["untie", "{ckpt}", "-o", "{out}"], ["untie", "{ckpt}", "--dst", "{b}", "-o", "{out}"]],
    "rename": [["rename", "{ckpt}", "^", "x.", "-o", "{out}"], ["rename", "{ckpt}", ".*", "same", "-o", "{out}"]],
    "drop": [["drop", "{ckpt}", "{a}", "-o", "{out}"], ["drop", "{ckpt}", "nothing.*", "-o", "{out}"]],
    "keep": [["keep", "{ckpt}", "{a}", "-o", "{out}"], ["keep", "{ckpt}", "*", "-o", "{out}", "--in-place"]],
    "cast": [["cast", "{ckpt}", "bfloat16", "-o", "{out}"], ["cast", "{ckpt}", "int8", "-o", "{out}"]],
    "concat": [["concat", "{ckpt}", "--src", "{a}", "--src", "{b}", "--dst", "joined", "-o", "{out}"]],
    "split": [
        ["split", "{ckpt}", "--src", "{a}", "--dst", "p0", "--dst", "p1", "--sizes", "1,-1", "-o", "{out}"],
        ["split", "{ckpt}", "--src", "{a}", "--dst", "p0", "--dst", "p1", "--sizes", "16,16", "-o", "{out}"],
    ],
    "stack": [["stack", "{ckpt}", "--src", "layers.{{i}}", "--dst", "layers", "-o", "{out}"]],
    "unstack": [["unstack", "{ckpt}", "--src", "{a}", "--dst", "row.{{i}}", "--new", "-o", "{out}"]],
    "apply": [
        ["apply", str(RECIPES / "cast_untie.yaml"), "{ckpt}", "-o", "{out}"],
        ["apply", str(RECIPES / "copy_from.yaml"), "{ckpt}", "{other}", "-o", "{out}"],
        ["apply", str(RECIPES / "expect_fails.yaml"), "{ckpt}", "-o", "{out}"],
        ["apply", str(RECIPES / "cast_untie.yaml"), "{ckpt}", "-o", "{out}", "--dry-run", "--json"],
    ],
    "diff": [["diff", "{ckpt}", "{other}"], ["diff", "{ckpt}", "{ckpt}", "--json"]],
    "merge": [
        ["merge", "{ckpt}", "{ckpt}", "--weights", "1,3", "-o", "{out}"],
        ["merge", "{ckpt}", "{other}", "-o", "{out}"],
        ["merge", "{ckpt}", "{ckpt}", "--method", "slerp", "--t", "0.5", "-o", "{out}.folder/", "--dry-run"],
    ],
    "merge-lora": [
        ["merge-lora", "{ckpt}", str(FIXTURES / "tiny_lm_lora"), "-o", "{out}"],
        ["merge-lora", "{ckpt}", "{other}", "-o", "{out}"],
    ],
    "check": [
        ["check", "{ckpt}", "--src", "{a}", "--dst", "{b}"],
        ["check", "{ckpt}", "--src", "{a}", "--dst", "{a}", "--from", "{other}", "--json"],
    ],
}
CHECKPOINTS = {  # name -> (a tensor, another tensor of the same shape)
    "tiny_lm.pt": ("embedding.weight", "projection.weight"),
    "tiny_lm.safetensors": ("embedding.weight", "projection.weight"),
    "tiny_lm_sharded": ("embedding.weight", "projection.weight"),
    "shared_storage.pt": ("embedding.weight", "projection.weight"),
    "lightning.ckpt": ("model.embedding.weight", "model.projection.weight"),
    "tiny_hf": ("model.embed_tokens.weight", "lm_head.weight"),  # a Hugging Face folder, made by the test
}


def _hf_folder(path: Path) -> None:
    """A tiny Hugging Face model folder: config, tokenizer files, model.safetensors."""
    import json

    path.mkdir()
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(32, 8, generator=g), "lm_head.weight": torch.randn(32, 8)}
    sd["model.layers.0.mlp.weight"] = torch.randn(8, 8, generator=g)
    wsurgery.save_state_dict(sd, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    (path / "tokenizer.json").write_text("{}")


def _registered() -> list[str]:
    from wsurgery.cli.app import app

    return [c.name for c in app.registered_commands]


def test_every_command_is_covered_by_the_input_safety_test():
    assert set(_registered()) <= set(INVOCATIONS), set(_registered()) - set(INVOCATIONS)


@pytest.mark.parametrize("command", [c for c in INVOCATIONS if c in _registered()])
def test_no_command_modifies_an_input(tmp_path, cli, command):
    src = tmp_path / "in"
    shutil.copytree(FIXTURES, src, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    _hf_folder(src / "tiny_hf")
    other = src / "tiny_lm.safetensors"
    before = {p: sha256(p) for p in src.iterdir()}
    listing = sorted(os.listdir(src))
    codes = []
    for name, (a, b) in CHECKPOINTS.items():
        for i, template in enumerate(INVOCATIONS[command]):
            out = tmp_path / "out" / f"{name}.{i}.safetensors"
            out.parent.mkdir(exist_ok=True)
            second = other if name != "tiny_lm.safetensors" else src / "tiny_lm.pt"
            args = [t.format(ckpt=src / name, out=out, a=a, b=b, other=second) for t in template]
            code, _, stderr = cli(*args)
            codes.append(code)
            assert code in (0, 1, 3, 4), (args, code, stderr)
    assert {p: sha256(p) for p in src.iterdir()} == before
    assert sorted(os.listdir(src)) == listing, "a command wrote beside its input"
    assert 0 in codes or 1 in codes, codes  # the table exercises real work, not only refusals


def test_in_place_is_the_one_way_to_replace_an_input(tmp_path, cli):
    src = tmp_path / "m.safetensors"
    wsurgery.save_state_dict({"a": torch.ones(2, 2), "b": torch.zeros(2, 2)}, src)
    before = sha256(src)
    code, _, stderr = cli("tie", src, "--src", "a", "--dst", "b", "-o", src)
    assert code == 5 and "is an input" in stderr and sha256(src) == before
    code, _, stderr = cli("tie", src, "--src", "a", "--dst", "b", "--in-place")
    assert code == 0, stderr
    assert wsurgery.load(src).aliases["b"].source == "a" and leftovers(tmp_path) == []


# --- sync=False / --no-sync: no fsync, still atomic ----------------------------------------------


@pytest.fixture
def fsyncs(monkeypatch) -> list[int]:
    """Every ``os.fsync`` the writers make (in this process), still done for real."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(writer.os, "fsync", counting)
    return calls


def _contents(path: Path) -> bytes | dict[str, bytes]:
    """A file's bytes, or every file of a folder by name."""
    if path.is_dir():
        return {f.name: f.read_bytes() for f in sorted(path.iterdir())}
    return path.read_bytes()


def test_atomic_file_fsyncs_file_and_folder_unless_sync_is_false(tmp_path, fsyncs):
    with atomic_file(tmp_path / "synced") as f:
        f.write(b"data")
    assert len(fsyncs) == 2  # the file before the rename, its folder after it
    fsyncs.clear()
    (tmp_path / "unsynced").write_bytes(b"old")
    with atomic_file(tmp_path / "unsynced", sync=False) as f:
        f.write(b"data")
    assert fsyncs == []
    assert (tmp_path / "unsynced").read_bytes() == b"data" and leftovers(tmp_path) == []


def _library_saves():
    from wsurgery.modules import save_module

    weight = torch.arange(6.0).reshape(2, 3)
    state = {"a": weight, "b": weight, "c": weight.t()}  # shared storage: b and c become aliases
    module = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(module.weight, 0.5)
    ckpt = wsurgery.load(FIXTURES / "tiny_lm.safetensors")
    return {
        "save_state_dict": lambda path, **kw: wsurgery.save_state_dict(state, path, **kw),
        "save_module": lambda path, **kw: save_module(module, path, **kw),
        "Checkpoint.save": lambda path, **kw: ckpt.save(path, overwrite=True, **kw),
        "Checkpoint.save sharded": lambda path, **kw: ckpt.save(path, overwrite=True, max_shard_size=2000, **kw),
        "Checkpoint.save torch": lambda path, **kw: ckpt.save(path, overwrite=True, format="torch", **kw),
        "Checkpoint.save folder": lambda path, **kw: ckpt.save(f"{path}/", overwrite=True, **kw),
    }


@pytest.mark.parametrize("name", list(_library_saves()))
def test_library_saves_skip_fsync_with_sync_false_and_write_the_same_bytes(tmp_path, fsyncs, name):
    save = _library_saves()[name]
    save(tmp_path / "synced")
    assert fsyncs, f"{name} did not fsync by default"
    fsyncs.clear()
    save(tmp_path / "unsynced", sync=False)
    assert fsyncs == [], f"{name}(sync=False) called os.fsync"
    assert _contents(tmp_path / "unsynced") == _contents(tmp_path / "synced")
    assert leftovers(tmp_path) == []


# Every command that writes: (arguments, input fixture).
NO_SYNC_CASES = {
    "tie": ["tie", "{fx}/tiny_lm.safetensors", "--src", "embedding.weight", "--dst", "projection.weight"],
    "copy": ["copy", "{fx}/tiny_lm.safetensors", "--src", "layers.0", "--dst", "layers.1", "-t", "scale(2)"],
    "untie": ["untie", "{fx}/shared_storage.pt"],
    "convert": ["convert", "{fx}/shared_storage.pt"],
    "rename": ["rename", "{fx}/shared_storage.pt", "weight$", "w"],
    "drop": ["drop", "{fx}/tiny_lm.safetensors", "final_norm.weight"],
    "keep": ["keep", "{fx}/tiny_lm.safetensors", "layers.*"],
    "cast": ["cast", "{fx}/tiny_lm.safetensors", "bfloat16"],
    "concat": [
        "concat",
        "{fx}/tiny_lm.safetensors",
        "--src",
        "embedding.weight",
        "--src",
        "projection.weight",
        "--dst",
        "ep",
    ],
    "split": [
        "split",
        "{fx}/tiny_lm.safetensors",
        "--src",
        "embedding.weight",
        "--dst",
        "e0",
        "--dst",
        "e1",
        "--sizes",
        "16,16",
    ],
    "stack": ["stack", "{fx}/tiny_lm.safetensors", "--src", "layers.{{i}}", "--dst", "layers"],
    "unstack": ["unstack", "{fx}/tiny_lm.safetensors", "--src", "embedding.weight", "--dst", "rows.{{i}}"],
    "apply": ["apply", "{fx}/../tests/recipes/cast_untie.yaml", "{fx}/tiny_lm.safetensors"],
    "merge": ["merge", "{fx}/tiny_lm.safetensors", "{fx}/tiny_lm.pt", "--weights", "1,2"],
    "merge-lora": ["merge-lora", "{fx}/tiny_lm.safetensors", "{fx}/tiny_lm_lora"],
}


def test_every_writing_command_is_covered_by_the_no_sync_test():
    from wsurgery.cli.app import app

    writers = {c.name for c in app.registered_commands if c.name not in ("inspect", "diff", "check")}
    assert writers == set(NO_SYNC_CASES)


@pytest.mark.parametrize("layout", ["file", "sharded", "torch", "folder"])
@pytest.mark.parametrize("command", list(NO_SYNC_CASES))
def test_no_sync_skips_every_fsync_and_writes_the_same_bytes(tmp_path, cli, fsyncs, command, layout):
    args = [a.format(fx=FIXTURES) for a in NO_SYNC_CASES[command]]
    sharded = layout == "sharded"
    extra = ["--max-shard-size", "1KB"] if sharded else []
    suffix = {"file": ".safetensors", "sharded": "", "torch": ".pt", "folder": ""}[layout]
    synced, unsynced = tmp_path / f"synced{suffix}", tmp_path / f"unsynced{suffix}"
    slash = "/" if layout == "folder" else ""  # an output path ending in / is a folder

    code, _, stderr = cli(*args, *extra, "-o", f"{synced}{slash}")
    assert code == 0, stderr
    if sharded:
        shards = [n for n in os.listdir(synced) if n.startswith("model-")]
        assert len(shards) > 1
        # each shard and the index: the file and the temporary folder; then the parent folder
        assert len(fsyncs) == 2 * (len(shards) + 1) + 1
    elif layout == "folder":
        assert os.listdir(synced) == ["model.safetensors"] and len(fsyncs) == 3
    else:
        assert len(fsyncs) == 2
    fsyncs.clear()

    code, _, stderr = cli(*args, *extra, "-o", f"{unsynced}{slash}", "--no-sync")
    assert code == 0, stderr
    assert fsyncs == []
    assert _contents(unsynced) == _contents(synced)
    assert leftovers(tmp_path) == []

    if command != "convert":  # convert has no --dry-run
        code, _, stderr = cli(*args, *extra, "-o", tmp_path / "dry", "--no-sync", "--dry-run")
        assert code == 0 and not (tmp_path / "dry").exists() and fsyncs == [], stderr


def _boom(f):
    f.write(b"ab")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failing_unsynced_write_leaves_nothing(tmp_path, fsyncs):
    # the destination folder is missing
    with pytest.raises(OutputError, match="cannot write"):
        with atomic_file(tmp_path / "no-such-folder" / "out.safetensors", sync=False) as f:
            f.write(b"x")
    assert os.listdir(tmp_path) == []

    # a tensor's write fails: the old destination stays whole, no temporary is left
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"old contents")
    items = [WriteItem("a", "uint8", (3,), 3, lambda f: f.write(b"abc")), WriteItem("b", "uint8", (4,), 4, _boom)]
    with pytest.raises(OutputError, match="No space left on device") as info:
        write_safetensors(dest, items, None, sync=False)
    assert info.value.reason == "no_space"
    assert dest.read_bytes() == b"old contents" and leftovers(tmp_path) == []

    # a bug in a tensor's write (not an OSError) is cleaned up the same way
    def bug(f):
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        write_safetensors(dest, [WriteItem("a", "uint8", (1,), 1, bug)], None, sync=False)
    assert dest.read_bytes() == b"old contents" and leftovers(tmp_path) == []

    # sharded: the second shard fails, nothing appears at the destination
    import wsurgery
    from wsurgery.model import Stored

    class Full(Stored):
        name, dtype, shape = "b", "uint8", (4,)

        def write(self, f):
            f.write_bytes(b"ab")
            raise OSError(errno.ENOSPC, "No space left on device")

    first = wsurgery.Checkpoint.from_state_dict({"a": torch.arange(3, dtype=torch.uint8)})
    ckpt = first.evolve(stored={**first.stored, "b": Full()})
    with pytest.raises(OutputError, match="No space left on device"):
        ckpt.save(tmp_path / "shards", max_shard_size=4, sync=False)
    assert not (tmp_path / "shards").exists() and leftovers(tmp_path) == []
    assert fsyncs == []


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "sharded"])
def test_no_sync_disk_full_exits_5_and_leaves_nothing(tmp_path, monkeypatch, cli, fsyncs, sharded):
    src = big_safetensors(tmp_path / "in.safetensors", 1, tensors=4)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "copy_file_range", full, raising=False)
    dest = tmp_path / ("shards" if sharded else "out.safetensors")
    extra = ["--max-shard-size", "300KiB"] if sharded else []
    code, _, stderr = cli("convert", src, "-o", dest, "--no-sync", *extra)
    assert code == 5 and stderr.count("\n") == 1 and "No space left on device" in stderr
    assert not dest.exists() and leftovers(tmp_path) == [] and fsyncs == []


def test_no_sync_file_size_limit_exits_5_and_leaves_nothing(tmp_path):
    src = big_safetensors(tmp_path / "in.safetensors", 4, tensors=4)
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"old contents")
    r = run_limited(["convert", src, "-o", dest, "--force", "--no-sync"], 1 << 20, tmp_path)
    assert r.returncode == 5 and r.stderr.count("\n") == 1, r.stderr
    assert "File too large" in r.stderr and "Traceback" not in r.stderr
    assert dest.read_bytes() == b"old contents" and leftovers(tmp_path) == []
