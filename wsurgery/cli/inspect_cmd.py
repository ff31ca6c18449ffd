"""wsurgery inspect: list a checkpoint's tensors, aliases and metadata (headers only for safetensors)."""

from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path

from ..dtypes import BY_NAME
from ..errors import UsageError
from ..model import Checkpoint
from ._errors import command, emit_json
from .common import CkptArg, FilterOpt, JsonOpt, console, human_bytes, print_skipped, print_table, safe, shape_text


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _rows(c: Checkpoint, pattern: str | None) -> list[dict]:
    """One row per shown name, in order: a few dict lookups each (a million names are fine)."""
    names = c.names()
    if pattern:
        match = re.compile(fnmatch.translate(pattern)).match
        names = [n for n in names if match(n)]
    stored, aliases = c.stored, c.aliases
    itemsize = {d: t.itemsize for d, t in BY_NAME.items()}
    rows = []
    for name in names:
        e = stored.get(name)
        alias_of = None
        if e is None:
            e = aliases[name]
            alias_of = e.record()
        numel = math.prod(e.shape)
        rows.append(
            {
                "name": name,
                "dtype": e.dtype,
                "shape": list(e.shape),
                "numel": numel,
                "nbytes": numel * itemsize[e.dtype],
                "alias_of": alias_of,
            }
        )
    return rows


class _Folder:
    """A module in the tree: its children (sub-modules and tensors, in name order, kept
    apart even when a tensor and a module share a name) and its parameter count."""

    __slots__ = ("children", "params")

    def __init__(self):
        self.children: dict[tuple[bool, str], _Folder | dict] = {}  # (is a folder, key) -> child
        self.params = 0


def _tree_lines(c: Checkpoint, rows: list[dict], path: Path) -> list[str]:
    """The module tree as text lines, built and drawn in time linear in the names."""
    root = _Folder()
    for row in rows:
        node = root
        parts = row["name"].split(".")
        own = 0 if row["alias_of"] else row["numel"]
        node.params += own
        for part in parts[:-1]:
            child = node.children.get((True, part))
            if child is None:
                child = node.children[(True, part)] = _Folder()
            node = child
            node.params += own
        node.children[(False, parts[-1])] = row
    shown: dict[str, str] = {}  # keys repeat (weight, bias, 0, 1, ...): escape each once
    shapes: dict[tuple, str] = {}

    def text(key: str) -> str:
        out = shown.get(key)
        if out is None:
            out = shown[key] = safe(key)
        return out

    lines = [f"{safe(path)}  {root.params:,} params"]
    stack = [(iter(root.children.items()), len(root.children), 0, "")]
    while stack:
        it, size, seen, indent = stack.pop()
        item = next(it, None)
        if item is None:
            continue
        (is_folder, key), v = item
        last = seen + 1 == size
        stack.append((it, size, seen + 1, indent))
        branch = indent + ("└── " if last else "├── ")
        if is_folder:
            lines.append(f"{branch}{text(key)}  {v.params:,} params")
            stack.append((iter(v.children.items()), len(v.children), 0, indent + ("    " if last else "│   ")))
            continue
        shape = tuple(v["shape"])
        dims = shapes.get(shape)
        if dims is None:
            dims = shapes[shape] = shape_text(shape)
        line = f"{branch}{text(key)}  {v['dtype']} {dims}"
        if v["alias_of"]:
            line += f"  = {safe(_alias_text(c, v['name']))}"
        lines.append(line)
    return lines


@command("inspect")
def inspect(
    ckpt: CkptArg,
    tree: bool = False,
    filter: FilterOpt = None,  # noqa: A002
    json_out: JsonOpt = False,
) -> int:
    """List tensors (name, dtype, shape, parameters, bytes, alias of), totals and metadata.

    Reads only headers for safetensors, so it is instant whatever the size.

    Example: wsurgery inspect model.safetensors --tree
    """
    from ..api import open as open_checkpoint
    from ..io.layouts import ModelParallelArchiveError

    try:
        c = open_checkpoint(ckpt)
    except ModelParallelArchiveError as exc:  # a .nemo of several ranks: list them
        _report_ranks(exc, ckpt, json_out)
        return 0
    with c:
        _report(c, ckpt, tree, filter, json_out)
    return 0


def _print_lines(con, lines: list[str]) -> None:
    """Plain lines, as they are (already escaped): one write, never wrapped or cut."""
    con.file.write("\n".join(lines) + "\n")


