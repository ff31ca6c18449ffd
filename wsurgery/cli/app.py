"""The typer application: one module per command, registered here."""

from __future__ import annotations

import contextlib
import copy as _copy_module
import inspect
import io
import os
import signal
import sys
from typing import Annotated

import typer

from . import apply, cast, check, concat, convert, copy, diff, drop, inspect_cmd, keep, rename, split, stack, tie, untie
from . import merge as merge_cmd
from . import merge_lora as merge_lora_cmd
from ._errors import _emit_error_json, exit_code_for, one_line, says_nothing, stdout_error, stdout_failed

app = typer.Typer(
    name="wsurgery",
    help="Weight surgery on PyTorch checkpoints: inspect, tie, copy, rename, cast, fuse, diff and convert, safely.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        sys.stdout.write(f"wsurgery {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Weight surgery on PyTorch checkpoints: inspect, tie, copy, rename, cast, fuse, diff and convert, safely."""


def _help(fn) -> str:
    """A command's docstring as help: each paragraph one line, for the help screen to wrap
    to the terminal (a docstring's own line breaks would leave orphan words)."""
    text = inspect.cleandoc(fn.__doc__ or "")
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))


for _name, _fn in [
    ("inspect", inspect_cmd.inspect),
    ("tie", tie.tie),
    ("copy", copy.copy),
    ("untie", untie.untie),
    ("rename", rename.rename),
    ("drop", drop.drop),
    ("keep", keep.keep),
    ("cast", cast.cast),
    ("concat", concat.concat),
    ("split", split.split),
    ("stack", stack.stack),
    ("unstack", stack.unstack),
    ("apply", apply.apply),
    ("convert", convert.convert),
    ("diff", diff.diff),
    ("check", check.check),
    ("merge", merge_cmd.merge),
    ("merge-lora", merge_lora_cmd.merge_lora),
]:
    app.command(_name, help=_help(_fn))(_fn)


def _usage_error_line(exc) -> str:
    """click's usage errors (missing option, bad value) as the one line every error gets."""
    return f"error: {exc.format_message()} (hint: {_usage_hint(exc)})"


def _usage_hint(exc) -> str:
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "wsurgery"
    return f"run `{path} --help`"


def _json_asked(argv: list[str] | None) -> bool:
    """Whether ``--json`` is among the arguments (before a ``--``), parsed or not."""
    args = sys.argv[1:] if argv is None else argv
    return "--json" in args[: args.index("--")] if "--" in args else "--json" in args


def _usage_error_json(exc) -> None:
    """A usage error that click found, as the JSON error object every ``--json`` error is
    (``wsurgery.<command>/1``; ``wsurgery.error/1`` when there is no command)."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.info_name if ctx is not None and ctx.parent is not None else "error"
    _emit_error_json(command, "usage", exc.format_message(), _usage_hint(exc), exc.exit_code)


def _terminate(signum, frame):
    sys.stderr.write("error: terminated\n")
    raise SystemExit(128 + signum)


def _whole_writes() -> None:
    """With ``PYTHONUNBUFFERED`` (common in containers and CI) the standard streams write
    straight to the file descriptor, and a short write (a nearly full disk, a file-size
    limit) drops the rest silently. A ``BufferedWriter`` in between writes every byte or
    raises, so output is complete or the command fails."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        raw = getattr(stream, "buffer", None)
        if isinstance(raw, io.RawIOBase):
            setattr(
                sys,
                name,
                io.TextIOWrapper(
                    io.BufferedWriter(raw),
                    encoding=stream.encoding,
                    errors=stream.errors,
                    line_buffering=name == "stderr" or stream.isatty(),
                ),
            )


def _with_only_the_command_run(args: list[str]) -> typer.Typer:
    """The app with only the command named first in ``args`` registered, when one is.

    Building a command's options from its signature costs about 1.3 ms; building all of
    them for every run was 20 ms of a 0.1 s ``inspect``. The command's own ``--help``,
    errors and behaviour are those of the full app; without a command name first (the
    top-level help, ``--version``, a typo) the full app is built.
    """
    name = args[0] if args else None
    chosen = [c for c in app.registered_commands if c.name == name]
    if not chosen:
        return app
    only = _copy_module.copy(app)
    only.registered_commands = chosen
    return only


def main(argv: list[str] | None = None) -> None:
    """The console script: usage errors exit 2 with one line, like every other error."""
    _whole_writes()
    # A file-size limit must surface as an error on write (EFBIG, exit 5), not kill us.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # SIGTERM (CI timeouts, kill) unwinds like Ctrl-C, so temporary files are removed.
    signal.signal(signal.SIGTERM, _terminate)
    cmd = typer.main.get_command(_with_only_the_command_run(sys.argv[1:] if argv is None else argv))
    try:
        code = cmd.main(args=argv, prog_name="wsurgery", standalone_mode=False)
    except typer.Abort:
        sys.stderr.write("error: aborted\n")
        sys.exit(130)
    except Exception as exc:
        if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            if type(exc).__name__ == "NoArgsIsHelpError":
                sys.exit(0)  # the help was printed already
            sys.stderr.write(_usage_error_line(exc) + "\n")
            if _json_asked(argv):
                _usage_error_json(exc)
                with contextlib.suppress(OSError, ValueError):
                    sys.stdout.flush()
            sys.exit(exc.exit_code)
        raise
    code = code if isinstance(code, int) else 0
    if argv is not None:
        sys.exit(code)
    _exit_now(code)


def _exit_now(code: int) -> None:
    """End the console script once its work is done: flush the output, then leave without
    the interpreter's teardown (freeing every module, joining idle worker threads), which
    costs 30-60 ms of a sub-second command. Every file wsurgery wrote is closed by now.
    Output that cannot be flushed (a full disk, a closed pipe) is exit 5, like any write."""
    try:
        if not stdout_failed():  # already reported once: what is left unwritten stays so
            sys.stdout.flush()
    except (OSError, ValueError) as exc:
        err = stdout_error(exc if isinstance(exc, OSError) else OSError(str(exc)))
        if not says_nothing(err):
            sys.stderr.write(f"error: {one_line(err)}\n")
        code = exit_code_for(err)
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)
