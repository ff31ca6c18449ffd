"""Scale-out on torch.distributed: two ranks on this machine, over loopback only.

Each rank is a process with the environment ``torchrun`` gives its workers (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``), and gloo bound to the
loopback interface. To keep the suite small, most commands run in one launch: two
processes (``tests/ranks_driver.py``) run the commands one after the other, each
command joining and leaving its process group as it would under ``torchrun``. Every
launch is bounded in time (collectives by ``WSURGERY_DIST_TIMEOUT``, processes by a
timeout); one test runs ``torchrun --standalone`` itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import wsurgery
from wsurgery import distributed
from wsurgery.errors import InputError, OutputError, UnknownNameError

from ..conftest import FIXTURES, ROOT, sha256

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="loopback interface 'lo'"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

LAUNCH_TIMEOUT = 240  # seconds for a whole launch, on a loaded 2-core machine
COLLECTIVE_TIMEOUT = 90  # WSURGERY_DIST_TIMEOUT in the launches


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, timeout: float = COLLECTIVE_TIMEOUT) -> dict:
    env = dict(os.environ)
    env.pop("WSURGERY_DEBUG", None)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME="lo",
        WSURGERY_DIST_TIMEOUT=str(timeout),
        OMP_NUM_THREADS="1",
        NO_COLOR="1",
        COLUMNS="200",
        PYTHONPATH=str(ROOT),
    )
    return env


def launch(
    argv: list[str], world: int = 2, timeout: float = COLLECTIVE_TIMEOUT, cwd=None, cwds: list | None = None
) -> list[dict]:
    """Run ``argv`` as ``world`` ranks (``cwds``: one working folder per rank, else ``cwd``
    for all); ``[{code, stdout, stderr}]`` per rank."""
    port = free_port()
    procs = [
        subprocess.Popen(
            argv,
            env=rank_env(r, world, port, timeout),
            cwd=cwd if cwds is None else cwds[r],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=LAUNCH_TIMEOUT)
            out.append({"code": p.returncode, "stdout": stdout, "stderr": stderr})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def wsurgery_argv(*args) -> list[str]:
    return [sys.executable, "-m", "wsurgery", *map(str, args)]


# ----------------------------------------------------------------------------- without processes


def test_split_by_bytes_balances_and_is_the_same_everywhere():
    sizes = [10, 1, 7, 3, 3, 0]
    owner = distributed.split_by_bytes(sizes, 2)
    assert owner == distributed.split_by_bytes(list(sizes), 2)
    load = [sum(s for s, o in zip(sizes, owner, strict=True) if o == r) for r in (0, 1)]
    assert abs(load[0] - load[1]) <= max(sizes)
    assert set(distributed.split_by_bytes(sizes, 1)) == {0}
    assert distributed.split_by_bytes([], 3) == []
    assert sorted(set(distributed.split_by_bytes([5] * 6, 3))) == [0, 1, 2]


@pytest.mark.parametrize(
    "exc",
    [
        InputError("x.pt: corrupt", hint="re-save it", path="x.pt"),
        OutputError("cannot write out: disk full", reason="no_space"),
        UnknownNameError("w", path="m.safetensors", candidates=["v"]),
        ValueError("plain"),
    ],
)
def test_an_error_crosses_ranks_as_itself(exc):
    import pickle

    data = pickle.loads(pickle.dumps(distributed._portable(exc, 1)))
    back = distributed.rebuild(data)
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert getattr(back, "hint", None) == getattr(exc, "hint", None)
    assert getattr(back, "reason", None) == getattr(exc, "reason", None)
    assert distributed.agreed_rank(back) == 1


def test_a_foreign_error_crosses_as_a_runtime_error():
    class Odd(Exception):
        pass

    back = distributed.rebuild(distributed._portable(Odd("boom"), 0))
    assert isinstance(back, RuntimeError) and "Odd: boom" in str(back)


def test_no_session_no_split():
    assert distributed.current() is None
    assert distributed.map_by_bytes([1, 2, 3], lambda x: x, lambda x: x * 2) == [2, 4, 6]
    with distributed.session() as s:  # one process: nothing to split, torch not needed
        assert s.world_size == 1 and distributed.current() is None


# ----------------------------------------------------------------------------- one launch, many commands


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Inputs for the launch: fixtures, a copy of tiny_lm with one tensor changed, and a
    DCP folder one of whose chunks (a tensor rank 1 reads) is corrupt."""
    from wsurgery.io.dcp_reader import open_layout
    from wsurgery.io.folders import DirFolder

    w = tmp_path_factory.mktemp("scale")
    for name in ("tiny_lm.safetensors", "tiny_lm.pt", "shared_storage.pt", "tiny_lm_dcp"):
        (shutil.copytree if (FIXTURES / name).is_dir() else shutil.copy)(FIXTURES / name, w / name)
    with wsurgery.open(w / "tiny_lm.safetensors") as c:
        c.copy("embedding.weight", "projection.weight", "scale(0.5)").save(w / "changed.safetensors")
    shutil.copytree(w / "tiny_lm_dcp", w / "bad_dcp")
    with wsurgery.open(w / "bad_dcp") as c:
        names = c.names()
        owner = distributed.split_by_bytes([2 * c.stored[n].nbytes for n in names], 2)
    victim = next(n for n, o in zip(names, owner, strict=True) if o == 1 and "layers.1" in n)
    _, chunk = open_layout(DirFolder(w / "bad_dcp"), "dcp").tensors[victim].chunks[0]
    with open(chunk.rng.path, "r+b") as f:
        f.seek(chunk.rng.offset + 10)
        f.write(b"\xff" * 20)
    (w / "victim").write_text(victim)
    recipe = (ROOT / "examples" / "recipes" / "grow_layers.yaml").read_text()
    (w / "grow.yaml").write_text(recipe.replace("../../fixtures/", str(FIXTURES) + "/"))
    return w


