"""Writing a surgery result and printing what was done: shared by tie, copy, untie, convert."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint, natural_key
from ._errors import emit_json
from .common import ByteProgress, cell, console, human_bytes, resolve_folder_output, resolve_output, safe, shape_text


def finish(
    command: str,
    ckpt_path: Path,
    result: Checkpoint,
    summary: dict,
    *,
    out: Path | None,
    force: bool,
    in_place: bool,
    dry_run: bool,
    json_out: bool,
    max_shard_size: int | str | None = None,
    sync: bool = True,
) -> int:
    """Write ``result`` (unless dry run) and report it; returns the exit code.

    With ``max_shard_size`` the output is a folder of shards plus an index; ``sync=False``
    (``--no-sync``) skips the fsyncs of the write.
    """
    if isinstance(max_shard_size, str):
        from ..formats.sharded_writer import parse_size

        max_shard_size = parse_size(max_shard_size)
    if max_shard_size is None:
        target = resolve_output(out, ckpt_path, result.input_files, force, in_place)
    else:
        target, replace = resolve_folder_output(out, ckpt_path, result.input_files, force, in_place)
    if not dry_run:
        with ByteProgress(result.total_bytes, f"writing {target.name}", enabled=not json_out) as bar:
            if max_shard_size is None:
                result.save(target, progress=bar.advance, sync=sync)
            else:
                summary = {
                    **summary,
                    "shards": result.save_sharded(
                        target, max_shard_size, replace=replace, progress=bar.advance, sync=sync
                    ),
                }
    if json_out:
        emit_json(
            {
                "schema": f"wsurgery.{command}/1",
                "output": str(target),
                "dry_run": dry_run,
                "stored": summary["stored"],
                "aliases": summary["aliases"],
                "copied": summary["copied"],
                "untied": summary.get("untied", []),
                "plan": summary.get("plan", []),
                **({"shards": summary["shards"]} if "shards" in summary else {}),
            }
        )
        return 0
    con = console()
    plan = summary.get("plan", [])
    if plan:
        from rich.table import Table

        notes = any(step.get("note") for step in plan)
        table = Table(title="plan" if dry_run else None, title_justify="left", box=None, pad_edge=False)
        for col in ("op", "destination", "from", "transform", "dtype", "shape", *(("note",) if notes else ())):
            table.add_column(col, overflow="fold")
        for step in plan:
            origin = f"{Path(step['checkpoint']).name}:" if step.get("checkpoint") else ""
            table.add_row(
                step["op"],
                cell(step["dst"] + ("" if step["op"] == "untie" else " (replaced)" if step["replaces"] else " (new)")),
                cell(origin + step["source"]),
                " -> ".join(step["transform"]) or "same",
                step["dtype"],
                shape_text(step["shape"]),
                *((cell(step.get("note") or ""),) if notes else ()),
            )
        con.print(table)
    verb = "would write" if dry_run else "wrote"
    n_alias = len(summary["aliases"])
    con.print(
        f"{verb} {safe(target)}: {summary['stored']} stored tensor{'s' if summary['stored'] != 1 else ''} "
        f"({human_bytes(result.total_bytes)}), {n_alias} alias{'es' if n_alias != 1 else ''}",
        markup=False,
    )
    for kind in ("copied", "untied"):
        if summary.get(kind):
            con.print(f"  {len(summary[kind])} {kind}", markup=False)
    for a in sorted(summary["aliases"], key=lambda a: natural_key(a["name"])):
        t = " -> ".join(a["transform"]) or "same"
        con.print(safe(f"  {a['name']} = {t}({a['source']})"), markup=False)
    return 0


def finish_plan(
    command: str, ckpt_path: Path, plan, output, force, in_place, dry_run, json_out, max_shard_size, *, sync=True
) -> int:
    """:func:`finish` for a surgery plan (tie, copy, untie)."""
    return finish(
        command,
        ckpt_path,
        plan.result,
        plan.summary(),
        out=output,
        force=force,
        in_place=in_place,
        dry_run=dry_run,
        json_out=json_out,
        max_shard_size=max_shard_size,
        sync=sync,
    )
