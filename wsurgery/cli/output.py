"""Writing a command's result and telling what was done: the one path of tie, copy, untie
and convert."""

from __future__ import annotations

import os
from pathlib import Path

from ..io.options import Note, SaveResult
from ..model import Checkpoint, natural_key
from ._errors import emit_json, note_text
from .common import ByteProgress, console, default_output, human_bytes, print_skipped, print_table, safe, shape_text
from .options import OutputOptions


def summary(result: Checkpoint) -> dict:
    """What the result holds and how it came to be: :func:`wsurgery.inspection.plan_summary`."""
    from ..inspection import plan_summary

    return plan_summary(result)


def _target(ckpt_path: Path, out: OutputOptions) -> str:
    """``-o`` (a final separator kept: a folder); else with ``--in-place`` the input itself
    (a file, or a folder read as a whole); else a name beside the input
    (``<input>.safetensors``, ``.pt`` for torch)."""
    p = Path(ckpt_path)
    if out.output is not None:
        return f"{out.output}{os.sep}" if out.output_folder else str(out.output)
    return str(_default_target(p, out))


def _default_target(p: Path, out: OutputOptions) -> Path:
    from ..io.registry import FORMATS

    if out.in_place and (p.is_dir() or (out.max_shard_size is None and not p.name.endswith(".index.json"))):
        return p
    if out.max_shard_size is not None:
        return p.with_name(p.name.split(".")[0] + "-sharded")
    fmt = FORMATS.get(str(out.format).lower()) if out.format else None
    if fmt is not None and fmt.folder_format:  # a DCP folder: <input stem>-dcp
        return p.with_name(p.name.split(".")[0] + fmt.suffix)
    return default_output(p, fmt.suffix if fmt else ".safetensors")


_MAKES = frozenset({"tie", "copy", "concat", "split", "stack", "unstack"})  # steps that may make a new name