COMMANDS = {
    "diff-equal": ["diff", "tiny_lm_dcp", "tiny_lm.safetensors", "--json"],
    "diff-different": ["diff", "tiny_lm.safetensors", "changed.safetensors", "--json"],
    "diff-human": ["diff", "tiny_lm.pt", "changed.safetensors"],
    "check": ["check", "tiny_lm_dcp", "--src", "layers", "--dst", "layers", "--from", "changed.safetensors", "--json"],
    "check-transform": ["check", "tiny_lm.pt", "--src", "embedding.weight", "--dst", "projection.weight", "--json"],
    "convert-shards": ["convert", "tiny_lm_dcp", "-o", "{out}/shards", "--max-shard-size", "2KB", "--json"],
    "convert-dcp": ["convert", "shared_storage.pt", "-o", "{out}/dcp", "--format", "dcp", "--json"],
    "convert-file": ["convert", "tiny_lm_dcp", "-o", "{out}/one.safetensors", "--json"],
    "apply": ["apply", "grow.yaml", "tiny_lm_dcp", "-o", "{out}/grown", "--max-shard-size", "4KB", "--json"],
    "tie-dcp": [
        "tie",
        "tiny_lm.pt",
        "--src",
        "embedding.weight",
        "--dst",
        "projection.weight",
        "-o",
        "{out}/tied",
        "--format",
        "dcp",
    ],  # fmt: skip
    "bad-diff": ["diff", "bad_dcp", "tiny_lm.safetensors", "--json"],
    "bad-convert-dcp": ["convert", "bad_dcp", "-o", "{out}/bad_dcp_out", "--format", "dcp"],
    "bad-convert-shards": ["convert", "bad_dcp", "-o", "{out}/bad_shards", "--max-shard-size", "2KB"],
    "bad-convert-file": ["convert", "bad_dcp", "-o", "{out}/bad.safetensors"],
    "unknown-name": ["check", "tiny_lm.pt", "--src", "nope", "--dst", "embedding.weight"],
}


