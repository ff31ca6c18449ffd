"""wsurgery diff: compare two checkpoints of any formats, tensor by tensor (exit 0 equal, 1 different)."""

from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

from ..errors import UnknownNameError
from ..transforms import chain_text
from ._errors import command, emit_json
from .common import (
    ByteProgress,
    CompareDeviceOpt,
    FilterOpt,
    JsonOpt,
    QuietOpt,
    cell,
    console,
    print_skipped,
    print_table,
    safe,
    shape_text,
)
from .options import Tolerances, tolerance_options
from .params import Arg, Opt

DiffArgA = Annotated[
    Path, Arg(metavar="A", help="First checkpoint, any readable format.", show_default=False, readable=False)
]
DiffArgB = Annotated[
    Path,
    Arg(metavar="B", help="Second checkpoint, any readable format.", show_default=False, readable=False),
]


IgnoreTiesOpt = Annotated[
    bool,
    Opt(
        "--ignore-ties",
        help="Compare values only: a tie in one file and a stored copy in the other are equal when the values are.",
    ),
]
ByModuleOpt = Annotated[
    Optional[str],
    Opt(
        "--by-module",
        metavar="DEPTH",
        help="Roll tensors up into modules of DEPTH name components (2: layers.0), with rel_l2 and cosine per "
        "module; auto: the deepest depth with at most 64 modules. Shown by default when more than 32 tensors change.",
        show_default=False,
    ),
]
HtmlOpt = Annotated[
    Optional[Path],
    Opt(
        "--html",
        metavar="REPORT",
        help="Also write a self-contained HTML report: summary, rel_l2 per module (chart), sortable table.",
        show_default=False,
        dir_okay=False,
    ),
]
ChartOpt = Annotated[
    Optional[bool],
    Opt(
        "--chart/--no-chart",
        help="Draw rel_l2 per module as text bars, rolling up at --by-module auto unless told (default: on a "
        "terminal, when modules are shown).",
        show_default=False,
    ),
]


def single_threaded_blas() -> None:
    """Start numpy's BLAS with one thread in this process (call before numpy is imported).

    A compare never runs BLAS on more than one thread (its dot products come in pieces
    below OpenBLAS's threading threshold, so results never depend on this), and starting
    the threads anyway costs ~70 ms of CPU at numpy's import. An explicit user setting wins.
    """
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def compare_options(tol: Tolerances, *, device, progress) -> dict:
    """The keyword arguments ``diff`` and ``check`` share: ``CompareOptions`` fields, the
    tuning they run with (the node's cores shared among its local ranks), the progress bar
    and the mapper that spreads the pairs over ranks under ``torchrun``."""
    from ..api import compare_mapper, compare_tuning

    return {
        **tol.kwargs(),
        "device": device,
        "tuning": compare_tuning(),
        "progress": progress,
        "mapper": compare_mapper(),
    }


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
        text += f" = {chain_text(alias['transform'])}({alias['source']})"
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
    table.add_column("rel l2", justify="right", no_wrap=True)
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
            fmt_float(stats.rel_l2 if stats else None),
            fmt_float(stats.cosine if stats else None, 9),
        )
    return table


def machine_output(report, *, quiet: bool, json_out: bool) -> bool:
    """Print a compare report's JSON when asked; True when that is all the command prints
    (``--quiet`` or ``--json``), False when the human report follows."""
    if json_out and not quiet:
        emit_json(report.to_dict())
    return quiet or json_out


def _names_block(con, title: str, names: list[str]) -> None:
    if names:
        con.print(f"{title} ({len(names)}):", markup=False)
        for n in names:
            con.print(f"  {safe(n)}", markup=False)


def module_label(name: str) -> str:
    return name if name else "(root)"


def modules_table(con, modules, depth: int) -> None:
    """The module rollup as plain lines (names never cut)."""
    sides = any(m.only_in_a or m.only_in_b for m in modules)
    headers = ["module", "tensors", "changed"]
    headers += ["only A", "only B"] if sides else []
    headers += ["elements", "mismatched", "max |a-b|", "rel l2", "cosine"]
    rows = []
    for m in modules:
        row = [module_label(m.name), f"{m.tensors:,}", f"{m.changed:,}"]
        row += [f"{m.only_in_a:,}", f"{m.only_in_b:,}"] if sides else []
        row += [
            f"{m.numel:,}",
            f"{m.mismatched:,}",
            fmt_float(m.max_abs_diff),
            fmt_float(m.rel_l2),
            fmt_float(m.cosine, 9),
        ]
        rows.append(row)
    right = tuple(h for h in headers if h != "module")
    print_table(con, headers, rows, right=right, title=f"by module (depth {depth}):")


_EIGHTHS = " ▏▎▍▌▋▊▉█"
CHART_BAR_MAX = 60  # columns of the longest bar


