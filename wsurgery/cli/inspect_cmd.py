"""wsurgery inspect: list a checkpoint's tensors, aliases and metadata (headers only for safetensors)."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path

from ..checkpoint import Checkpoint, Derived
from ..dtypes import BY_NAME
from ._errors import command, emit_json
from .common import CkptArg, FilterOpt, JsonOpt, console, human_bytes, markup_safe, print_table, safe, shape_text


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _rows(c: Checkpoint, pattern: str | None) -> list[dict]:
    rows = []
    for name in c.names():
        if pattern and not fnmatch.fnmatchcase(name, pattern):
            continue
        e = c.entry(name)
        alias_of = e.record() if isinstance(e, Derived) else None
        numel = math.prod(e.shape)
        nbytes = numel * BY_NAME[e.dtype].itemsize
        rows.append(
            {
                "name": name,
                "dtype": e.dtype,
                "shape": list(e.shape),
                "numel": numel,
                "nbytes": nbytes,
                "alias_of": alias_of,
            }
        )
    return rows


def _tree(c: Checkpoint, rows: list[dict], path: Path):
    from rich.tree import Tree

    root: dict = {}
    for row in rows:
        node = root
        parts = row["name"].split(".")
        for part in parts[:-1]:
            node = node.setdefault(part + ".", {})
        node[parts[-1]] = row

    def count(node) -> int:
        total = 0
        for v in node.values():
            if isinstance(v, dict) and "name" not in v:
                total += count(v)
            elif v["alias_of"] is None:
                total += v["numel"]
        return total

    def build(tree, node):
        for key, v in node.items():
            if isinstance(v, dict) and "name" not in v:
                branch = tree.add(f"[bold]{markup_safe(key[:-1])}[/bold]  {count(v):,} params")
                build(branch, v)
            else:
                extra = ""
                if v["alias_of"]:
                    extra = f"  [cyan]= {markup_safe(_alias_text(c, v['name']))}[/cyan]"
                tree.add(f"{markup_safe(key)}  {v['dtype']} {shape_text(v['shape'])}{extra}")

    tree = Tree(f"[bold]{markup_safe(path)}[/bold]  {count(root):,} params")
    build(tree, root)
    return tree


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

    with open_checkpoint(ckpt) as c:
        _report(c, ckpt, tree, filter, json_out)
    return 0


def _alias_text(c: Checkpoint, name: str) -> str:
    a = c.aliases.get(name)
    return "" if a is None else f"{a.transform}({a.source})"


def _report(c: Checkpoint, ckpt: Path, tree: bool, pattern: str | None, json_out: bool) -> None:
    from . import model_folder

    rows = _rows(c, pattern)
    folder = model_folder.tie_report(c)
    if json_out:
        emit_json(
            {
                "schema": "wsurgery.inspect/1",
                "path": str(ckpt),
                "format": c.format,
                "tensors": [{k: r[k] for k in ("name", "dtype", "shape", "nbytes", "alias_of")} for r in rows],
                "total_params": c.total_params,
                "total_bytes": c.total_bytes,
                "metadata": dict(sorted(c.metadata.items())),
                "skipped": list(c.skipped),
                **model_folder.json_keys(c, folder),
            }
        )
        return
    con = console()
    if tree:
        con.print(_tree(c, rows, ckpt))
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
    for s in c.stored.values():
        acc = per_dtype.setdefault(s.dtype, [0, 0, 0])
        acc[0] += 1
        acc[1] += s.numel
        acc[2] += s.nbytes
    con.print(
        f"{c.format}: {_plural(len(c.stored), 'stored tensor')}, {_plural(len(c.aliases), 'alias', 'aliases')}, "
        f"{c.total_params:,} params, {human_bytes(c.total_bytes)}",
        markup=False,
    )
    for dtype, (n, numel, nbytes) in sorted(per_dtype.items()):
        con.print(f"  {dtype}: {_plural(n, 'tensor')}, {numel:,} params, {human_bytes(nbytes)}", markup=False)
    if c.metadata:
        con.print("metadata: " + safe(", ".join(f"{k}={v}" for k, v in sorted(c.metadata.items()))), markup=False)
    if c.skipped:
        con.print(
            f"skipped (not tensors): {len(c.skipped)}: "
            + safe("; ".join(c.skipped[:10]))
            + (" ..." if len(c.skipped) > 10 else ""),
            markup=False,
        )
    model_folder.print_report(con, c, folder)