def _plan_table(con, ops, dry_run: bool) -> None:
    notes = any(op.note for op in ops)
    headers = ["op", "destination", "from", "transform", "dtype", "shape", *(["note"] if notes else [])]
    rows = []
    for op in ops:
        origin = f"{Path(op.origin).name}:" if op.origin else ""
        source = op.src if op.kind == "rename" else op.base  # a rename comes from its old name
        state = (" (replaced)" if op.replaces else " (new)") if op.kind in _MAKES else ""
        v = op.value
        rows.append(
            [
                op.kind,
                op.dst + state,
                origin + source,
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
    from ..api import save
    from ..io.options import WriteOptions

    target = _target(ckpt_path, out)
    plan = _plan(target, result, out, out.format)
    saved = None
    if not out.dry_run:
        name = os.path.basename(target.rstrip(os.sep))
        with ByteProgress(result.total_bytes, f"writing {name}", enabled=not (out.json or out.quiet)) as bar:
            options = WriteOptions(
                format=plan.format,
                max_shard_size=plan.max_shard_size,
                overwrite=out.force,
                in_place=out.in_place,
                sync=out.sync,
                keep_aliases=out.keep_aliases,
                flat=out.flat,
                progress=bar.advance,
            )
            saved = save(result, plan, options)
    return report_write(command, target, result, saved, out, extra, plan=plan)


def _plan(target: str, result: Checkpoint, out: OutputOptions, fmt: str | None):
    from ..io.sharded_writer import parse_size
    from ..io.targets import plan_output

    shard_size = None if out.max_shard_size is None else parse_size(out.max_shard_size)
    return plan_output(target, format=fmt, max_shard_size=shard_size, folder_input=result.model_folder is not None)


def report_write(
    command: str,
    target: str,
    result: Checkpoint,
    saved: SaveResult | None,
    out: OutputOptions,
    extra: dict | None = None,
    *,
    plan=None,
) -> int:
    """Tell what a write did (or, on a dry run, would do): the JSON object, nothing with
    ``--quiet``, else the plan table and a summary. The exit code. ``plan``: the output
    plan the write used (made here from ``saved`` when the library wrote on its own)."""
    if plan is None:
        plan = _plan(target, result, out, saved.format if saved is not None else out.format)
    folder = plan.folder or (saved is not None and saved.shards is not None)
    would: dict = {}
    if saved is None:  # a dry run: what the write would store, not the plan's aliases
        result, would = _as_written(result, plan, out)
    info = summary(result)
    left_out = _left_out(result, saved)
    if out.json:
        head = {"output": target, "format": plan.format, "folder": folder, "dry_run": out.dry_run}
        written = dict(would) if saved is None else {k: v for k, v in saved.to_dict().items() if k != "output"}
        if "notes" in written:
            written["notes"] = [note_text(n) for n in written["notes"]]
        if left_out is not None:
            written["skipped"] = left_out
        emit_json({"schema": f"wsurgery.{command}/1", **head, **info, **written, **(extra or {})})
        return 0
    if out.quiet:
        return 0
    written = dict(would) if saved is None else saved.to_dict()
    con = console()
    if result.changes:
        _plan_table(con, result.changes, out.dry_run)
    verb = "would write" if out.dry_run else "wrote"
    # what was written (a tie may have gone out as values), else what the plan holds
    stored = info["stored"] if saved is None else saved.stored
    aliases = [a["name"] for a in info["aliases"]] if saved is None else list(saved.aliases)
    nbytes = result.total_bytes if saved is None else saved.nbytes
    sharded = saved is not None and saved.shards is not None
    kind = "" if plan.format == "safetensors" and not folder else f" ({_kind(plan, sharded)})"
    con.print(
        f"{verb} {safe(target)}{kind}: {stored} stored tensor{'s' if stored != 1 else ''} "
        f"({human_bytes(nbytes)}), {len(aliases)} alias{'es' if len(aliases) != 1 else ''}",
        markup=False,
    )
    if out.dry_run and plan.folder:
        from ..io.in_place import describe_in_place

        text = describe_in_place(target, result)
        if text:
            con.print(safe(f"  {text}"), markup=False)
    _print_written(con, {**written, "format": plan.format}, result)
    for kind in ("copied", "untied"):
        if info[kind]:
            con.print(f"  {len(info[kind])} {kind}", markup=False)
    for name in sorted(aliases, key=natural_key):
        a = result.aliases[name]
        con.print(safe(f"  {name} = {a.transform}({a.source})"), markup=False)
    if left_out is not None:
        print_skipped(con, left_out, "left out (not tensors)", shown=3)
    elif plan.format == "torch" and not out.flat:  # a dry run: the structure the write keeps is not known yet
        print_skipped(con, result.skipped, "not tensors (kept where the input's structure carries them)", shown=3)
    else:
        print_skipped(con, result.skipped, "left out (not tensors)", shown=3)
    return 0


def _as_written(result: Checkpoint, plan, out: OutputOptions) -> tuple[Checkpoint, dict]:
    """A dry run's checkpoint as its write would store it, and what that write would
    report: a model-folder output stores the ties ``from_pretrained`` does not restore as
    values (unless ``--keep-aliases``) and makes its config true to the weights."""
    from ..io.hf_contract import for_folder_output
    from ..io.registry import FORMATS

    source = result.model_folder
    if not plan.folder or FORMATS[plan.format].folder_format or source is None or source.config is None:
        return result, {}
    ready = for_folder_output(
        result, source.config, safetensors=plan.format == "safetensors", keep_aliases=out.keep_aliases
    )
    return ready.ckpt, {"notes": list(ready.notes), "aliases_as_values": list(ready.as_values)}


def _left_out(result: Checkpoint, saved: SaveResult | None) -> list[str] | None:
    """The entries of the input that are not tensors and that the output does not hold:
    for a torch file that kept its input's structure, what the structure could not carry
    (its note says); else every one (a flat or safetensors/DCP output holds tensors
    only). None on a dry run."""
    if saved is None:
        return None
    for note in saved.notes:
        if isinstance(note, Note) and note.kind == "structure":
            return list(note.entries)
    return list(result.skipped)


def _kind(plan, sharded: bool = False) -> str:
    from ..io.registry import FORMATS

    if FORMATS[plan.format].folder_format:
        return f"a {plan.format.upper()} folder"
    if plan.max_shard_size is not None or sharded:
        return f"a folder of {plan.format} shards"
    if not plan.folder:
        return plan.format
    return f"a folder with {plan.weights_file}"


def _print_written(con, extra: dict, result: Checkpoint) -> None:
    if extra.get("files") is not None:
        files = extra["files"]
        con.print(safe(f"  carried over: {', '.join(files) if files else 'no other files'}"), markup=False)
        left = result.model_folder.left if result.model_folder is not None else []
        if left:
            con.print(safe(f"  not carried (not files of the model folder): {', '.join(left)}"), markup=False)
    for note in extra.get("notes") or ():
        con.print(safe(f"  {note_text(note)}"), markup=False)
    holder = "a DCP checkpoint" if extra.get("format") == "dcp" else "a torch file"
    if extra.get("dropped_metadata"):
        con.print(
            safe(f"  metadata not kept ({holder} holds tensors only): " + ", ".join(extra["dropped_metadata"])),
            markup=False,
        )
    if extra.get("aliases_as_values") and extra.get("format") == "dcp":
        names = ", ".join(extra["aliases_as_values"])
        con.print(safe(f"  ties written as values (a DCP checkpoint has no aliases): {names}"), markup=False)
