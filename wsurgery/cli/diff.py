"""wsurgery diff: compare two checkpoints of any formats, tensor by tensor (exit 0 equal, 1 different)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ._errors import command, emit_json
from .common import (
    AtolOpt,
    ByteProgress,
    CompareDeviceOpt,
    FilterOpt,
    JsonOpt,
    QuietOpt,
    RtolOpt,
    cell,
    console,
    safe,
    shape_text,
)

DiffArgA = Annotated[
    Path, typer.Argument(metavar="A", help="First checkpoint, any readable format.", show_default=False, readable=False)
]
DiffArgB = Annotated[
    Path,
    typer.Argument(metavar="B", help="Second checkpoint, any readable format.", show_default=False, readable=False),
]


def single_threaded_blas() -> None:
    """Start numpy's BLAS with one thread in this process (call before numpy is imported).

    A compare never runs BLAS on more than one thread (its dot products come in pieces
    below OpenBLAS's threading threshold, so results never depend on this), and starting
    the threads anyway costs ~70 ms of CPU at numpy's import. An explicit user setting wins.
    """
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def compare_tuning():
    """The tuning ``diff`` and ``check`` run with: the threads detected now (one per CPU
    this process may use, at most 4). It never changes a result."""
    from ..compare import Tuning

    return Tuning.detect()


class ProgressBar:
    """Adapts the library's ``progress(done, total)`` callback to a ``ByteProgress`` bar."""

    def __init__(self, description: str, enabled: bool):
        self.description = description
        self.enabled = enabled
        self._bar: ByteProgress | None = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = ByteProgress(total, self.description, enabled=self.enabled).__enter__()
        self._bar.advance(done - self._done)
        self._done = done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False


def fmt_float(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def fmt_mismatched(stats) -> str:
    if stats is None:
        return "-"
    if not stats.numel:
        return "0"
    pct = 100.0 * stats.mismatched / stats.numel
    return f"{stats.mismatched:,} ({pct:.3g}%)"


def fmt_side(info: dict) -> str:
    text = f"{info['dtype']} {shape_text(info['shape'])}"
    alias = info.get("alias_of")
    if alias:
        text += f" = {' -> '.join(alias['transform']) or 'same'}({alias['source']})"
    return text


def fmt_sides(info_a: dict, info_b: dict) -> str:
    a, b = fmt_side(info_a), fmt_side(info_b)
    return a if a == b else f"{a} | {b}"


def stats_table(rows, first: str, sides: str):
    """A rich table: one row per (name, reason, info_a, info_b, stats)."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column(first, overflow="fold")
    table.add_column("reason")
    table.add_column(sides, overflow="fold")
    table.add_column("elements", justify="right", no_wrap=True)
    table.add_column("mismatched", justify="right", no_wrap=True)
    table.add_column("max |a-b|", justify="right", no_wrap=True)
    table.add_column("max rel", justify="right", no_wrap=True)
    table.add_column("cosine", justify="right", no_wrap=True)
    for name, reason, info_a, info_b, stats in rows:
        table.add_row(
            cell(name),
            reason,
            cell(fmt_sides(info_a, info_b)),
            f"{stats.numel:,}" if stats else "-",
            fmt_mismatched(stats),
            fmt_float(stats.max_abs_diff if stats else None),
            fmt_float(stats.max_rel_diff if stats else None),
            fmt_float(stats.cosine if stats else None, 9),
        )
    return table


def _names_block(con, title: str, names: list[str]) -> None:
    if names:
        con.print(f"{title} ({len(names)}):", markup=False)
        for n in names:
            con.print(f"  {safe(n)}", markup=False)


@command("diff")
def diff(
    a: DiffArgA,
    b: DiffArgB,
    atol: AtolOpt = 0.0,
    rtol: RtolOpt = 0.0,
    filter: FilterOpt = None,  # noqa: A002
    device: CompareDeviceOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> int:
    """Compare two checkpoints of any formats: names only in A or B, and for names in both,
    shape, dtype, tie (alias) and value differences with statistics.

    Exit 0 when equal, 1 when different (errors: 2 usage, 3 input). Equality is bitwise with
    the default --atol 0 --rtol 0 (NaN in the same place is equal); values are streamed, so
    memory stays small whatever the checkpoint size.

    Example: wsurgery diff model.pt model.safetensors --atol 1e-6
    """
    single_threaded_blas()
    from ..compare import diff as run_diff

    with ProgressBar("diff", enabled=not (json_out or quiet)) as bar:
        report = run_diff(
            a, b, atol=atol, rtol=rtol, device=device, filter=filter, progress=bar, tuning=compare_tuning()
        )
    code = 0 if report.equal else 1
    if quiet:
        return code
    if json_out:
        emit_json(report.to_dict())
        return code
    con = console()
    tol = f"atol {atol:g}, rtol {rtol:g}"
    if report.equal:
        con.print(f"equal: {report.same:,} tensors agree ({tol})", markup=False)
        return code
    parts = [f"{len(report.changed):,} changed"]
    parts.append(f"{len(report.only_in_a):,} only in A")
    parts.append(f"{len(report.only_in_b):,} only in B")
    parts.append(f"{report.same:,} same")
    con.print(f"different: {', '.join(parts)} ({tol})", markup=False)
    if report.changed:
        rows = [(c.name, c.reason, c.a, c.b, c.stats) for c in report.changed]
        con.print(stats_table(rows, "name", "A | B"))
    _names_block(con, f"only in A: {a}", report.only_in_a)
    _names_block(con, f"only in B: {b}", report.only_in_b)
    return code
