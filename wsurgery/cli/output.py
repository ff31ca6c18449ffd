"""Writing a command's result and telling what was done: the one path of tie, copy, untie
and convert."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint, natural_key
from ._errors import emit_json
from .common import ByteProgress, console, default_output, human_bytes, print_table, safe, shape_text
from .options import OutputOptions


def summary(result: Checkpoint) -> dict:
    """What the result holds and how it came to be (its ``changes``), as JSON-ready lists."""
    ops = result.changes
    return {
        "stored": len(result.stored),
        "aliases": [{"name": n, **result.aliases[n].record()} for n in sorted(result.aliases, key=natural_key)],
        "copied": [
            {"src": op.src, "dst": op.dst, "source": op.base, "from": op.origin, "transform": op.value.specs}
            for op in ops
            if op.kind == "copy"
        ],
        "untied": [
            {"name": op.dst, "source": op.base, "transform": op.value.specs} for op in ops if op.kind == "untie"
        ],
        "plan": [op.describe() for op in ops],
    }


def _target(ckpt_path: Path, out: OutputOptions) -> Path:
    if out.output is not None:
        return Path(out.output)
    if out.max_shard_size is not None:
        p = Path(ckpt_path)
        return p.with_name(p.name.split(".")[0] + "-sharded")
    return default_output(ckpt_path)


_MAKES = frozenset({"tie", "copy", "concat", "split", "stack", "unstack"})  # steps that may make a new name


def _plan_table(con, ops, dry_run: bool) -> None:
    notes = any(op.note for op in ops)
    headers = ["op", "destination", "from", "transform", "dtype", "shape", *(["note"] if notes else [])]
    rows = []
    for op in ops:
        origin = f"{Path(op.origin).name}:" if op.origin else ""
        state = (" (replaced)" if op.replaces else " (new)") if op.kind in _MAKES else ""
        v = op.value
        rows.append(
            [
                op.kind,
                op.dst + state,
                origin + op.base,
                op.how,
                "-" if v is None else v.dtype,
                "-" if v is None else shape_text(v.shape),
                *([op.note] if notes else []),
            ]
        )
    print_table(con, headers, rows, title="plan" if dry_run else None)


def write_result(
    command: str, ckpt_path: Path, result: Checkpoint, out: OutputOptions, extra: dict | None = None
) -> int:
    """Write ``result`` as ``out`` says (nothing on a dry run) and report it; the exit code.
    ``extra``: the command's own keys for its JSON object."""
    from ..formats.sharded_writer import parse_size

    target = _target(ckpt_path, out)
    shard_size = None if out.max_shard_size is None else parse_size(out.max_shard_size)
    info = summary(result)
    shards = None
    if not out.dry_run:
        with ByteProgress(result.total_bytes, f"writing {target.name}", enabled=not out.json) as bar:
            saved = result.save(
                target,
                overwrite=out.force,
                replace_input=out.in_place,
                max_shard_size=shard_size,
                progress=bar.advance,
                sync=out.sync,
            )
        shards = saved.shards
    if out.json:
        emit_json(
            {
                "schema": f"wsurgery.{command}/1",
                "output": str(target),
                "dry_run": out.dry_run,
                **info,
                **({"shards": shards} if shards is not None else {}),
                **(extra or {}),
            }
        )
        return 0
    con = console()
    if result.changes:
        _plan_table(con, result.changes, out.dry_run)
    verb = "would write" if out.dry_run else "wrote"
    n_alias = len(info["aliases"])
    con.print(
        f"{verb} {safe(target)}: {info['stored']} stored tensor{'s' if info['stored'] != 1 else ''} "
        f"({human_bytes(result.total_bytes)}), {n_alias} alias{'es' if n_alias != 1 else ''}",
        markup=False,
    )
    for kind in ("copied", "untied"):
        if info[kind]:
            con.print(f"  {len(info[kind])} {kind}", markup=False)
    for name in sorted(result.aliases, key=natural_key):
        a = result.aliases[name]
        con.print(safe(f"  {name} = {a.transform}({a.source})"), markup=False)
    return 0
