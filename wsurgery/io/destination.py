"""Where an output may go: the checks made before anything is written.

One rule for every path wsurgery writes (outputs, shards, temporary files, reports): it
is never an input, never a file inside an input folder (a folder read as a whole: a
model folder, a folder of shards, a DCP or NeMo folder), and never a non-regular file (a
device node, pipe or socket is refused even when overwriting is allowed: ``os.replace``
would swap the node itself out of ``/dev``). Paths are compared by their real paths, so a
link to an input is the input. An output also never replaces an existing file or folder
unless asked to, and replaces an input only when that is asked for separately (in place).
Every refusal is an ``OutputError`` whose ``reason`` says why.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

_ELSEWHERE = "choose another path, or pass overwrite=True to replace it"


def _real(path) -> str:
    return os.path.realpath(os.fspath(path))


def _inside(real: str, folder_real: str) -> bool:
    return real == folder_real or real.startswith(folder_real.rstrip(os.sep) + os.sep)


def input_folders(inputs: Iterable[str]) -> list[str]:
    """The folders that ``inputs`` make untouchable as a whole: every input that is a
    folder, and the folder of every sharded index (``*.index.json``: its shards lie
    beside it), as real paths."""
    out: list[str] = []
    for i in inputs:
        i = os.fspath(i)
        if os.path.isdir(i):
            out.append(_real(i))
        elif i.endswith(".index.json"):
            out.append(_real(os.path.dirname(os.path.abspath(i))))
    return out


def protected_inputs(ckpt) -> list[str]:
    """Every path a checkpoint was read from: its input files, the path it was opened by,
    and the folder read as a whole (a model folder), for the ``inputs`` of the checks."""
    paths = [os.fspath(p) for p in getattr(ckpt, "input_files", None) or ()]
    if getattr(ckpt, "path", None):
        paths.append(os.fspath(ckpt.path))
    folder = getattr(ckpt, "model_folder", None)
    if folder is not None:
        paths.append(os.fspath(folder.path))
    return paths


def _is_protected(path: str, inputs: Iterable[str]) -> tuple[bool, bool]:
    """``(is an input itself, lies inside an input folder)`` for ``path``."""
    inputs = [os.fspath(i) for i in inputs]
    real = _real(path)
    is_input = any(_real(i) == real for i in inputs if not os.path.isdir(i))
    inside = any(_inside(real, f) for f in input_folders(inputs))
    return is_input, inside


def check_report_target(path, inputs: Iterable[str]) -> None:
    """Refuse to write a report (or any other file that is not a checkpoint) at ``path``
    when it is an input, lies inside an input folder, is a folder, or is not a regular
    file; an existing regular file elsewhere may be replaced.

    Args:
        path: the file to write.
        inputs: the paths the report was made from (files or folders, as given).

    Raises:
        OutputError: ``reason`` ``"protected"`` (an input, or inside an input folder),
            ``"is_folder"`` or ``"not_regular"``.

    Example:
        >>> check_report_target("diff.html", ["a.safetensors", "b/"])  # doctest: +SKIP
    """
    from ..errors import OutputError

    path = os.fspath(path)
    is_input, inside = _is_protected(path, inputs)
    if is_input or inside:
        where = "would replace an input" if is_input else "lies inside an input folder"
        raise OutputError(f"{path} {where}; refusing to write there", reason="protected", hint="choose another path")
    if os.path.isdir(path):
        raise OutputError(f"{path} is a folder", reason="is_folder", hint="give a file path")
    if os.path.lexists(path) and _not_regular(path):
        raise OutputError(f"{path} is not a regular file", reason="not_regular", hint="give a file path")


def _not_regular(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_file_target(path, inputs: Iterable[str], *, overwrite: bool, replace_input: bool) -> None:
    """Refuse to write a file at ``path`` unless it is allowed.

    Args:
        path: the output file.
        inputs: every file (or folder read as a whole) the output is computed from.
        overwrite: an existing file (not an input) may be replaced.
        replace_input: the output may replace one of ``inputs``.

    Raises:
        OutputError: with ``reason`` ``"is_folder"``, ``"not_regular"``, ``"is_input"``,
            ``"exists"`` or ``"not_a_folder"`` (the parent folder is missing).
    """
    from ..errors import OutputError

    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputError(f"{path} is a folder", reason="is_folder", hint="give a file path")
    if _not_regular(path):
        raise OutputError(f"{path} is not a regular file", reason="not_regular", hint="give a file path")
    is_input, inside = _is_protected(path, inputs)
    if inside:  # a shard, an index or any other file of a folder read as a whole: never
        raise OutputError(
            f"{path} lies inside an input folder; refusing to write there",
            reason="protected",
            hint="choose another path",
        )
    if is_input and not replace_input:
        raise OutputError(f"{path} is an input; refusing to write over it", reason="is_input", hint=_ELSEWHERE)
    if os.path.lexists(path) and not is_input and not overwrite:
        raise OutputError(f"{path} exists", reason="exists", hint=_ELSEWHERE)
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise OutputError(f"{parent} is not a folder", reason="not_a_folder", hint="create it first")


def check_folder_target(path, inputs: Iterable[str], *, overwrite: bool, replace_input: bool) -> bool:
    """Refuse to write a folder output (shards) at ``path`` unless it is allowed.

    Returns whether a folder already exists there (and will be replaced as a whole).

    Raises:
        OutputError: with ``reason`` ``"is_file"``, ``"is_input"`` (the folder holds an
            input), ``"exists"`` or ``"not_a_folder"``.
    """
    from ..errors import OutputError

    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{path} is a file; the output is a folder", reason="is_file", hint="give a folder path")
    real = _real(path)
    inputs = [os.fspath(i) for i in inputs]
    if any(_inside(real, f) and real != f for f in input_folders(inputs)):
        raise OutputError(
            f"{path} lies inside an input folder; refusing to write there",
            reason="protected",
            hint="choose another path",
        )
    holds_input = any(_inside(_real(i), real) for i in inputs)
    if holds_input and not replace_input:
        raise OutputError(f"{path} holds an input; refusing to write over it", reason="is_input", hint=_ELSEWHERE)
    exists = os.path.exists(path)
    if exists and not holds_input and not overwrite:
        raise OutputError(f"{path} exists", reason="exists", hint=_ELSEWHERE)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"{parent} is not a folder", reason="not_a_folder", hint="create it first")
    return exists
