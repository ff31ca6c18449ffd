"""Shared option types and printing helpers of the commands."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

# --- shared options ---------------------------------------------------------------------

CkptArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint: .safetensors, a sharded *.index.json or its folder, a torch .pt/.pth/.bin/.ckpt, or a "
        "Hugging Face model folder (config.json beside the weights).",
        metavar="CKPT",
        show_default=False,
    ),
]
SrcOpt = Annotated[
    list[str],
    typer.Option(
        "--src",
        help="Source tensor, or a module prefix for every tensor under it. A name that is both a tensor and a "
        "prefix means the tensor. Repeat --src/--dst in pairs for several at once.",
        show_default=False,
    ),
]
DstOpt = Annotated[
    list[str],
    typer.Option(
        "--dst",
        help="Destination tensor (new or existing), or a module prefix; one per --src, in order. A name that is "
        "both a tensor and a prefix means the tensor.",
        show_default=False,
    ),
]
CheckSrcOpt = Annotated[
    str,
    typer.Option(
        "--src",
        help="Source tensor, or a module prefix for every tensor under it. A name that is both a tensor and a "
        "prefix means the tensor.",
        show_default=False,
    ),
]
CheckDstOpt = Annotated[
    str,
    typer.Option("--dst", help="Tensor (or module prefix) to compare with transform(SRC).", show_default=False),
]
NewOpt = Annotated[
    bool,
    typer.Option("--new", help="The destinations are new names, even one edit away from existing ones (not typos)."),
]
DimOpt = Annotated[int, typer.Option("--dim", help="The axis.")]
NamesArg = Annotated[
    list[str],
    typer.Argument(
        metavar="NAME...", help="Tensor names, module prefixes or globs ('optimizer.*').", show_default=False
    ),
]
TieTransformOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--transform",
        "-t",
        help="View step, repeatable, applied in order: same, transpose, transpose(d0,d1), permute(...), "
        "reshape(...), slice(dim,start,stop).",
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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
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
CheckFromOpt = Annotated[
    Optional[Path],
    typer.Option("--from", help="Take DST from this second checkpoint (any readable format).", show_default=False),
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


def print_table(
    con, headers: list[str], rows: list[list[str]], *, right: tuple[str, ...] = (), title: str | None = None
) -> None:
    """A table whose cells are never cut or wrapped (tensor names are what users copy out).

    ``rows`` hold plain text; control characters are escaped and markup shown literally.
    Where the table is wider than the terminal (or ``COLUMNS``), each row is stacked
    instead: its first cell on a line of its own, the other cells below it as
    ``header: value``. Piped output is never stacked or folded: it is as wide as the table.
    """
    from rich.cells import cell_len
    from rich.table import Table

    cells = [[safe(c) for c in row] for row in rows]
    widths = [cell_len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], cell_len(c))
    needed = sum(widths) + 2 * (len(headers) - 1)
    if needed > con.width and not (con.is_terminal or os.environ.get("COLUMNS")):
        con.width = needed  # a pipe or a file: as wide as the table
    if needed > con.width:
        from rich.text import Text

        if title:
            con.print(title, markup=False)
        for row in cells:
            con.print(Text(row[0]), no_wrap=True, overflow="ignore", crop=False)
            rest = "  ".join(f"{h}: {c}" for h, c in zip(headers[1:], row[1:], strict=True) if c)
            con.print(Text("    " + rest), no_wrap=True, overflow="ignore", crop=False)
        return
    table = Table(box=None, pad_edge=False, header_style="bold", title=title, title_justify="left")
    for h in headers:
        table.add_column(h, no_wrap=True, overflow="fold", justify="right" if h in right else "left")
    for row in cells:
        table.add_row(*(cell(c) for c in row))
    con.print(table)


def markup_safe(text) -> str:
    """``text`` for use inside a rich markup string."""
    from rich.markup import escape

    return escape(safe(text))


# --- outputs ----------------------------------------------------------------------------


def default_output(ckpt_path: Path, suffix: str = ".safetensors") -> Path:
    p = Path(ckpt_path)
    if p.is_dir():
        return p.with_name(p.name.rstrip("/") + suffix)
    if p.name.endswith(".index.json"):
        return p.with_name(p.name[: -len(".index.json")].removesuffix(".safetensors") + suffix)
    return p.with_suffix(suffix)


def resolve_output(out: Path | None, ckpt_path: Path, inputs: list[str], force: bool, in_place: bool) -> Path:
    """Decide where to write, refusing to overwrite silently (exit 5)."""
    from ..formats.destination import check_file_target

    target = Path(out) if out is not None else default_output(ckpt_path)
    check_file_target(target, inputs, overwrite=force, replace_input=in_place)
    return target


def resolve_folder_output(
    out: Path | None, ckpt_path: Path, inputs: list[str], force: bool, in_place: bool
) -> tuple[Path, bool]:
    """Where sharded output goes (a folder), and whether an existing one may be replaced."""
    from ..formats.destination import check_folder_target

    p = Path(ckpt_path)
    target = Path(out) if out is not None else p.with_name(p.name.split(".")[0] + "-sharded")
    return target, check_folder_target(target, inputs, overwrite=force, replace_input=in_place)


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

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.enabled = enabled and total >= self.THRESHOLD
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
