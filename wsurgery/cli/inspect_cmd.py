"""wsurgery inspect: list a checkpoint's tensors, aliases and metadata (headers only for safetensors).

The library describes (:func:`wsurgery.inspection.inspect`); this module renders.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import command, emit_json
from .common import CkptArg, FilterOpt, JsonOpt, console, human_bytes, print_skipped, print_table, safe, shape_text

if TYPE_CHECKING:
    from ..inspection import Inspection, TensorInfo


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


class _Folder:
    """A module in the tree: its children (sub-modules and tensors, in name order, kept
    apart even when a tensor and a module share a name) and its parameter count."""

    __slots__ = ("children", "params")

    def __init__(self) -> None:
        self.children: dict[tuple[bool, str], _Folder | TensorInfo] = {}  # (is a folder, key) -> child
        self.params = 0


def _tree_lines(rows: list[TensorInfo], path: Path) -> list[str]:
    """The module tree as text lines, built and drawn in time linear in the names."""
    root = _Folder()
    for row in rows:
        node = root
        parts = row.name.split(".")
        own = 0 if row.alias_of else row.numel
        node.params += own
        for part in parts[:-1]:
            child = node.children.get((True, part))
            if not isinstance(child, _Folder):
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
        (_, key), v = item
        last = seen + 1 == size
        stack.append((it, size, seen + 1, indent))
        branch = indent + ("└── " if last else "├── ")
        if isinstance(v, _Folder):
            lines.append(f"{branch}{text(key)}  {v.params:,} params")
            stack.append((iter(v.children.items()), len(v.children), 0, indent + ("    " if last else "│   ")))
            continue
        dims = shapes.get(v.shape)
        if dims is None:
            dims = shapes[v.shape] = shape_text(v.shape)
        line = f"{branch}{text(key)}  {v.dtype} {dims}"
        if v.alias_of:
            line += f"  = {safe(v.alias_text)}"
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
    from ..inspection import inspect as describe

    found = describe(ckpt, filter=filter)
    if json_out:
        emit_json({"schema": "wsurgery.inspect/1", **found.to_dict()})
    elif found.ranks is not None:
        _print_ranks(found, ckpt)
    else:
        _print(found, ckpt, tree)
    return 0


def _print_lines(con, lines: list[str]) -> None:
    """Plain lines, as they are (already escaped): one write, never wrapped or cut."""
    con.file.write("\n".join(lines) + "\n")


def _print_ranks(found: Inspection, ckpt: Path) -> None:
    ranks = found.ranks or []
    con = console()
    print_table(con, ["rank", "member"], [[r["rank"], r["member"]] for r in ranks])
    con.print(f"nemo: a model-parallel archive of {_plural(len(ranks), 'rank')}", markup=False)
    _print_metadata(con, found.metadata)
    con.print(safe(f"wsurgery reads one rank at a time: wsurgery inspect {ckpt}/{ranks[0]['rank']}"), markup=False)


_BLOCK_LINES = 40


def _print_metadata(con, metadata: dict[str, str]) -> None:
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


def _print(found: Inspection, ckpt: Path, tree: bool) -> None:
    from . import model_folder

    con = console()
    rows = found.tensors
    if tree:
        _print_lines(con, _tree_lines(rows, ckpt))
    else:
        table = [
            [
                r.name,
                r.dtype,
                shape_text(r.shape),
                f"{r.numel:,}",
                human_bytes(r.nbytes) if not r.alias_of else "-",
                r.alias_text,
            ]
            for r in rows
        ]
        print_table(con, ["name", "dtype", "shape", "params", "bytes", "alias of"], table, right=("params", "bytes"))
    n_alias = found.aliases
    con.print(
        f"{found.format}: {_plural(len(rows) - n_alias, 'stored tensor')}, {_plural(n_alias, 'alias', 'aliases')}, "
        f"{found.total_params:,} params, {human_bytes(found.total_bytes)}"
        + (f" (of {found.names:,} names, filter {found.filter!r})" if found.filter is not None else ""),
        markup=False,
    )
    for dtype, t in found.dtypes.items():
        con.print(
            f"  {dtype}: {_plural(t.tensors, 'tensor')}, {t.params:,} params, {human_bytes(t.nbytes)}", markup=False
        )
    if found.metadata:
        _print_metadata(con, found.metadata)
    if found.container:
        con.print(
            safe(f"state dict: the entry {found.container!r} of the file (the others are not weights)"), markup=False
        )
    print_skipped(con, found.skipped, "skipped (not tensors)")
    model_folder.print_report(con, found)
