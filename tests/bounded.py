"""Run a hostile input in a child process with bounded memory and time.

A bomb or a hang that comes back must fail its test, never swap the machine or stall
the suite: :func:`bounded` runs a wsurgery CLI command (``cli=[...]``) or a snippet of
library code (``code="..."``) in a fresh interpreter whose address space is capped with
``RLIMIT_AS`` (:data:`LIMIT_BYTES`) and whose wall-clock time is capped by a timeout.

The limit: a plain ``inspect`` or ``convert`` of a small checkpoint peaks at about
630 MiB of address space (most of it torch's import: its libraries and thread arenas),
about 290 MiB resident. 1.5 GiB leaves some 900 MiB for the work itself, far more than any
refusal needs and far less than any of the bombs below would take. The child runs with
one OpenMP thread and two malloc arenas, so the figure does not grow with the number of
cores of the machine running the suite.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

LIMIT_BYTES = 3 << 29  # 1.5 GiB of address space
TIMEOUT_S = 60

# The child writes its peak resident size to the file named by the environment, at exit.
# The peak is the process image's own (VmHWM): ru_maxrss of a child forked from a large
# test process starts at the parent's size and survives exec.
_BOOT = r"""
import atexit, json, os, resource, runpy, sys, time
_t0 = time.monotonic()
def _peak_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def _report():
    with open(os.environ["WSURGERY_TEST_REPORT"], "w") as f:
        json.dump({"peak_rss_mib": _peak_mib(), "wall_s": time.monotonic() - _t0}, f)
atexit.register(_report)
_real_exit = os._exit
def _exit(code):  # the CLI ends with os._exit, which skips atexit
    _report()
    _real_exit(code)
os._exit = _exit
mode, payload = sys.argv[1], sys.argv[2:]
if mode == "cli":
    sys.argv = ["wsurgery", *payload]
    runpy.run_module("wsurgery", run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c"]
    exec(compile(payload[0], "<bounded>", "exec"), {"__name__": "__main__"})
"""


@dataclass
class Bounded:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mib: float | None  # None when the child died before reporting (killed, crashed)
    wall_s: float | None

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def _limit(limit_bytes: int):
    def preexec():
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = limit_bytes if hard == resource.RLIM_INFINITY else min(limit_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    return preexec


def _child(args: list[str], *, env: dict | None, limit_bytes: int, timeout: float, cwd=None, stdin: str | None = None):
    """``python ARGS`` under the limits, with one OpenMP thread and two malloc arenas."""
    full_env = dict(os.environ)
    full_env.pop("WSURGERY_DEBUG", None)
    full_env.update({"NO_COLOR": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", **(env or {})})
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout, preexec_fn=_limit(limit_bytes))  # fmt: skip


def bounded(
    *, cli: list | None = None, code: str | None = None, limit_bytes: int = LIMIT_BYTES, timeout: float = TIMEOUT_S,
    cwd=None, env: dict | None = None,
) -> Bounded:  # fmt: skip
    """Run ``python -m wsurgery *cli`` or ``python -c code`` under the memory and time limits.

    A timeout fails the calling test (``subprocess.TimeoutExpired`` propagates after the
    child is killed); running out of the address space makes the child fail, which the
    caller's assertions on the exit code and message catch.
    """
    if (cli is None) == (code is None):
        raise ValueError("give cli or code")
    with tempfile.TemporaryDirectory(prefix="wsurgery-bounded-") as tmp:
        report = Path(tmp) / "report.json"
        args = ["cli", *map(str, cli)] if cli is not None else ["code", code]
        env = {**(env or {}), "WSURGERY_TEST_REPORT": str(report)}
        r = _child(["-c", _BOOT, *args], env=env, limit_bytes=limit_bytes, timeout=timeout, cwd=cwd)
        facts = json.loads(report.read_text()) if report.exists() else {}
    return Bounded(r.returncode, r.stdout, r.stderr, facts.get("peak_rss_mib"), facts.get("wall_s"))


# --- many cases, one child -----------------------------------------------------------------------------

# Runs each case in turn and prints one JSON line for it; torch is imported once for all.
_CASES = r"""
import json, resource, signal, sys, time
import torch  # first: its import is no case's time or memory
import wsurgery
from wsurgery.io import pickles

class Hang(BaseException):  # not an Exception: wsurgery's "except Exception" must not swallow it
    pass

fired = []

def fire(signum, frame):
    fired.append(1)
    raise Hang()

signal.signal(signal.SIGALRM, fire)
per_case = int(sys.argv[1])
for line in sys.stdin:
    name, mode, path = json.loads(line)
    print(json.dumps({"start": name}), flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.monotonic()
    out = {"name": name, "outcome": "loaded", "message": "", "names": None, "skipped": None}
    signal.alarm(per_case)
    try:
        if mode == "load":
            c = wsurgery.load(path)
            out["names"], out["skipped"] = len(c.names()), len(c.skipped)
            c.close()
        else:
            pickles.scan(path, zip_format=mode == "scan-zip")
    except wsurgery.WsurgeryError as exc:
        out["outcome"], out["message"] = "refused", f"{exc} (hint: {exc.hint})" if exc.hint else str(exc)
    except Hang:
        out["outcome"], out["message"] = "hang", f"no result after {per_case} s"
    except BaseException as exc:
        out["outcome"], out["message"] = "error", f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        signal.alarm(0)
    if fired:  # wrapped into another error on its way up, it is still a hang
        out["outcome"], out["message"] = "hang", f"no result after {per_case} s"
        fired.clear()
    out["wall_s"] = time.monotonic() - t0
    out["rss_growth_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out), flush=True)
"""


@dataclass
class Case:
    name: str
    outcome: str  # loaded | refused | error | hang | not run
    message: str = ""
    wall_s: float | None = None
    rss_growth_mib: float | None = None  # how much this case raised the child's peak resident size
    peak_rss_mib: float | None = None
    names: int | None = None
    skipped: int | None = None


def run_cases(cases: list[tuple[str, str, str]], *, per_case_s: int = 30, timeout: float = 180,
              limit_bytes: int = LIMIT_BYTES, env: dict | None = None, cwd=None) -> dict[str, Case]:  # fmt: skip
    """Run ``(name, mode, path)`` cases in one bounded child: mode ``load`` is ``wsurgery.load``,
    ``scan-zip`` / ``scan-legacy`` the pickle scan alone. Each case has a watchdog of
    ``per_case_s`` (Python-level hangs); the whole run ``timeout`` (hangs in C code, which
    no signal interrupts: the case running then is a ``hang``, the ones after it ``not run``).
    A case that exhausts the address space ends as an ``error`` (MemoryError)."""
    stdin = "".join(json.dumps(list(c)) + "\n" for c in cases)
    try:
        r = _child(["-c", _CASES, str(per_case_s)], env=env, limit_bytes=limit_bytes, timeout=timeout, cwd=cwd,
                   stdin=stdin)  # fmt: skip
        stdout, died = r.stdout, r.returncode != 0
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        stdout, died = (out.decode() if isinstance(out, bytes) else out), True
    results: dict[str, Case] = {}
    running = None
    for line in stdout.splitlines():
        item = json.loads(line)
        if "start" in item:
            running = item["start"]
        else:
            results[item["name"]] = Case(**item)
            running = None
    if running is not None:
        results[running] = Case(running, "hang" if died else "error", "the child died or timed out running it")
    for name, _, _ in cases:
        results.setdefault(name, Case(name, "not run"))
    return results
