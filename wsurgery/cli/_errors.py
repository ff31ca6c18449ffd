"""Library errors as the command line shows them: one line, a hint that names flags, and
an exit code. Library errors carry data (``problems``, ``candidates``, ``reason``,
``param``); every error line and every JSON error object is made here, and the
exit-code table lives here and nowhere else. A command returns its exit code (typer is
not needed to run one: see ``params.for_typer`` for how typer gets it).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shlex
import sys
from typing import Any

from ..errors import (
    DistributedError,
    InputError,
    OutputError,
    Problem,
    SurgeryError,
    UnknownNameError,
    UsageError,
    WsurgeryError,
    summarize,
)
from .text import safe

# The exit codes (the README's table).
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_CODES: dict[type[WsurgeryError], int] = {
    UsageError: EXIT_USAGE,
    InputError: 3,
    SurgeryError: 4,
    OutputError: 5,
    DistributedError: 6,
}

# Library parameters as the command line spells them.
FLAGS = {
    "atol": "--atol",
    "rtol": "--rtol",
    "device": "--device",
    "filter": "--filter",
    "max_shard_size": "--max-shard-size",
    "format": "--format",
    "transform": "--transform",
    "src": "--src",
    "dst": "--dst",
    "sizes": "--sizes",
    "template": "--src/--dst",
    "max_rel_l2": "--max-rel-l2",
    "min_cosine": "--min-cosine",
    "by_module": "--by-module",
    "keep_aliases": "--keep-aliases",
    "flat": "--flat",
}


def flag(param: str) -> str:
    """The command line's name of the library parameter ``param`` (``--keep-aliases``)."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def note_text(note: str) -> str:
    """A library note as the command line says it: a parameter it names as its flag."""
    render = getattr(note, "render", None)
    return render(flag) if render is not None else note


# What to do about an output that cannot be written, by OutputError.reason.
_OUTPUT_HINTS = {
    "exists": "pass --force to overwrite it, or choose another path with -o",
    "is_input": "choose another path with -o, or pass --in-place",
    "is_folder": "give a file path with -o",
    "is_file": "give a folder path with -o",
    "not_regular": "give the path of a regular file with -o",
    "not_a_folder": "create it first or choose another path with -o",
    "no_space": "free some disk space or write elsewhere with -o",
    "permission": "choose a writable destination with -o",
    "stdout": "the output is incomplete; check the file or pipe it goes to",
}

# A refusal over many tensors shows this many problems, then a count.
PROBLEMS_SHOWN = 5
ERROR_LIMIT = 4000  # characters of an error line (a hostile name can be megabytes)


def exit_code_for(exc: WsurgeryError) -> int:
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_INTERNAL


def problem_hint(p: Problem) -> str | None:
    """A problem's fix in command-line words."""
    if p.new_name:
        return "pass --new if the name is meant to be new"
    if p.suggest:
        return "try " + " ".join(f"--transform {shlex.quote(s)}" for s in p.suggest)
    if p.use == "untie":
        return "untie them first with `wsurgery untie`"
    if p.use:
        return f"use `wsurgery {p.use}`"
    if p.candidates:
        return f"did you mean {', '.join(p.candidates)}?"
    return None


def _problem_line(p: Problem) -> str:
    hint = problem_hint(p)
    return f"{p.message} ({hint})" if hint else p.message


def message(exc: WsurgeryError) -> str:
    """The one-line message of ``exc`` for the command line."""
    if isinstance(exc, SurgeryError) and len(exc.problems) > 1:
        return summarize([_problem_line(p) for p in exc.problems], PROBLEMS_SHOWN)
    if isinstance(exc, SurgeryError) and len(exc.problems) == 1:
        return " ".join(exc.problems[0].message.split("\n"))
    text = str(exc)
    if isinstance(exc, UsageError) and exc.param in FLAGS:
        flag = FLAGS[exc.param]
        text = flag + text[len(exc.param) :] if text.startswith(exc.param) else f"{flag}: {text}"
    return text


def hint(exc: WsurgeryError) -> str | None:
    """The hint of ``exc`` for the command line: flags where the library names parameters."""
    if isinstance(exc, OutputError) and exc.reason in _OUTPUT_HINTS:
        return _OUTPUT_HINTS[exc.reason]
    if isinstance(exc, SurgeryError) and len(exc.problems) == 1:  # one hint: the problem's, then the error's
        said = [h for h in (problem_hint(exc.problems[0]), exc.hint) if h]
        return "; ".join(said) or None
    if isinstance(exc, SurgeryError) and exc.problems:
        return "nothing was written"
    if isinstance(exc, UnknownNameError) and exc.hint is None:
        target = f" {shlex.quote(exc.checkpoint)}" if exc.checkpoint else ""
        return f"run `wsurgery inspect{target}` to list the names"
    return exc.hint


# --- reporting --------------------------------------------------------------------------

# errnos that only a write gives: wsurgery's own file writes map them to OutputError, so one
# that reaches a command is a failed write to standard output (a full disk, a closed pipe)
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE})


_STDOUT_FAILED: list[bool] = []  # set once a failed write to standard output is reported


def stdout_error(exc: OSError) -> OutputError:
    # A reader that closed the pipe early (`| head`) chose to stop: a failure, but not news.
    reason = "stdout_closed" if exc.errno == errno.EPIPE else "stdout"
    return OutputError(f"cannot write to standard output: {exc.strerror or exc}", reason=reason)


def says_nothing(exc: WsurgeryError) -> bool:
    """Whether an error is reported by its exit code alone (standard output's reader left)."""
    return isinstance(exc, OutputError) and exc.reason == "stdout_closed"


