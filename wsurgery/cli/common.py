"""Shared option types, output helpers and the one error-to-exit-code table."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError, OutputError, SurgeryError, UsageError, WsurgeryError

# Exit codes, in one place (see the README's table).
EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_INTERNAL = 70
EXIT_CODES: dict[type[WsurgeryError], int] = {
    UsageError: 2,
    InputError: 3,
    SurgeryError: 4,
    OutputError: 5,
}


def exit_code_for(exc: WsurgeryError) -> int:
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return exc.exit_code


# --- shared options ---------------------------------------------------------------------

CkptArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint: .safetensors, a sharded *.index.json or its folder, or a torch .pt/.pth/.bin/.ckpt.",
        metavar="CKPT",
        show_default=False,
    ),
]
SrcOpt = Annotated[
    str,
    typer.Option(
        "--src",
        help="Source tensor, or a module prefix for every tensor under it. A name that is both a tensor and a "
        "prefix means the tensor.",
        show_default=False,
    ),
]
DstOpt = Annotated[
    str,
    typer.Option(
        "--dst",
        help="Destination tensor (new or existing), or a module prefix. A name that is both a tensor and a prefix "
        "means the tensor.",
        show_default=False,
    ),
]
TransformOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--transform",
        "-t",
        help="Transform step, repeatable, applied in order: same, transpose, transpose(d0,d1), permute(...), "
        "reshape(...), slice(dim,start,stop), cast(dtype), scale(x).",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--output",
        "-o",
        help="Output .safetensors path (default: the input's path with .safetensors).",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output file.")]
InPlaceOpt = Annotated[bool, typer.Option("--in-place", help="Allow the output to replace the input file.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", "-n", help="Print the plan and write nothing.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
MaxShardOpt = Annotated[
    Optional[str],
    typer.Option(
        "--max-shard-size",
        help="Write shards of at most this size (5GB, 500MiB, bytes) and an index into the folder OUT.",
        show_default=False,
    ),
]
NoSyncOpt = Annotated[
    bool,
    typer.Option(
        "--no-sync",
        help="Do not wait for the output to reach the disk (skip fsync): faster, still atomic, but an OS crash or "
        "power loss soon after may lose or truncate it.",
    ),
]
FilterOpt = Annotated[
    Optional[str], typer.Option("--filter", help="Only tensors whose name matches this glob.", show_default=False)
]
FromOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--from",
        help="Take the source from this second checkpoint (any readable format); the output still defaults to "
        "CKPT's path with .safetensors.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", help="Where computed tensors (transforms, untied aliases) are computed: cpu, cuda, cuda:N."
    ),
]
UntieDstOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--dst",
        help="Alias to store as a tensor of its own, repeatable; a stored name unties every alias of it, a module "
        "prefix every tie under it (default: every alias).",
        show_default=False,
    ),
]
AtolOpt = Annotated[
    float, typer.Option("--atol", min=0.0, help="Absolute tolerance: equal when |a - b| <= atol + rtol * |b|.")
]
RtolOpt = Annotated[float, typer.Option("--rtol", min=0.0, help="Relative tolerance (see --atol); 0 and 0 = bitwise.")]
CompareDeviceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--device",
        help="Where to compare: cpu (default), cuda or cuda:N (tensors move there in chunks).",
        show_default=False,
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; the exit code says it all.")]
OtherOpt = Annotated[
    Optional[Path],
    typer.Option("--other", help="Take DST from this second checkpoint (any readable format).", show_default=False),
]


# --- printing ---------------------------------------------------------------------------


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped into a log (CI): tables as wide as they need, not folded at 80 columns.
    wide = not stream.isatty() and not os.environ.get("COLUMNS")
    return Console(
        stderr=stderr,
        highlight=False,
        soft_wrap=False,
        no_color=bool(os.environ.get("NO_COLOR")) or None,
        width=200 if wide else None,
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def safe(text) -> str:
    """Names and metadata come from files: escape control characters (a hostile name must
    not send escape sequences to the user's terminal)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def cell(text):
    """A table cell that shows ``text`` literally: no rich markup, no control characters."""
    from rich.text import Text

    return Text(safe(text))


def markup_safe(text) -> str:
    """``text`` for use inside a rich markup string."""
    from rich.markup import escape

    return escape(safe(text))


# errnos that only a write gives: wsurgery's own file writes map them to OutputError, so one
# that reaches a command is a failed write to standard output (a full disk, a closed pipe)
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE})


def stdout_error(exc: OSError) -> OutputError:
    return OutputError(
        f"cannot write to standard output: {exc.strerror or exc}",
        hint="the output is incomplete; check the file or pipe it goes to",
    )


def emit_json(obj: dict) -> None:
    try:
        sys.stdout.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
        sys.stdout.flush()
    except OSError as exc:
        raise stdout_error(exc) from None


def debug() -> bool:
    return os.environ.get("WSURGERY_DEBUG", "") not in ("", "0")


