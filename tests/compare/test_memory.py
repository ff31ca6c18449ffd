"""Peak memory of a whole diff process stays far below the size of the checkpoints.

The tensors are streamed from the files' memory maps in chunks and the pages compared are
unmapped behind them, so the resident set does not grow with the checkpoint (nor with its
largest tensor). Not a timing: only the peak resident set is asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

from ..conftest import ROOT

MiB = 1 << 20
BOUND = 200 * MiB


def _write_pair(tmp_path):
    """Two 256 MiB checkpoints: one 128 MiB tensor (larger than any chunk) and eight of
    16 MiB; B differs from A in the big tensor (sparsely) and in one small one."""
    rng = np.random.default_rng(0)
    a = {"big": rng.random((128 * MiB) // 4, dtype=np.float32)}
    for i in range(8):
        a[f"layer.{i}"] = rng.random((16 * MiB) // 4, dtype=np.float32)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    a["big"][:: 1 << 20] += 1
    a["layer.3"][-1] = -1
    save_file(a, str(pb))
    del a
    return pa, pb


# A child's ru_maxrss starts at its parent's peak (Linux keeps the peak of the memory map
# that exec replaces, and a vfork child execs from the parent's): measure through a small,
# freshly started launcher, never straight from this (large) test process.
_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
"""


def _peak_rss(args) -> tuple[int, int]:
    """(exit code, peak resident set in bytes) of `python -m wsurgery ARGS`."""
    env = dict(os.environ, NO_COLOR="1")
    env.pop("WSURGERY_DEBUG", None)
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "wsurgery", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    return int(out[0]), int(out[1])  # ru_maxrss is in KiB on Linux


def test_diff_of_two_256_mib_checkpoints_stays_under_200_mib(tmp_path):
    a, b = _write_pair(tmp_path)
    assert a.stat().st_size > 256 * MiB
    code, peak = _peak_rss(["diff", a, b, "--quiet"])
    assert code == 1
    assert peak < BOUND, f"peak RSS {peak / MiB:.0f} MiB"
    code, peak = _peak_rss(["diff", a, a, "--quiet"])
    assert code == 0
    assert peak < BOUND, f"peak RSS {peak / MiB:.0f} MiB"


def test_writing_a_256_mib_torch_file_streams(tmp_path):
    """A .pt output is written one storage at a time, never as a whole state dict in memory
    (``torch.save`` of the loaded dict peaks at the checkpoint's size plus torch)."""
    a, _ = _write_pair(tmp_path)
    code, peak = _peak_rss(["convert", a, "-o", tmp_path / "a.pt", "--no-sync"])
    assert code == 0 and (tmp_path / "a.pt").stat().st_size > 256 * MiB
    assert peak < 100 * MiB, f"peak RSS {peak / MiB:.0f} MiB"