def _argv(key: str, out: Path) -> list[str]:
    return [a.replace("{out}", str(out)) for a in COMMANDS[key]]


@pytest.fixture(scope="module")
def ranked(work) -> dict:
    """Every command of COMMANDS under two ranks (outputs under ``work/two``), and the same
    under one process (outputs under ``work/one``): ``{key: (rank results, single result)}``."""
    from typer.testing import CliRunner

    from wsurgery.cli.app import app

    (work / "two").mkdir()
    (work / "one").mkdir()
    commands = work / "commands.json"
    commands.write_text(json.dumps([_argv(k, work / "two") for k in COMMANDS]))
    driver = [sys.executable, str(ROOT / "tests" / "ranks_driver.py"), str(commands), str(work / "results")]
    procs = launch(driver, cwd=work)
    for r, p in enumerate(procs):
        assert p["code"] == 0, f"rank {r}: {p['stderr'][-3000:]}"
    per_rank = [json.loads((work / f"results.{r}.json").read_text()) for r in range(2)]
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        single = {}
        for k in COMMANDS:
            res = runner.invoke(app, _argv(k, work / "one"), env={"NO_COLOR": "1", "COLUMNS": "200"})
            single[k] = {"code": res.exit_code, "stdout": res.stdout, "stderr": res.stderr}
    finally:
        os.chdir(cwd)
    return {k: ([per_rank[0][i], per_rank[1][i]], single[k]) for i, k in enumerate(COMMANDS)}


def _same_report(ranked, key: str, work: Path) -> dict:
    (r0, r1), one = ranked[key]
    assert r0["code"] == r1["code"] == one["code"], (r0["stderr"], r1["stderr"], one["stderr"])
    assert r1["stdout"] == "" and r1["stderr"] == ""
    assert r0["stdout"].replace(str(work / "two"), "OUT") == one["stdout"].replace(str(work / "one"), "OUT")
    return json.loads(r0["stdout"]) if "--json" in COMMANDS[key] else {}


@pytest.mark.parametrize("key", ["diff-equal", "diff-different", "diff-human", "check", "check-transform"])
def test_two_ranks_print_what_one_process_prints(ranked, work, key):
    report = _same_report(ranked, key, work)
    if key == "diff-equal":
        assert report["equal"] and report["same"] == 15
    if key == "diff-different":
        assert [c["name"] for c in report["changed"]] == ["projection.weight"]
        assert ranked[key][0][0]["code"] == 1


def test_sharded_output_of_two_ranks_is_the_bytes_of_one(ranked, work):
    report = _same_report(ranked, "convert-shards", work)
    assert len(report["shards"]) > 2
    assert sha256(work / "two" / "shards") == sha256(work / "one" / "shards")


def test_single_file_output_under_two_ranks_is_written_by_rank_0(ranked, work):
    _same_report(ranked, "convert-file", work)
    assert (work / "two" / "one.safetensors").read_bytes() == (work / "one" / "one.safetensors").read_bytes()


def test_dcp_output_of_two_ranks_loads_and_diffs_equal(ranked, work):
    import torch
    import torch.distributed.checkpoint as dcp

    report = _same_report(ranked, "convert-dcp", work)
    assert report["aliases_as_values"] == ["decoder.weight", "projection.weight"]
    two, one = work / "two" / "dcp", work / "one" / "dcp"
    assert sorted(p.name for p in two.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in one.iterdir()) == [".metadata", "__0_0.distcp"]
    assert wsurgery.diff(two, one).equal
    ref = wsurgery.load_state_dict(work / "shared_storage.pt")
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in ref.items()}
    dcp.load(sd, checkpoint_id=str(two), no_dist=True)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert wsurgery.diff(work / "two" / "tied", work / "one" / "tied").equal
    assert not list(work.glob("two/.*wsurgery-tmp*"))


def test_apply_under_two_ranks(ranked, work):
    report = _same_report(ranked, "apply", work)
    assert report["steps"] == 2
    assert sha256(work / "two" / "grown") == sha256(work / "one" / "grown")


