"""Where and how a checkpoint is written: the output-target rules, in one place.

The format is the one asked for, else the one the output's name says (``.pt``/``.pth``/
``.bin``/``.ckpt``: torch; anything else: safetensors); a name of one format with another
format asked for is a usage error. The formats themselves are the table of
:mod:`.registry`.

The output is a folder (weights, and the other files of a model-folder input carried
over, see :mod:`.hf`) when it is sharded, when it is an existing folder or a path ending
in a separator, or when the input is a folder and the output's name is no weights
file's. A DCP checkpoint (``dcp``) is always a folder of its own: DCP's files only,
nothing carried.

Every output is atomic: a file is written beside its target and renamed into place, a
folder is filled as a temporary folder and swapped in; an existing output needs
``overwrite``, an input of the checkpoint also ``in_place`` (:mod:`.destination`).

Under a process group (:class:`~.options.Collective` in the options) a folder is written
by every rank into one temporary folder (shards, or DCP files, split by bytes) and
renamed into place by rank 0 once every rank is done; a single file is written by rank 0
alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

from ..errors import UsageError
from ..model import Checkpoint, natural_key
from .options import SaveResult, WriteOptions
from .registry import DEFAULT, FORMATS


def format_of_name(path) -> str | None:
    """The format an output's name says (by its suffix), or None."""
    name = os.path.basename(os.fspath(path).rstrip("/" + os.sep)).lower()
    for fmt in FORMATS.values():
        if name.endswith(fmt.suffixes):
            return fmt.name
    return None


@dataclass(frozen=True)
class OutputPlan:
    """Where an output goes and in what form.

    Attributes:
        path: the file or folder.
        format: a key of :data:`FORMATS`.
        folder: the output is a folder (weights file or shards, and carried files; or a
            DCP checkpoint).
        max_shard_size: bytes per shard (a sharded folder), else None.
    """

    path: str
    format: str
    folder: bool
    max_shard_size: int | None = None

    @property
    def weights_file(self) -> str | None:
        """The one weights file of a folder output that is not sharded."""
        return FORMATS[self.format].model_file if self.folder and self.max_shard_size is None else None


def plan_output(
    path, *, format: str | None = None, max_shard_size: int | str | None = None, folder_input: bool = False
) -> OutputPlan:
    """Decide the output's format and shape; a ``UsageError`` when they conflict.

    Args:
        path: the output file or folder.
        format: ``"safetensors"``, ``"torch"``, ``"dcp"``, or None (from ``path``'s name).
        max_shard_size: shard the output into a folder (safetensors unless ``format``
            says torch).
        folder_input: the input is a folder: an output without a weights file's name is
            a folder too.

    Example:
        >>> plan_output("model.pt").format
        'torch'
    """
    path = os.fspath(path)
    named = format_of_name(path)
    if format is not None:
        key = str(format).strip().lower()
        if key not in FORMATS:
            raise UsageError(
                f"format {format!r} is not one of {', '.join(FORMATS)}", param="format", hint="choose one of them"
            )
        if named is not None and named != key and (max_shard_size is None or FORMATS[key].folder_format):
            hint = f"name the output *{FORMATS[key].suffix}, or leave the format to its name"
            if FORMATS[key].folder_format:
                hint = f"{key} is a folder: name it without a weights file's suffix"
            raise UsageError(
                f"format {key} does not match the output {path}, whose name says {named}", param="format", hint=hint
            )
    else:
        key = named or DEFAULT
    if isinstance(max_shard_size, str):
        from .sharded_writer import parse_size

        max_shard_size = parse_size(max_shard_size)
    if max_shard_size is not None and FORMATS[key].folder_format:
        raise UsageError(
            f"format {key} writes its own files (one per rank), never shards of a size",
            param="max_shard_size",
            hint="leave the shard size out, or write safetensors shards",
        )
    if max_shard_size is not None and format is None:
        key = DEFAULT  # a folder of shards is safetensors, whatever its name, unless asked
    folder = (
        max_shard_size is not None
        or FORMATS[key].folder_format
        or os.path.isdir(path)
        or path.endswith(("/", os.sep))
        or (folder_input and named is None)
    )
    return OutputPlan(path, key, folder, max_shard_size)