def stdout_failed() -> bool:
    return bool(_STDOUT_FAILED)


def debug() -> bool:
    return os.environ.get("WSURGERY_DEBUG", "") not in ("", "0")


def print_traceback() -> None:
    """The traceback of the error being handled, on stderr (``WSURGERY_DEBUG``); traceback
    is imported only then (it costs a few ms of every command's start-up)."""
    import traceback

    traceback.print_exc()


def emit_json(obj: dict) -> None:
    """Print one JSON object on stdout; a failed write is an ``OutputError``."""
    try:
        sys.stdout.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
        sys.stdout.flush()
    except OSError as exc:
        raise stdout_error(exc) from None


def emit_error(text: str, hint_text: str | None = None) -> None:
    """The one place an error line is written: ``error: TEXT (hint: HINT)`` on stderr,
    escaped and bounded (a hostile name can be megabytes)."""
    line = f"{text} (hint: {hint_text})" if hint_text else text
    sys.stderr.write(f"error: {safe(line, limit=ERROR_LIMIT)}\n")


def problem_dicts(exc: WsurgeryError) -> list[dict[str, Any]]:
    """Every problem of ``exc`` (none cut) as ``{step, name, message, hint}``."""
    problems = exc.problems if isinstance(exc, SurgeryError) else []
    return [
        {
            "step": p.step,
            "name": p.names[0] if p.names else None,
            "message": " ".join(p.message.split("\n")),
            "hint": problem_hint(p),
        }
        for p in problems
    ]


def emit_error_json(
    command: str,
    kind: str,
    text: str,
    hint_text: str | None,
    code: int,
    problems: list[dict[str, Any]] | None = None,
) -> None:
    """The JSON error object of ``--json`` on stdout: ``{"schema", "error": {kind, message,
    hint, exit_code, problems}}``."""
    with contextlib.suppress(OutputError):  # standard output itself may be what failed
        emit_json(
            {
                "schema": f"wsurgery.{command}/1",
                "error": {
                    "kind": kind,
                    "message": text,
                    "hint": hint_text,
                    "exit_code": code,
                    "problems": problems or [],
                },
            }
        )


def report_error(command: str, exc: WsurgeryError, json_out: bool) -> int:
    """Print ``exc`` as one line on stderr (and a JSON object with every problem with
    ``--json``); its exit code."""
    code = exit_code_for(exc)
    if debug():
        print_traceback()
    if not says_nothing(exc):
        emit_error(message(exc), hint(exc))
    if isinstance(exc, OutputError) and exc.reason in ("stdout", "stdout_closed"):
        _STDOUT_FAILED.append(True)
    elif json_out:
        if isinstance(exc, SurgeryError) and len(exc.problems) > 1:  # the terminal cuts at five; JSON never
            whole_text = summarize([_problem_line(p) for p in exc.problems])
        else:
            whole_text = message(exc)
        emit_error_json(command, exc.kind, whole_text, hint(exc), code, problem_dicts(exc))
    return code


def report_stdout_failure(exc: OSError) -> OutputError:
    """A failed flush of standard output at exit, reported like any failed write."""
    err = stdout_error(exc)
    if not says_nothing(err):
        emit_error(message(err), hint(err))
    return err


def _internal_error(name: str, exc: Exception, json_out: bool) -> int:
    """A bug in wsurgery: one line (a traceback only with WSURGERY_DEBUG), exit 70."""
    if debug():
        print_traceback()
    first = str(exc).splitlines()[0] if str(exc) else ""
    emit_error(f"internal error: {type(exc).__name__}: {first}", "set WSURGERY_DEBUG=1 for a traceback and report it")
    if json_out:
        emit_error_json(name, "internal", first, None, EXIT_INTERNAL)
    return EXIT_INTERNAL


def command(name: str):
    """Wrap a command: library errors become one stderr line and the table's exit code,
    which the command returns; a command launched as several ranks runs as one of them
    (see ``ranks``)."""

    def deco(fn):
        return _reporting(name)(_as_rank(name)(fn))

    return deco


def _as_rank(name: str):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            from .ranks import ranks, silent

            try:
                with ranks(name, kwargs):  # launched as several ranks: rank 0 prints
                    return fn(*args, **kwargs)
            except Exception as exc:
                if silent(exc):  # every rank raised it: rank 0 prints it, the others exit with its code
                    return exit_code_for(exc) if isinstance(exc, WsurgeryError) else EXIT_INTERNAL
                raise

        return wrapper

    return deco


def _json_of(kwargs: dict[str, Any]) -> bool:
    """Whether the command was asked for JSON: its ``json_out`` flag, or ``out.json``."""
    if "json_out" in kwargs:
        return bool(kwargs["json_out"])
    out = kwargs.get("out")
    return bool(getattr(out, "json", False))


def _reporting(name: str):
    """Library errors become one stderr line and the table's exit code (returned)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs) -> int:
            json_out = _json_of(kwargs)
            try:
                code = fn(*args, **kwargs)
            except WsurgeryError as exc:
                return report_error(name, exc, json_out)
            except KeyboardInterrupt:
                emit_error("interrupted")
                return 130
            except MemoryError:
                oom = InputError("out of memory", hint="the checkpoint or a tensor is too large for this machine")
                return report_error(name, oom, json_out)
            except OSError as exc:
                if exc.errno not in _WRITE_ERRNOS:
                    return _internal_error(name, exc, json_out)
                return report_error(name, stdout_error(exc), False)
            except Exception as exc:  # a bug in wsurgery: still one line, never a traceback unless asked
                return _internal_error(name, exc, json_out)
            return code or 0

        return wrapper

    return deco