def chart_lines(modules, width: int, unicode: bool = True) -> list[str]:
    """rel_l2 per module as text bars, in layer order, within ``width`` columns: linear,
    the longest bar for the largest finite value; an infinite one fills the bar and reads
    ``inf``, a module without statistics ``-``."""
    names = [safe(module_label(m.name)) for m in modules]
    values = [fmt_float(m.rel_l2) for m in modules]
    vw = max(len(v) for v in values)
    nw = min(max(len(n) for n in names), max(8, width // 3))
    bar = max(10, min(CHART_BAR_MAX, width - nw - vw - 4))
    finite = [m.rel_l2 for m in modules if m.rel_l2 is not None and math.isfinite(m.rel_l2)]
    top = max(finite, default=0.0) or 1.0
    lines = []
    for m, name, value in zip(modules, names, values, strict=True):
        if len(name) > nw:
            name = name[: nw - 1] + ("…" if unicode else "~")
        x = m.rel_l2
        if x is None or x <= 0:
            cells = 0
        elif math.isinf(x):
            cells = bar * 8
        else:
            cells = max(1, round(bar * 8 * x / top))
        if unicode:
            text = _EIGHTHS[-1] * (cells // 8) + (_EIGHTHS[cells % 8] if cells % 8 else "")
        else:
            text = "#" * -(-cells // 8)
        lines.append(f"{name:<{nw}}  {text:<{bar}}  {value:>{vw}}")
    return lines


def print_chart(con, modules, depth: int) -> None:
    encoding = (getattr(con.file, "encoding", None) or "utf-8").lower()
    lines = chart_lines(modules, con.width, unicode=encoding.startswith("utf"))
    con.file.write("\n".join([f"rel_l2 by module (depth {depth}, layer order):", *lines]) + "\n")


def _depth_arg(text: str | None):
    """``--by-module``: a depth, ``auto``, or the text as it is (the library says why not)."""
    if text is None:
        return None
    t = text.strip().lower()
    if t == "auto":
        return "auto"
    try:
        return int(t)
    except ValueError:
        return text


def criteria_text(report) -> str:
    text = report.criteria.describe()
    if getattr(report, "ignore_ties", False):
        text += ", ties ignored"
    return text


@command("diff")
@tolerance_options()
def diff(
    a: DiffArgA,
    b: DiffArgB,
    ignore_ties: IgnoreTiesOpt = False,
    by_module: ByModuleOpt = None,
    filter: FilterOpt = None,  # noqa: A002
    device: CompareDeviceOpt = None,
    html: HtmlOpt = None,
    chart: ChartOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    tol: Tolerances,
) -> int:
    """Compare two checkpoints of any formats: names only in A or B, and for names in both,
    shape, dtype, tie (alias) and value differences with statistics (max |a-b|, max rel,
    rel l2 = ||a-b|| / ||a||, cosine).

    Exit 0 when equal, 1 when different (errors: 2 usage, 3 input). Equality is bitwise with
    the default --atol 0 --rtol 0 (NaN in the same place is equal); --max-rel-l2 and
    --min-cosine state drift budgets per tensor instead (every stated criterion must hold).
    Values are streamed, so memory stays small whatever the checkpoint size.

    Example: wsurgery diff base.safetensors tuned.safetensors --max-rel-l2 1e-2 --by-module 2 --html diff.html
    """
    single_threaded_blas()
    from ..compare import diff as run_diff
    from ..compare.report import AUTO_MIN_CHANGED

    depth, min_changed = _depth_arg(by_module), 0
    if depth is None and (html is not None or chart):
        depth = "auto"  # a chart needs modules
    elif depth is None and not (json_out or quiet):
        depth, min_changed = "auto", AUTO_MIN_CHANGED  # the default view when many tensors change
    try:
        with ProgressBar("diff", enabled=not (json_out or quiet)) as bar:
            report = run_diff(
                a,
                b,
                filter=filter,
                ignore_ties=ignore_ties,
                by_module=depth,
                by_module_min_changed=min_changed,
                **compare_options(tol, device=device, progress=bar),
            )
    except UnknownNameError as exc:
        if exc.hint is None:  # looked for in both: one runnable command for each
            shown = " or ".join(f"`wsurgery inspect {shlex.quote(str(p))}`" for p in (a, b))
            exc.hint = f"run {shown} to list the names"
        raise
    if html is not None:
        report.save_html(html)
    code = 0 if report.equal else 1
    if machine_output(report, quiet=quiet, json_out=json_out):
        return code
    con = console(rich=True)
    said = criteria_text(report)
    if report.equal:
        agree = "1 tensor agrees" if report.same == 1 else f"{report.same:,} tensors agree"
        con.print(f"equal: {agree} ({said})", markup=False)
    else:
        parts = [f"{len(report.changed):,} changed"]
        parts.append(f"{len(report.only_in_a):,} only in A")
        parts.append(f"{len(report.only_in_b):,} only in B")
        parts.append(f"{report.same:,} same")
        con.print(f"different: {', '.join(parts)} ({said})", markup=False)
    if report.changed:
        rows = [(c.name, c.reason, c.a, c.b, c.stats) for c in report.changed]
        con.print(stats_table(rows, "name", "A | B"))
    if report.modules is not None and (by_module is not None or chart or not report.equal):
        depth = report.depth or 0  # set whenever there are modules
        modules_table(con, report.modules, depth)
        helps = len(report.modules) > 1 and any(m.rel_l2 for m in report.modules)
        if chart or (chart is None and helps and con.is_terminal):
            print_chart(con, report.modules, depth)
    _names_block(con, f"only in A: {a}", report.only_in_a)
    _names_block(con, f"only in B: {b}", report.only_in_b)
    print_skipped(con, report.skipped_a, f"not tensors, not compared, in A: {safe(a)}")
    print_skipped(con, report.skipped_b, f"not tensors, not compared, in B: {safe(b)}")
    if html is not None:
        con.print(f"wrote {safe(html)}", markup=False)
    return code