def save(ckpt: Checkpoint, target: str | os.PathLike[str] | OutputPlan, options: WriteOptions) -> SaveResult:
    """Write ``ckpt`` atomically at ``target`` (a path, or the :class:`OutputPlan` a
    caller already made with :func:`plan_output`: it is planned once per write).

    Raises:
        OutputError: the output exists, is an input, or cannot be written (nothing is
            left behind at the target).
        UsageError: the format is unknown or contradicts the target's name.
    """
    from .destination import check_file_target, check_folder_target, protected_inputs

    if isinstance(target, OutputPlan):
        plan = target
    else:
        plan = plan_output(
            target,
            format=options.format,
            max_shard_size=options.max_shard_size,
            folder_input=ckpt.model_folder is not None,
        )
    replace_input = options.in_place
    inputs = protected_inputs(ckpt)
    aliases = {n: ckpt.aliases[n].record() for n in sorted(ckpt.aliases, key=natural_key)}
    fmt = FORMATS[plan.format]
    extra: dict = {}
    stored, nbytes = len(ckpt.stored), ckpt.total_bytes
    if plan.folder:
        exists = check_folder_target(plan.path, inputs, overwrite=options.overwrite, replace_input=replace_input)
        extra = _write_folder(ckpt, plan, options, replace=exists)
        if fmt.folder_format:  # no aliases: each is a tensor of its own
            aliases, stored = {}, stored + len(ckpt.aliases)
            nbytes += sum(a.nbytes for a in ckpt.aliases.values())
        else:  # those from_pretrained would not restore
            values = set(extra.get("aliases_as_values", ()))
            aliases = {n: r for n, r in aliases.items() if n not in values}
            stored += len(values)
            nbytes += sum(ckpt.aliases[n].nbytes for n in values)
    else:
        check_file_target(plan.path, inputs, overwrite=options.overwrite, replace_input=replace_input)
        write = fmt.write
        assert write is not None
        notes: list[str] = []
        extra["notes"] = notes

        def write_file() -> list[str]:
            return write(ckpt, plan.path, options, notes=notes)

        group = options.collective
        extra["dropped_metadata"] = write_file() if group is None else group.first_writes(write_file)
    return SaveResult(os.fspath(plan.path), stored, nbytes, aliases, format=plan.format, **extra)


def _write_folder(ckpt: Checkpoint, plan: OutputPlan, options: WriteOptions, *, replace: bool) -> dict:
    """Weights (one file, shards or a DCP checkpoint) and the input folder's other files,
    as one folder; under a process group, written by every rank (see the module docstring)."""
    from .hf import carry
    from .hf_contract import for_folder_output
    from .in_place import in_place_folder, is_in_place, old_weights
    from .sharded_writer import atomic_folder

    fmt = FORMATS[plan.format]
    source = None if fmt.folder_format else ckpt.model_folder
    config_bytes = None
    change: dict = {}
    out: dict = {"notes": []}
    if source is not None and source.config is not None:  # the contract with from_pretrained
        ready = for_folder_output(
            ckpt, source.config, safetensors=plan.format == "safetensors", keep_aliases=options.keep_aliases
        )
        ckpt, config_bytes, change = ready.ckpt, ready.config_bytes, ready.changes
        out["notes"].extend(ready.notes)
        out["aliases_as_values"] = ready.as_values
    group = options.collective
    first = group is None or group.is_first
    shared = atomic_folder if group is None else group.shared_folder
    in_place = group is None and replace and is_in_place(plan.path, source)
    if in_place and source is not None:  # only the weights, their index and config.json are replaced
        old = old_weights(source.path, ckpt.input_files, source.weights)
        shared = functools.partial(in_place_folder, old=old, notes=out["notes"])
    with shared(plan.path, replace=replace, sync=options.sync) as tmp:
        if fmt.folder_format:
            assert fmt.write is not None
            dropped, as_values = fmt.write(ckpt, tmp, options, group, os.fspath(plan.path))
            out["dropped_metadata"] = dropped
            out["aliases_as_values"] = as_values
        elif plan.max_shard_size is not None:
            assert fmt.write_shards is not None
            out["shards"] = fmt.write_shards(ckpt, tmp, plan.max_shard_size, options, group)
            out["dropped_metadata"] = [] if fmt.name == DEFAULT else sorted(k for k in ckpt.metadata if k != "format")
        elif first:
            assert fmt.write is not None and fmt.model_file is not None
            flat = dataclasses.replace(options, flat=True)  # a model folder's torch file is a state dict
            out["dropped_metadata"] = fmt.write(ckpt, os.path.join(tmp, fmt.model_file), flat)
        if source is not None and first:
            out["files"] = carry(source, tmp, config=config_bytes, sync=options.sync, in_place=in_place)
            out["config"] = change
    return out if group is None else group.exchange("saved", out)[0]
