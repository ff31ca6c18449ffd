"""The console script: commands registered by name, each imported only when it runs.

Two paths, one behaviour. A well-formed command line (``wsurgery inspect m.safetensors``)
imports its command's module and what that module uses, and nothing else: the fast path
(:mod:`wsurgery.cli.fastpath`) parses it from the command's declarations and calls the
command. Everything else goes to typer (click), the one authority on help screens, usage
errors and anything unusual: the fast path declines whatever it is not sure of.
``wsurgery --version`` and the top-level help import neither typer nor any command (the
registry below holds each command's place and one-line summary, so listing them imports
none).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import typer

# name -> (module under wsurgery.cli, function, summary: the first paragraph of its docstring)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "inspect": (
        "inspect_cmd",
        "inspect",
        "List tensors (name, dtype, shape, parameters, bytes, alias of), totals and metadata.",
    ),
    "tie": ("tie", "tie", "Tie DST to SRC: store SRC once and record DST as its alias."),
    "copy": ("copy", "copy", "Copy transform(SRC) into DST as a tensor of its own."),
    "untie": ("untie", "untie", "Store the named aliases (every alias by default) as tensors of their own."),
    "rename": ("rename", "rename", "Rename every tensor by a regular expression; aliases follow."),
    "drop": ("drop", "drop", "Remove tensors by name, module prefix or glob."),
    "keep": ("keep", "keep", "Keep only the tensors chosen by name, module prefix or glob."),
    "cast": ("cast", "cast", "Cast floating tensors to DTYPE, keeping ties."),
    "concat": ("concat", "concat", "Concatenate the SRC tensors along --dim into DST; the sources are gone."),
    "split": ("split", "split", "Split SRC along --dim into the DST pieces of the given --sizes; SRC is gone."),
    "stack": ("stack", "stack", "Stack per-layer tensors into one with a layer axis."),
    "unstack": ("stack", "unstack", "Unstack a tensor with a layer axis into per-layer tensors."),
    "apply": (
        "apply",
        "apply",
        "Run a recipe: surgery steps in order on its first input, its expectations checked, one write.",
    ),
    "convert": (
        "convert",
        "convert",
        "Convert a checkpoint to safetensors (shared storage recorded as aliases) or, with -o x.pt or --format "
        "torch, to a torch.save file (aliases as shared storage), or with --format dcp to a "
        "torch.distributed.checkpoint folder (aliases written as values).",
    ),
    "diff": (
        "diff",
        "diff",
        "Compare two checkpoints of any formats: names only in A or B, and for names in both, shape, dtype, tie "
        "(alias) and value differences with statistics (max |a-b|, max rel, rel l2 = ||a-b|| / ||a||, cosine).",
    ),
    "check": ("check", "check", "Assert that transform(SRC) equals DST, in CKPT or with DST taken from --from."),
    "merge": ("merge", "merge", "Merge checkpoints of one architecture, tensor by tensor, in float64 rounded once."),
    "merge-lora": (
        "merge_lora",
        "merge_lora",
        "Fold PEFT LoRA adapters into the base checkpoint CKPT: W + w * s * (B @ A) per targeted module.",
    ),
}

ABOUT = "Weight surgery on PyTorch checkpoints: inspect, tie, copy, rename, cast, fuse, diff and convert, safely."


def command_function(name: str):
    """The function of command ``name`` (imports its module, and only it)."""
    import importlib

    module, attr, _ = COMMANDS[name]
    return getattr(importlib.import_module(f".{module}", __package__), attr)


def _help(fn) -> str:
    """A command's docstring as help: each paragraph one line, for the help screen to wrap
    to the terminal (a docstring's own line breaks would leave orphan words)."""
    import inspect

    text = inspect.cleandoc(fn.__doc__ or "")
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))


def _version(value: bool) -> None:
    if value:
        import typer

        from .. import __version__

        sys.stdout.write(f"wsurgery {__version__}\n")
        raise typer.Exit(0)


