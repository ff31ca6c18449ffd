"""The README's library examples run as written, from the repository's root."""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


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
    assert len(_python_blocks()) >= 2
    assert any("def test_" in block and "assert_checkpoint_equal" in block for block in _python_blocks())
