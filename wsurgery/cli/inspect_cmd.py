"""wsurgery inspect: list a checkpoint's tensors, aliases and metadata (headers only for safetensors)."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path

from ..checkpoint import Alias, Checkpoint, load
from ..dtypes import BY_NAME
from ._errors import command, emit_json
from .common import CkptArg, FilterOpt, JsonOpt, cell, console, human_bytes, markup_safe, safe, shape_text


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _rows(c: Checkpoint, pattern: str | None) -> list[dict]:
    rows = []
    for name in c.names():
        if pattern and not fnmatch.fnmatchcase(name, pattern):
            continue
        e = c.entry(name)
        alias_of = e.record() if isinstance(e, Alias) else None
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
                    t = " -> ".join(v["alias_of"]["transform"]) or "same"
                    extra = f"  [cyan]= {t}({markup_safe(v['alias_of']['source'])})[/cyan]"
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
    c = load(ckpt)
    rows = _rows(c, filter)
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
            }
        )
        return 0
    con = console()
    if tree:
        con.print(_tree(c, rows, ckpt))
    else:
        from rich.table import Table

        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("name", overflow="fold")
        table.add_column("dtype")
        table.add_column("shape")
        table.add_column("params", justify="right")
        table.add_column("bytes", justify="right")
        table.add_column("alias of")
        for r in rows:
            alias = ""
            if r["alias_of"]:
                alias = f"{' -> '.join(r['alias_of']['transform']) or 'same'}({r['alias_of']['source']})"
            table.add_row(
                cell(r["name"]),
                r["dtype"],
                shape_text(r["shape"]),
                f"{r['numel']:,}",
                human_bytes(r["nbytes"]) if not r["alias_of"] else "-",
                cell(alias),
            )
        con.print(table)
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
    return 0
