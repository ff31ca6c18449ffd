"""Where an output may go: the checks made before anything is written.

An output never replaces an existing file or folder unless asked to, never replaces an
input unless that is asked for separately, and is always a regular file or a folder:
a device node, pipe or socket is refused even when overwriting is allowed (``os.replace``
would swap the node itself out of ``/dev``). Every refusal is an ``OutputError`` whose
``reason`` says why.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

_ELSEWHERE = "choose another path, or pass overwrite=True to replace it"


def _real(path) -> str:
    return os.path.realpath(os.fspath(path))


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
        inputs: every file the output is computed from.
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
    real = _real(path)
    is_input = any(_real(i) == real for i in inputs)
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
    holds_input = any(_real(i) == real or _real(i).startswith(real + os.sep) for i in inputs)
    if holds_input and not replace_input:
        raise OutputError(f"{path} holds an input; refusing to write over it", reason="is_input", hint=_ELSEWHERE)
    exists = os.path.exists(path)
    if exists and not holds_input and not overwrite:
        raise OutputError(f"{path} exists", reason="exists", hint=_ELSEWHERE)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"{parent} is not a folder", reason="not_a_folder", hint="create it first")
    return exists
