"""Shared option types and printing helpers of the commands."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

from ..show import shape_text  # noqa: F401 - the commands' import of it
from .params import Arg, Opt
from .text import LONG, safe  # noqa: F401 - the commands' import of them

# --- shared options ---------------------------------------------------------------------

CkptArg = Annotated[
    Path,
    Arg(
        help="Checkpoint: .safetensors, a sharded *.index.json or its folder, a torch .pt/.pth/.bin/.ckpt, or a "
        "Hugging Face model folder (config.json beside the weights).",
        metavar="CKPT",
        readable=False,  # wsurgery reads it and says why it cannot (exit 3), not click (exit 2)
        show_default=False,
    ),
]
SrcOpt = Annotated[
    list[str],
    Opt(
        "--src",
        help="Source tensor, or a module prefix for every tensor under it. A name that is both a tensor and a "
        "prefix means the tensor. Repeat --src/--dst in pairs for several at once.",
        show_default=False,
    ),
]
DstOpt = Annotated[
    list[str],
    Opt(
        "--dst",
        help="Destination tensor (new or existing), or a module prefix; one per --src, in order. A name that is "
        "both a tensor and a prefix means the tensor.",
        show_default=False,
    ),
]
CheckSrcOpt = Annotated[
    str,
    Opt(
        "--src",
        help="Source tensor, or a module prefix for every tensor under it. A name that is both a tensor and a "
        "prefix means the tensor.",
        show_default=False,
    ),
]
CheckDstOpt = Annotated[
    str,
    Opt("--dst", help="Tensor (or module prefix) to compare with transform(SRC).", show_default=False),
]
NewOpt = Annotated[
    bool,
    Opt("--new", help="The destinations are new names, even one edit away from existing ones (not typos)."),
]
DimOpt = Annotated[int, Opt("--dim", help="The axis.")]
NamesArg = Annotated[
    list[str],
    Arg(
        metavar="NAME...",
        help="Selectors, each an exact tensor name, a module prefix or a glob ('optimizer.*').",
        show_default=False,
    ),
]
TieTransformOpt = Annotated[
    Optional[list[str]],
    Opt(
        "--transform",
        "-t",
        help="View step, repeatable, applied in order: same, transpose, transpose(d0,d1), permute(...), "
        "reshape(...), slice(dim,start,stop).",
        show_default=False,
    ),
]
TransformOpt = Annotated[
    Optional[list[str]],
    Opt(
        "--transform",
        "-t",
        help="Transform step, repeatable, applied in order: same, transpose, transpose(d0,d1), permute(...), "
        "reshape(...), slice(dim,start,stop), cast(dtype), scale(x).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, Opt("--json", help="Print one JSON object on stdout.")]
FilterOpt = Annotated[
    Optional[str],
    Opt(
        "--filter",
        help="Only the tensors this selector chooses: an exact name, a module prefix or a glob ('*.weight').",
        show_default=False,
    ),
]
FromOpt = Annotated[
    Optional[Path],
    Opt(
        "--from",
        readable=False,
        help="Take the source from this second checkpoint (any readable format); the output still defaults to "
        "CKPT's path with .safetensors.",
        show_default=False,
    ),
]
CheckFromOpt = Annotated[
    Optional[Path],
    Opt(
        "--from", readable=False, help="Take DST from this second checkpoint (any readable format).", show_default=False
    ),
]
DeviceOpt = Annotated[
    str,
    Opt("--device", help="Where computed tensors (transforms, untied aliases) are computed: cpu, cuda, cuda:N."),
]
UntieDstOpt = Annotated[
    Optional[list[str]],
    Opt(
        "--dst",
        help="Alias to store as a tensor of its own, repeatable; a stored name unties every alias of it, a module "
        "prefix every tie under it (default: every alias).",
        show_default=False,
    ),
]
AtolOpt = Annotated[float, Opt("--atol", min=0.0, help="Absolute tolerance: equal when |a - b| <= atol + rtol * |b|.")]
RtolOpt = Annotated[float, Opt("--rtol", min=0.0, help="Relative tolerance (see --atol); 0 and 0 = bitwise.")]
CompareDeviceOpt = Annotated[
    Optional[str],
    Opt(
        "--device",
        help="Where to compare: cpu (default), cuda or cuda:N (tensors move there in chunks).",
        show_default=False,
    ),
]
QuietOpt = Annotated[bool, Opt("--quiet", "-q", help="Print nothing; the exit code says it all.")]
MaxRelL2Opt = Annotated[
    Optional[float],
    Opt(
        "--max-rel-l2",
        metavar="X",
        help="A tensor whose ||a - b|| / ||a|| is at most X counts as equal (with --atol/--rtol: both must hold).",
        show_default=False,
    ),
]
MinCosineOpt = Annotated[
    Optional[float],
    Opt(
        "--min-cosine",
        metavar="X",
        help="A tensor whose cosine similarity is at least X counts as equal (every stated criterion must hold).",
        show_default=False,
    ),
]


# --- printing ---------------------------------------------------------------------------


class PlainConsole:
    """Plain lines on a stream, for output that has no styles (tables of names, summaries):
    what rich's console offers those commands (``print``, ``width``, ``is_terminal``,
    ``file``) without importing rich. Lines are never folded; a closed pipe raises
    ``BrokenPipeError`` (exit 5, like any failed write)."""

    def __init__(self, stderr: bool = False):
        self.file = sys.stderr if stderr else sys.stdout
        self.is_terminal = self.file.isatty()
        columns = os.environ.get("COLUMNS", "")
        if columns.isdigit() and int(columns) > 0:
            self.width = int(columns)
        elif self.is_terminal:
            import shutil

            self.width = shutil.get_terminal_size().columns
        else:
            self.width = 200  # piped into a log (CI): tables as wide as they need

    def print(self, text: str = "", *, markup: bool = False) -> None:
        self.file.write(f"{text}\n")


def console(stderr: bool = False, rich: bool = False):
    """Where a command prints: plain lines by default; rich's console (``rich=True``) for
    styled tables and progress bars."""
    if not rich:
        return PlainConsole(stderr)
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich exits 1 here without a word, which for diff means "different": raise
            # the write error instead, so a closed pipe is exit 5 like any failed write.
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    stream = sys.stderr if stderr else sys.stdout
    # Piped into a log (CI): tables as wide as they need, not folded at 80 columns.
    wide = not stream.isatty() and not os.environ.get("COLUMNS")
    return _Console(
        stderr=stderr,
        highlight=False,
        soft_wrap=False,
        no_color=bool(os.environ.get("NO_COLOR")) or None,
        width=200 if wide else None,
    )


def cell_len(text: str) -> int:
    """Columns ``text`` takes on a terminal (wide characters count two)."""
    if text.isascii():
        return len(text)
    from rich.cells import cell_len as rich_cell_len

    return rich_cell_len(text)


def cell(text):
    """A table cell that shows ``text`` literally: no rich markup, no control characters."""
    from rich.text import Text

    return Text(safe(text))


def print_table(
    con, headers: list[str], rows: list[list[str]], *, right: tuple[str, ...] = (), title: str | None = None
) -> None:
    """A table whose cells are never cut or wrapped (tensor names are what users copy out).

    ``rows`` hold plain text; control characters are escaped. Where the table is wider than
    the terminal (or ``COLUMNS``), each row is stacked instead: its first cell on a line of
    its own, the other cells below it as ``header: value``. Piped output is never stacked
    or folded: it is as wide as the table. Drawn as plain lines, in time linear in the
    cells (a million rows are fine).
    """
    cells = [[safe(c) for c in row] for row in rows]
    widths = [cell_len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            n = len(c) if c.isascii() else cell_len(c)
            if n > widths[i]:
                widths[i] = n
    needed = sum(widths) + 2 * (len(headers) - 1)
    stacked = needed > con.width and (con.is_terminal or bool(os.environ.get("COLUMNS")))
    lines = [title] if title else []
    if stacked:
        for row in cells:
            lines.append(row[0])
            lines.append("    " + "  ".join(f"{h}: {c}" for h, c in zip(headers[1:], row[1:], strict=True) if c))
    else:

        def line(row: list[str]) -> str:
            out = []
            for i, (h, c) in enumerate(zip(headers, row, strict=True)):
                pad = " " * (widths[i] - (len(c) if c.isascii() else cell_len(c)))
                out.append(pad + c if h in right else c + pad)
            return "  ".join(out).rstrip()

        lines.append(line(headers))
        lines.extend(line(row) for row in cells)
    con.file.write("\n".join(lines) + "\n")


def print_skipped(con, skipped: list[str], title: str, shown: int = 10) -> None:
    """The entries of a torch file that are not tensors: a count, then the first few, one a line."""
    if not skipped:
        return
    lines = [f"{title}: {len(skipped):,}"] + [f"  {safe(entry)}" for entry in skipped[:shown]]
    if len(skipped) > shown:
        lines.append(f"  ... and {len(skipped) - shown:,} more (--json lists them all)")
    con.file.write("\n".join(lines) + "\n")


# --- outputs ----------------------------------------------------------------------------


def default_output(ckpt_path: Path, suffix: str = ".safetensors") -> Path:
    p = Path(ckpt_path)
    if p.is_dir():
        return p.with_name(p.name.rstrip("/") + suffix)
    if p.name.endswith(".index.json"):
        return p.with_name(p.name[: -len(".index.json")].removesuffix(".safetensors") + suffix)
    return p.with_suffix(suffix)


def human_bytes(n: int) -> str:
    step = 1024.0
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < step or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= step
    return f"{n} B"


def _speed_column():
    """Transfer speed in binary units (MiB/s), like the sizes in the summaries."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class BinarySpeed(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{human_bytes(int(speed))}/s", style="progress.data.speed")

    return BinarySpeed()