def build_app(names: list[str] | None = None) -> typer.Typer:
    """The typer application with the commands ``names`` (every command by default)."""
    import typer

    app = typer.Typer(
        name="wsurgery",
        help=ABOUT,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        pretty_exceptions_show_locals=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(  # noqa: B008 - typer's default-value form: no annotation to evaluate
            False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        """Weight surgery on PyTorch checkpoints: inspect, tie, copy, rename, cast, fuse, diff and convert, safely."""

    from .params import for_typer

    for name in COMMANDS if names is None else names:
        fn = command_function(name)
        app.command(name, help=_help(fn))(for_typer(fn))
    return app


def __getattr__(name: str) -> Any:
    """``app``: the whole application, built on first use (tests and embedders)."""
    if name == "app":
        built = globals()["app"] = build_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def top_level_help(width: int | None = None) -> str:
    """The help of ``wsurgery`` itself, from the registry: no command is imported."""
    import shutil
    import textwrap

    width = width or min(shutil.get_terminal_size((100, 24)).columns, 100)
    name_w = max(map(len, COMMANDS)) + 2
    lines = ["Usage: wsurgery [OPTIONS] COMMAND [ARGS]...", ""]
    lines += textwrap.wrap(ABOUT, width - 2, initial_indent="  ", subsequent_indent="  ")
    lines += [
        "",
        "Options:",
        "  -V, --version  Print the version and exit.",
        "  -h, --help     Show this message and exit.",
        "",
        "Commands:",
    ]
    for name, (_, _, summary) in COMMANDS.items():
        body = textwrap.wrap(summary, max(width - name_w - 2, 30))
        lines.append(f"  {name.ljust(name_w)}{body[0]}")
        lines += [" " * (name_w + 2) + more for more in body[1:]]
    lines += ["", "Run `wsurgery COMMAND --help` for a command's options and an example."]
    return "\n".join(lines) + "\n"


def _usage_hint(exc) -> str:
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "wsurgery"
    return f"run `{path} --help`"


def _json_asked(args: list[str]) -> bool:
    """Whether ``--json`` is among the arguments (before a ``--``), parsed or not."""
    return "--json" in args[: args.index("--")] if "--" in args else "--json" in args


def _usage_error(exc, args: list[str]) -> int:
    """A usage error that click found (missing option, bad value): the one error line, and
    with ``--json`` the JSON error object (``wsurgery.<command>/1``; ``wsurgery.error/1``
    when there is no command). Its exit code."""
    from ._errors import emit_error, emit_error_json

    emit_error(exc.format_message(), _usage_hint(exc))
    if _json_asked(args):
        ctx = getattr(exc, "ctx", None)
        command = ctx.info_name if ctx is not None and ctx.parent is not None else "error"
        emit_error_json(command, "usage", exc.format_message(), _usage_hint(exc), exc.exit_code)
    return int(exc.exit_code)


def _terminate(signum, _frame):
    from ._errors import emit_error

    emit_error("terminated")
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


def main(argv: list[str] | None = None) -> None:
    """The console script: usage errors exit 2 with one line, like every other error."""
    args = sys.argv[1:] if argv is None else list(argv)
    _whole_writes()
    # A file-size limit must surface as an error on write (EFBIG, exit 5), not kill us.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # SIGTERM (CI timeouts, kill) unwinds like Ctrl-C, so temporary files are removed.
    signal.signal(signal.SIGTERM, _terminate)
    if args in (["--version"], ["-V"]):
        from .. import __version__

        sys.stdout.write(f"wsurgery {__version__}\n")
        _finish(0, argv)
    if args in ([], ["--help"], ["-h"]):
        sys.stdout.write(top_level_help())
        _finish(0, argv)
    code = _run_fast(args)
    _finish(_run(args) if code is None else code, argv)


def _run_fast(args: list[str]) -> int | None:
    """Run a well-formed command line without typer; ``None`` where the fast path declines
    (typer then runs it). Shell completion (click's ``_WSURGERY_COMPLETE``) is typer's."""
    if args[0] not in COMMANDS or os.environ.get("_WSURGERY_COMPLETE") or not all(isinstance(a, str) for a in args):
        return None
    from .fastpath import parse

    fn = command_function(args[0])
    kwargs = parse(fn, args[1:])
    if kwargs is None:
        return None
    code = fn(**kwargs)
    return code if isinstance(code, int) else 0


def _run(args: list[str]) -> int:
    """Run the command named first in ``args`` from an app built with it alone (a typo or
    an option first: the whole app, for click's own error); its exit code."""
    import typer

    from ._errors import emit_error

    name = args[0]
    cmd = typer.main.get_command(build_app([name] if name in COMMANDS else None))
    try:
        code = cmd.main(args=args, prog_name="wsurgery", standalone_mode=False)
    except typer.Abort:
        emit_error("aborted")
        return 130
    except Exception as exc:
        if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            if type(exc).__name__ == "NoArgsIsHelpError":
                return 0  # the help was printed already
            code = _usage_error(exc, args)
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
            return code
        raise
    return code if isinstance(code, int) else 0


def _finish(code: int, argv: list[str] | None) -> None:
    """Leave with ``code``: ``sys.exit`` when called with arguments (tests, embedders),
    else :func:`_exit_now`."""
    if argv is not None:
        sys.exit(code)
    _exit_now(code)


def _exit_now(code: int) -> None:
    """End the console script once its work is done: flush the output, then leave without
    the interpreter's teardown (freeing every module, joining idle worker threads), which
    costs 30-60 ms of a sub-second command. Every file wsurgery wrote is closed by now.
    Output that cannot be flushed (a full disk, a closed pipe) is exit 5, like any write."""
    try:
        if "wsurgery.cli._errors" not in sys.modules or not sys.modules["wsurgery.cli._errors"].stdout_failed():
            sys.stdout.flush()  # a failure already reported leaves what is unwritten so
    except (OSError, ValueError) as exc:
        from ._errors import exit_code_for, report_stdout_failure

        err = report_stdout_failure(exc if isinstance(exc, OSError) else OSError(str(exc)))
        code = exit_code_for(err)
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)