def _report_ranks(exc, ckpt: Path, json_out: bool) -> None:
    metadata = {"nemo.ranks": ", ".join(exc.ranks)}
    if exc.config is not None:
        metadata["nemo.model_config"] = exc.config
    if json_out:
        emit_json(
            {
                "schema": "wsurgery.inspect/1",
                "path": str(ckpt),
                "format": "nemo",
                "tensors": [],
                "total_params": 0,
                "total_bytes": 0,
                "metadata": metadata,
                "skipped": [],
                "ranks": [{"rank": r, "member": m} for r, m in zip(exc.ranks, exc.members, strict=True)],
            }
        )
        return
    con = console()
    print_table(con, ["rank", "member"], [[r, m] for r, m in zip(exc.ranks, exc.members, strict=True)])
    con.print(f"nemo: a model-parallel archive of {_plural(len(exc.ranks), 'rank')}", markup=False)
    _print_metadata(con, metadata)
    con.print(safe(f"wsurgery reads one rank at a time: wsurgery inspect {ckpt}/{exc.ranks[0]}"), markup=False)


_BLOCK_LINES = 40


def _print_metadata(con, metadata: dict) -> None:
    """One line of ``key=value``; values of several lines (a model config) as blocks after it."""
    short = {k: v for k, v in sorted(metadata.items()) if "\n" not in v}
    if short:
        con.print("metadata: " + safe(", ".join(f"{k}={v}" for k, v in short.items())), markup=False)
    for key, value in sorted(metadata.items()):
        if key in short:
            continue
        lines = value.rstrip("\n").split("\n")
        con.print(safe(f"{key}:"), markup=False)
        for line in lines[:_BLOCK_LINES]:
            con.print("  " + safe(line), markup=False)
        if len(lines) > _BLOCK_LINES:
            con.print(f"  ... {len(lines) - _BLOCK_LINES} more lines (--json shows all)", markup=False)


def _alias_text(c: Checkpoint, name: str) -> str:
    a = c.aliases.get(name)
    return "" if a is None else f"{a.transform}({a.source})"


def _report(c: Checkpoint, ckpt: Path, tree: bool, pattern: str | None, json_out: bool) -> None:
    from . import model_folder

    rows = _rows(c, pattern)
    if pattern is not None and not rows:
        raise UsageError(f"filter {pattern!r} matches no tensor in {ckpt}", param="filter", hint="check the glob")
    shown = [c.stored[r["name"]] for r in rows if r["name"] in c.stored]  # the totals are of what is shown
    n_alias = len(rows) - len(shown)
    total_params = sum(s.numel for s in shown)
    total_bytes = sum(s.nbytes for s in shown)
    folder = model_folder.tie_report(c)
    if json_out:
        emit_json(
            {
                "schema": "wsurgery.inspect/1",
                "path": str(ckpt),
                "format": c.format,
                "tensors": [{k: r[k] for k in ("name", "dtype", "shape", "nbytes", "alias_of")} for r in rows],
                "total_params": total_params,
                "total_bytes": total_bytes,
                "metadata": dict(sorted(c.metadata.items())),
                "skipped": list(c.skipped),
                "container": c.container,
                **model_folder.json_keys(c, folder),
            }
        )
        return
    con = console()
    if tree:
        _print_lines(con, _tree_lines(c, rows, ckpt))
    else:
        table = [
            [
                r["name"],
                r["dtype"],
                shape_text(r["shape"]),
                f"{r['numel']:,}",
                human_bytes(r["nbytes"]) if not r["alias_of"] else "-",
                _alias_text(c, r["name"]),
            ]
            for r in rows
        ]
        print_table(con, ["name", "dtype", "shape", "params", "bytes", "alias of"], table, right=("params", "bytes"))
    per_dtype: dict[str, list[int]] = {}
    for s in shown:
        acc = per_dtype.setdefault(s.dtype, [0, 0, 0])
        acc[0] += 1
        acc[1] += s.numel
        acc[2] += s.nbytes
    con.print(
        f"{c.format}: {_plural(len(shown), 'stored tensor')}, {_plural(n_alias, 'alias', 'aliases')}, "
        f"{total_params:,} params, {human_bytes(total_bytes)}"
        + (f" (of {len(c):,} names, filter {pattern!r})" if pattern else ""),
        markup=False,
    )
    for dtype, (n, numel, nbytes) in sorted(per_dtype.items()):
        con.print(f"  {dtype}: {_plural(n, 'tensor')}, {numel:,} params, {human_bytes(nbytes)}", markup=False)
    if c.metadata:
        _print_metadata(con, c.metadata)
    if c.container:
        con.print(safe(f"state dict: the entry {c.container!r} of the file (the others are not weights)"), markup=False)
    print_skipped(con, c.skipped, "skipped (not tensors)")
    model_folder.print_report(con, c, folder)
