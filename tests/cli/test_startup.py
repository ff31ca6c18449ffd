"""Start-up: a command imports only its own module and what it uses; ``--version`` and the
top-level help import no command and not typer; none of them imports torch or rich. A
well-formed command line runs without typer, click or rich (the fast path); help and
usage errors are still typer's."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import wsurgery
from wsurgery.cli.app import COMMANDS

# Runs the console script's main() in a fresh interpreter, then prints what it imported.
_PROBE = """
import json, sys
from wsurgery.cli.app import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
sys.__stderr__.write("\\nMODULES " + json.dumps(sorted(sys.modules)) + "\\n")
"""


def _imported(*args) -> tuple[set[str], str]:
    r = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], capture_output=True, text=True, timeout=120)
    line = next(line for line in r.stderr.splitlines() if line.startswith("MODULES "))
    return set(json.loads(line[len("MODULES ") :])), r.stdout


def _command_modules(modules: set[str]) -> set[str]:
    ours = {f"wsurgery.cli.{module}" for module, _, _ in COMMANDS.values()}
    return modules & ours


@pytest.mark.parametrize("args", [["--version"], ["-V"], ["--help"], []])
def test_version_and_help_import_no_command_and_not_typer(args):
    modules, out = _imported(*args)
    assert out.strip()  # they did print
    assert not _command_modules(modules), _command_modules(modules)
    heavy = {"torch", "typer", "rich", "numpy", "wsurgery.model", "wsurgery.api"} & modules
    assert not heavy, heavy


def test_inspect_of_safetensors_imports_only_its_own_command_and_neither_torch_nor_rich(tmp_path):
    path = tmp_path / "m.safetensors"
    wsurgery.save_state_dict({"a.weight": torch.zeros(2, 3), "b": torch.ones(4)}, path)
    modules, out = _imported("inspect", path)
    assert "a.weight" in out and "(2, 3)" in out
    assert _command_modules(modules) == {"wsurgery.cli.inspect_cmd"}
    assert not {"torch", "rich"} & modules, {"torch", "rich"} & modules


def test_inspect_of_safetensors_imports_no_writer_facade_or_transforms(tmp_path):
    """Reading headers needs neither the writers (tempfile, shutil, the sinks), the public
    facade, nor the transform language when the file records no alias."""
    path = tmp_path / "m.safetensors"
    wsurgery.save_state_dict({"a.weight": torch.zeros(2, 3)}, path)
    modules, out = _imported("inspect", path)
    assert "a.weight" in out
    unused = {"wsurgery.io.writer", "wsurgery.io.sinks", "wsurgery.api", "wsurgery.transforms", "tempfile"}
    assert not unused & modules, unused & modules


def test_the_registry_says_what_each_command_docstring_says():
    """The top-level help lists commands from the registry without importing them: each
    summary there is its command's first docstring paragraph, so the two cannot drift."""
    from wsurgery.cli.app import command_function, top_level_help

    for name, (_, _, summary) in COMMANDS.items():
        doc = inspect.cleandoc(command_function(name).__doc__ or "")
        assert " ".join(doc.split("\n\n")[0].split()) == summary, name
    text = " ".join(top_level_help(width=100).split())
    for name, (_, _, summary) in COMMANDS.items():
        assert f"{name} {summary}" in text, name


def test_version_prints_the_package_version():
    _, out = _imported("--version")
    assert out == f"wsurgery {wsurgery.__version__}\n"


def test_a_tie_of_safetensors_loads_no_other_format_and_not_numpy(tmp_path):
    """The format table imports a distributed format's reader and writer only when one is
    read or written: a tie between safetensors files never loads them (nor numpy)."""
    path = tmp_path / "m.safetensors"
    wsurgery.save_state_dict({"a": torch.zeros(2, 3), "b": torch.ones(2, 3)}, path)
    modules, _ = _imported("tie", path, "--src", "a", "--dst", "b", "-o", tmp_path / "o.safetensors", "--quiet")
    assert (tmp_path / "o.safetensors").exists()
    loaded = {"wsurgery.io.dcp_reader", "wsurgery.io.dcp_writer", "wsurgery.io.dcp", "numpy", "torch"} & modules
    assert not loaded, loaded


# --- the fast path: a well-formed command line runs without typer -------------------------

_CLI_LIBRARIES = {"typer", "click", "rich", "shellingham", "torch"}


def _libraries(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules} & _CLI_LIBRARIES


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_version_and_help_import_no_cli_library(args):
    modules, _ = _imported(*args)
    assert not _libraries(modules), _libraries(modules)


@pytest.mark.parametrize("extra", [[], ["--json"], ["--tree", "--filter", "a.weight"]])
def test_inspect_runs_without_typer_click_or_rich(tmp_path, extra):
    path = tmp_path / "m.safetensors"
    wsurgery.save_state_dict({"a.weight": torch.zeros(2, 3), "b": torch.ones(4)}, path)
    modules, out = _imported("inspect", path, *extra)
    assert "a.weight" in out
    assert not _libraries(modules), _libraries(modules)
    assert _command_modules(modules) == {"wsurgery.cli.inspect_cmd"}


def test_diff_quiet_runs_without_typer_click_rich_or_torch(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    wsurgery.save_state_dict({"w": torch.arange(6.0).reshape(2, 3)}, a)
    wsurgery.save_state_dict({"w": torch.arange(6.0).reshape(2, 3)}, b)
    probe = _PROBE.replace("    pass\n", "    sys.__stderr__.write(f'EXIT {sys.exc_info()[1].code}\\n')\n")
    r = subprocess.run([sys.executable, "-c", probe, "diff", str(a), str(b), "--quiet"], capture_output=True, text=True)
    assert "EXIT 0" in r.stderr, r.stderr
    line = next(line for line in r.stderr.splitlines() if line.startswith("MODULES "))
    modules = set(json.loads(line[len("MODULES ") :]))
    assert not _libraries(modules), _libraries(modules)
    assert _command_modules(modules) == {"wsurgery.cli.diff"}


_TYPER = """
import sys, typer
from wsurgery.cli.app import build_app
code = typer.main.get_command(build_app()).main(sys.argv[1:], prog_name="wsurgery", standalone_mode=False)
"""


def test_help_of_a_command_is_typers():
    """``-h``/``--help`` anywhere: the fast path declines, and typer prints its own help."""
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}
    for args in (["inspect", "--help"], ["diff", "a", "-h"]):
        ours = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env)
        theirs = subprocess.run([sys.executable, "-c", _TYPER, *args], capture_output=True, text=True, env=env)
        assert ours.stdout == theirs.stdout and "Usage: wsurgery" in ours.stdout, args
        line = next(line for line in ours.stderr.splitlines() if line.startswith("MODULES "))
        assert "typer" in json.loads(line[len("MODULES ") :])


def test_a_usage_error_is_clicks(tmp_path):
    """An unknown option: the fast path declines; click's message, exit 2."""
    path = tmp_path / "m.safetensors"
    wsurgery.save_state_dict({"a": torch.zeros(2)}, path)
    r = subprocess.run(
        [sys.executable, "-m", "wsurgery", "inspect", str(path), "--bogus"], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr == "error: No such option: --bogus (hint: run `wsurgery inspect --help`)\n"
    assert r.stdout == ""