class ByteProgress:
    """A rich progress bar on stderr, in bytes, for work that is large enough to take a while."""

    THRESHOLD = 256 << 20
    suppressed = False  # set on the ranks other than 0 of a launched command: they show nothing

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.enabled = enabled and total >= self.THRESHOLD and not ByteProgress.suppressed
        self.total = total
        self.description = description
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

            self._progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(binary_units=True),  # MiB, as every size wsurgery prints
                _speed_column(),
                TimeRemainingColumn(),
                console=console(stderr=True, rich=True),
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


class LateProgress:
    """A progress bar on stderr for a write whose size is known only inside the library
    (a recipe): it appears once the bytes written pass :attr:`ByteProgress.THRESHOLD`."""

    def __init__(self, description: str, enabled: bool = True):
        self.enabled = enabled and not ByteProgress.suppressed
        self.description = description
        self.done = 0
        self._bar: ByteProgress | None = None

    def __enter__(self):
        return self

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is None and self.enabled and self.done >= ByteProgress.THRESHOLD:
            self._bar = ByteProgress(ByteProgress.THRESHOLD, self.description).__enter__()
            if self._bar._progress is not None and self._bar._task is not None:
                self._bar._progress.update(self._bar._task, total=None, completed=self.done)
            return
        if self._bar is not None:
            self._bar.advance(nbytes)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False