def report_error(command: str, exc: WsurgeryError, json_out: bool) -> int:
    code = exit_code_for(exc)
    if debug():
        traceback.print_exc()
    sys.stderr.write(f"error: {safe(exc.one_line())}\n")
    if json_out:
        with contextlib.suppress(OutputError):  # standard output itself may be what failed
            emit_json(
                {
                    "schema": f"wsurgery.{command}/1",
                    "error": {"kind": exc.kind, "message": str(exc), "hint": exc.hint, "exit_code": code},
                }
            )
    return code


def command(name: str):
    """Wrap a command: map library errors to one stderr line and the table's exit code."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            json_out = bool(kwargs.get("json_out", False))
            try:
                code = fn(*args, **kwargs)
            except WsurgeryError as exc:
                raise typer.Exit(report_error(name, exc, json_out)) from None
            except KeyboardInterrupt:
                sys.stderr.write("error: interrupted\n")
                raise typer.Exit(130) from None
            except MemoryError:
                exc = InputError("out of memory", hint="the checkpoint or a tensor is too large for this machine")
                raise typer.Exit(report_error(name, exc, json_out)) from None
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except OSError as exc:
                if exc.errno not in _WRITE_ERRNOS:
                    raise _internal_error(name, exc, json_out) from None
                raise typer.Exit(report_error(name, stdout_error(exc), False)) from None
            except Exception as exc:  # a bug in wsurgery: still one line, never a traceback unless asked
                raise _internal_error(name, exc, json_out) from None
            raise typer.Exit(code or 0)

        return wrapper

    return deco


def _internal_error(name: str, exc: Exception, json_out: bool) -> typer.Exit:
    """A bug in wsurgery: one line (a traceback only with WSURGERY_DEBUG), exit 70."""
    if debug():
        traceback.print_exc()
    first = str(exc).splitlines()[0] if str(exc) else ""
    sys.stderr.write(
        f"error: internal error: {type(exc).__name__}: {first} "
        "(hint: set WSURGERY_DEBUG=1 for a traceback and report it)\n"
    )
    if json_out:
        with contextlib.suppress(OutputError):  # standard output itself may be what failed
            emit_json(
                {
                    "schema": f"wsurgery.{name}/1",
                    "error": {"kind": "internal", "message": first, "hint": None, "exit_code": EXIT_INTERNAL},
                }
            )
    return typer.Exit(EXIT_INTERNAL)


# --- outputs ----------------------------------------------------------------------------


def default_output(ckpt_path: Path) -> Path:
    p = Path(ckpt_path)
    if p.is_dir():
        return p.with_name(p.name.rstrip("/") + ".safetensors")
    if p.name.endswith(".index.json"):
        return p.with_name(p.name[: -len(".index.json")].removesuffix(".safetensors") + ".safetensors")
    return p.with_suffix(".safetensors")


def resolve_output(out: Path | None, ckpt_path: Path, inputs: list[str], force: bool, in_place: bool) -> Path:
    """Decide where to write, refusing to overwrite silently (exit 5)."""
    target = Path(out) if out is not None else default_output(ckpt_path)
    if target.is_dir():
        raise OutputError(f"{target} is a folder", hint="give a file path with -o")
    real = os.path.realpath(target)
    is_input = any(os.path.realpath(i) == real for i in inputs)
    if is_input and not in_place:
        raise OutputError(
            f"{target} is an input; refusing to write over it",
            hint="choose another path with -o, or pass --in-place",
        )
    if target.exists() and not is_input and not force:
        raise OutputError(f"{target} exists", hint="pass --force to overwrite it, or choose another path with -o")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{parent} is not a folder", hint="create it first or choose another path with -o")
    return target


def resolve_folder_output(
    out: Path | None, ckpt_path: Path, inputs: list[str], force: bool, in_place: bool
) -> tuple[Path, bool]:
    """Where sharded output goes (a folder), and whether an existing one may be replaced."""
    p = Path(ckpt_path)
    target = Path(out) if out is not None else p.with_name(p.name.split(".")[0] + "-sharded")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} is a file; sharded output is a folder", hint="choose a folder path with -o")
    real = os.path.realpath(target)
    holds_input = any(os.path.realpath(i) == real or os.path.realpath(i).startswith(real + os.sep) for i in inputs)
    if holds_input and not in_place:
        raise OutputError(
            f"{target} holds an input; refusing to write over it",
            hint="choose another folder with -o, or pass --in-place",
        )
    if target.exists() and not holds_input and not force:
        raise OutputError(f"{target} exists", hint="pass --force to replace it, or choose another folder with -o")
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent} is not a folder", hint="create it first or choose another path with -o")
    return target, target.exists()


def shape_text(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def human_bytes(n: int) -> str:
    step = 1024.0
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < step or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= step
    return f"{n} B"


class ByteProgress:
    """A rich progress bar on stderr, in bytes, for work that is large enough to take a while."""

    THRESHOLD = 256 << 20

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.enabled = enabled and total >= self.THRESHOLD
        self.total = total
        self.description = description
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

            self._progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console(stderr=True),
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def advance(self, nbytes: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, nbytes)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False
