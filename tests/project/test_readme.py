"""The README's examples (and the Python examples of docs/) run as written, from the repository's root."""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python_blocks() -> list[str]:
    """The ```python blocks of the README, then of the notes in docs/."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [block for page in pages for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    """Each ```python block of the README runs, in a copy of the fixtures (outputs go to
    build/readme/ of that copy)."""
    shutil.copytree(ROOT / "fixtures", tmp_path / "fixtures", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (tmp_path / "build" / "readme").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    code = _python_blocks()[index]
    namespace = {"__name__": "readme"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    # a pytest example defines test functions: run them too, as pytest would
    for name, fn in list(namespace.items()):
        if name.startswith("test_") and callable(fn):
            params = inspect.signature(fn).parameters
            fn(**({"tmp_path": tmp_path} if "tmp_path" in params else {}))


def test_the_readme_has_library_examples():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    assert any("def test_" in block and "assert_checkpoint_equal" in block for block in blocks)


def _command_examples() -> list[str]:
    """The ``wsurgery ...`` example lines of the README's shell blocks (synopses, with their
    ``[OPTIONS]`` and upper-case placeholders, and ``$ `` transcripts left out)."""
    lines, fence = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:]
        elif fence == "" and line.startswith("wsurgery ") and "[" not in line:
            if not re.search(r" (CKPT|IN|RECIPE|A B)\b", line):
                lines.append(line.split("  #")[0].rstrip())
    return lines


def test_the_readme_command_examples_run(tmp_path, monkeypatch):
    """Every command example of the README runs, in order (later ones read what earlier ones
    wrote), in a copy of the fixtures and recipes: exit 0, or 1 for a diff or check that
    finds differences."""
    import shlex

    from typer.testing import CliRunner

    from wsurgery.cli.app import app

    ignore = shutil.ignore_patterns("*.py", "__pycache__")
    shutil.copytree(ROOT / "fixtures", tmp_path / "fixtures", ignore=ignore)
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=ignore)
    (tmp_path / "build").mkdir()
    monkeypatch.chdir(tmp_path)
    examples = _command_examples()
    assert len(examples) >= 30
    runner = CliRunner()
    for line in examples:
        args = shlex.split(line)[1:]
        result = runner.invoke(app, args)
        allowed = {0, 1} if args[0] in ("diff", "check") else {0}
        assert result.exit_code in allowed, f"{line}\n{result.output}"
