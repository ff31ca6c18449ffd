"""The layout the design describes: the core never imports the CLI's libraries; every
command has help and is documented in the README."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "wsurgery"
CLI_ONLY = {"typer", "rich", "click"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _core_files():
    return [p for p in PKG.rglob("*.py") if "cli" not in p.relative_to(PKG).parts and p.name != "__main__.py"]


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_cli_libraries(path):
    assert not (_imports(path) & CLI_ONLY), f"{path} imports {_imports(path) & CLI_ONLY}"


def test_importing_the_library_imports_no_cli_and_no_torch():
    code = "import sys, wsurgery; bad = {'typer', 'rich', 'click', 'torch'} & set(sys.modules); assert not bad, bad"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _commands():
    from wsurgery.cli.app import app

    return [c.name for c in app.registered_commands]


def test_every_command_has_help_and_is_documented():
    from typer.testing import CliRunner

    from wsurgery.cli.app import app

    readme = (ROOT / "README.md").read_text()
    runner = CliRunner()
    names = _commands()
    assert {"inspect", "tie", "convert"} <= set(names)
    for name in names:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example:" in result.stdout, f"{name} --help has no example"
        assert f"wsurgery {name} " in readme, f"README does not document `wsurgery {name}`"
        assert f"wsurgery.{name}/1" in readme or name == "inspect" and "wsurgery.inspect/1" in readme


def test_every_option_of_every_command_is_in_its_readme_synopsis():
    """Each option (by one of its names: ``--output`` or ``-o``) is in a ``wsurgery NAME ...``
    line of the README, so a new flag (``--no-sync``, ...) cannot go undocumented."""
    import re

    import typer.main

    from wsurgery.cli.app import app

    readme = (ROOT / "README.md").read_text()
    missing = []
    for name, cmd in typer.main.get_group(app).commands.items():
        lines = "\n".join(line for line in readme.splitlines() if line.startswith(f"wsurgery {name} "))
        tokens = set(re.findall(r"(?<![\w-])--?[\w-]+", lines))
        for param in cmd.params:
            names = set(param.opts) | set(param.secondary_opts)
            if param.param_type_name == "option" and "--help" not in names and not names & tokens:
                missing.append(f"{name} {'/'.join(sorted(names))}")
    assert not missing, f"options missing from the README's synopses: {missing}"


def test_pretty_exceptions_show_no_locals():
    from wsurgery.cli.app import app

    assert app.pretty_exceptions_show_locals is False


def _cli_words() -> tuple[set[str], set[str]]:
    """Every long flag of every command (``--force``) and every command name."""
    import typer.main

    from wsurgery.cli.app import app

    flags: set[str] = set()
    group = typer.main.get_group(app)
    for cmd in group.commands.values():
        for param in cmd.params:
            if param.param_type_name == "option":
                # long flags only: one-letter ones (-o, -f) read as prose too (``ulimit -f``)
                flags.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--") and o != "--help")
    return flags, set(group.commands)


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_speaks_of_cli_flags_or_commands(path):
    """The core's messages, hints and docs name library parameters; the CLI renders its
    own flags (``wsurgery.cli._errors``). A flag or a ``wsurgery <command>`` in a core
    module, code or prose, fails."""
    import re

    flags, commands = _cli_words()
    text = path.read_text()
    found = sorted(f for f in flags if re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
    found += sorted(f"wsurgery {c}" for c in commands if re.search(rf"\bwsurgery {c}\b", text))
    assert not found, f"{path.relative_to(ROOT)} speaks of {found}"