@pytest.mark.parametrize("key", ["bad-diff", "bad-convert-dcp", "bad-convert-shards", "bad-convert-file"])
def test_an_error_on_one_rank_fails_both_with_one_line_and_leaves_nothing(ranked, work, key):
    """The corrupt tensor is rank 1's to compare or write (rank 0 writes a single file
    alone): both fail with its error, printed once, and no output or temporary is left."""
    (r0, r1), one = ranked[key]
    victim = (work / "victim").read_text()
    assert r0["code"] == r1["code"] == one["code"] == 3
    lines = r0["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and victim in lines[0]
    assert r1["stderr"] == "" and r1["stdout"] == ""
    if key == "bad-diff":  # rank 0 compared none of the victim's bytes, yet names it
        assert json.loads(r0["stdout"])["error"]["exit_code"] == 3
    assert sorted(p.name for p in (work / "two").iterdir() if "bad" in p.name) == []


def test_an_error_every_rank_meets_is_printed_once(ranked, work):
    (r0, r1), one = ranked["unknown-name"]
    assert r0["code"] == r1["code"] == one["code"] == 3
    assert len(r0["stderr"].splitlines()) == 1 and r1["stderr"] == ""


# ----------------------------------------------------------------------------- other launches


def test_the_console_script_under_two_ranks(work):
    """The real entry point (its exit path included) prints the one-process JSON on rank 0."""
    procs = launch(wsurgery_argv("diff", "tiny_lm.safetensors", "changed.safetensors", "--json"), cwd=work)
    one = subprocess.run(
        wsurgery_argv("diff", "tiny_lm.safetensors", "changed.safetensors", "--json"),
        cwd=work, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    assert [p["code"] for p in procs] == [1, 1] and one.returncode == 1
    assert procs[0]["stdout"] == one.stdout and procs[1]["stdout"] == ""
    assert procs[0]["stderr"] == procs[1]["stderr"] == ""


def test_under_torchrun_standalone(work):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    env = dict(os.environ, NO_COLOR="1", GLOO_SOCKET_IFNAME="lo", WSURGERY_DIST_TIMEOUT=str(COLLECTIVE_TIMEOUT))
    env.pop("WSURGERY_DEBUG", None)
    argv = ["diff", "tiny_lm_dcp", "tiny_lm.safetensors", "--json"]
    r = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "wsurgery", *argv],
        cwd=work, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    one = subprocess.run(wsurgery_argv(*argv), cwd=work, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == one.stdout and json.loads(r.stdout)["equal"]


def test_a_rank_that_never_comes_fails_the_others_in_bounded_time(work):
    port = free_port()
    t0 = time.monotonic()
    r = subprocess.run(
        wsurgery_argv("diff", "tiny_lm.pt", "tiny_lm.safetensors", "--json"),
        cwd=work, env=rank_env(0, 2, port, timeout=3), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 6, r.stderr
    assert r.stderr.startswith("error: rank 0 of 2: the process group did not form") and r.stderr.count("\n") == 1
    assert json.loads(r.stdout)["error"]["kind"] == "distributed"
    assert time.monotonic() - t0 < 60


HANG = """
import os, sys, time
from wsurgery import distributed
from wsurgery.errors import DistributedError
t0 = time.monotonic()
try:
    with distributed.session() as s:
        if s.rank == 1:
            time.sleep(120)  # stuck: rank 0 must not wait for it forever
        distributed.map_by_bytes([1, 2, 3], lambda x: x, lambda x: 2 * x)
    print("finished")
except DistributedError as exc:
    print("DistributedError", round(time.monotonic() - t0, 1), exc)
"""


def test_a_stuck_rank_fails_the_others_after_the_timeout(work):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HANG],
            env=rank_env(r, 2, port, timeout=3),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    try:
        out, err = procs[0].communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert out.startswith("DistributedError"), err[-2000:]
    assert "did not answer at compute" in out
    assert float(out.split()[1]) < 60
