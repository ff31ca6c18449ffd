"""Shared test helpers: seeded factories, CLI runners, file hashing."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def fixtures(tmp_path) -> Path:
    """A private copy of the committed fixtures, so tests may write beside them."""
    dst = tmp_path / "fixtures"
    shutil.copytree(FIXTURES, dst, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return dst


def run_module(*args, env=None, cwd=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run `python -m wsurgery ARGS` in a subprocess, as a user would. Output is captured,
    unless ``stdout=`` says where standard output goes (then only stderr is captured)."""
    full_env = dict(os.environ)
    full_env.pop("WSURGERY_DEBUG", None)
    full_env["NO_COLOR"] = "1"
    full_env["COLUMNS"] = "200"
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "wsurgery", *map(str, args)],
        **({"stderr": subprocess.PIPE} if "stdout" in kw else {"capture_output": True}),
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        **kw,
    )


@pytest.fixture
def cli():
    """Invoke the typer app in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from wsurgery.cli.app import app

    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, [str(a) for a in args], env={"NO_COLOR": "1", "COLUMNS": "200"})
        return result.exit_code, result.stdout, result.stderr

    return invoke
