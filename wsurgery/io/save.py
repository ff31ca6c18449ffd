"""Where and how a checkpoint is written.

The output formats are a table (:data:`FORMATS`), one entry each: the names that mean
it, the weights file it writes inside a model folder, whether it shards, and its writer.
Adding a format is adding an entry. The format is the one asked for, else the one the
output's name says (``.pt``/``.pth``/``.bin``/``.ckpt``: torch; anything else:
safetensors); a name of one format with another format asked for is a usage error.

The output is a folder (weights, and the other files of a model-folder input carried
over, see :mod:`wsurgery.io.hf`) when it is sharded, when it is an existing folder
or a path ending in a separator, or when the input is a folder and the output's name is
no weights file's. A DCP checkpoint (``dcp``) is always a folder of its own: DCP's
files only, nothing carried.

Under a process group of several ranks (:mod:`wsurgery.distributed`) a folder is written
by every rank into one temporary folder (shards, or DCP files, split by bytes) and
renamed into place by rank 0 once every rank is done; a single file is written by rank 0
alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import distributed
from ..errors import OutputError, UsageError

if TYPE_CHECKING:
    from ..model import Checkpoint, SaveResult


def _write_safetensors(ckpt: Checkpoint, path: str, *, progress=None, sync: bool = True) -> list[str]:
    ckpt._save_file(path, progress=progress, sync=sync)
    return []


def _write_torch(ckpt: Checkpoint, path: str, *, progress=None, sync: bool = True) -> list[str]:
    from .torch_writer import write_torch

    storages, tensors = torch_layout(ckpt)
    write_torch(path, storages, tensors, progress, sync=sync)
    return dropped_metadata(ckpt)


def _write_dcp(ckpt: Checkpoint, folder: str, *, progress=None, sync: bool = True, final: str | None = None):
    """A DCP checkpoint in ``folder``; returns ``(dropped metadata, aliases written as values)``."""
    from .dcp_writer import write_dcp

    items, as_values = dcp_items(ckpt)
    s = distributed.current()
    if s is not None:
        owner = distributed.split_by_bytes([i.nbytes for i in items], s.world_size)
        items = [i for i, o in zip(items, owner, strict=True) if o == s.rank]
        s.exchange("dcp")  # every rank is ready: DCP's own collectives follow
    write_dcp(folder, items, checkpoint_id=final or folder, sync=sync, progress=progress, distributed=s is not None)
    return dropped_metadata(ckpt), as_values


def dcp_items(ckpt: Checkpoint):
    """Every name of ``ckpt`` as a DCP state dict item, in natural order: DCP has no
    aliases, so an alias is written as its value (a tensor of its own), as
    ``dcp.save(model.state_dict())`` writes tied weights. Returns ``(items, aliases)``."""
    from .dcp_writer import DcpItem

    ckpt.check_invariants()
    items = []
    for name in ckpt.names():
        e = ckpt.stored.get(name)
        if e is not None:
            items.append(DcpItem(name, e.dtype, tuple(e.shape), e.nbytes, lambda e=e: e.tensor("cpu")))
        else:
            a = ckpt.aliases[name]
            value = lambda a=a: a.transform.apply(a.base.tensor("cpu"))  # noqa: E731
            items.append(DcpItem(name, a.dtype, tuple(a.shape), a.nbytes, value))
    return items, [n for n in ckpt.names() if n in ckpt.aliases]


@dataclass(frozen=True)
class OutputFormat:
    """One output format.

    Attributes:
        name: its name (the ``format`` argument).
        suffixes: output names that mean it.
        suffix: the suffix of an output named after its input.
        model_file: its weights file inside a model folder (None: a folder format).
        shards: whether it can be split into shards of a maximum size.
        write: ``write(ckpt, path, progress=, sync=)`` writes one file atomically and
            returns the metadata keys it could not keep; for a folder format,
            ``write(ckpt, folder, progress=, sync=, final=)`` fills the (temporary)
            folder and returns ``(metadata keys not kept, aliases written as values)``.
        folder_format: the format is a folder of its own (DCP): always a folder output.
    """

    name: str
    suffixes: tuple[str, ...]
    suffix: str
    model_file: str | None
    shards: bool
    write: Callable[..., list[str]]
    folder_format: bool = False


FORMATS: dict[str, OutputFormat] = {
    f.name: f
    for f in (
        OutputFormat("safetensors", (".safetensors",), ".safetensors", "model.safetensors", True, _write_safetensors),
        OutputFormat("torch", (".pt", ".pth", ".bin", ".ckpt"), ".pt", "pytorch_model.bin", False, _write_torch),
        OutputFormat("dcp", (), "-dcp", None, False, _write_dcp, folder_format=True),
    )
}
DEFAULT = "safetensors"


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
        max_shard_size: shard the output into a folder (safetensors only).
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
    if max_shard_size is not None and not FORMATS[key].shards:
        if format is not None:
            raise UsageError(
                f"format {key} writes one file and is never sharded", param="format", hint="shards are safetensors"
            )
        key = DEFAULT  # a folder of shards is safetensors, whatever its name
    folder = (
        max_shard_size is not None
        or FORMATS[key].folder_format
        or os.path.isdir(path)
        or path.endswith(("/", os.sep))
        or (folder_input and named is None)
    )
    return OutputPlan(path, key, folder, max_shard_size)


def dropped_metadata(ckpt: Checkpoint) -> list[str]:
    """Metadata keys a torch file cannot keep (a state dict holds tensors only); the
    safetensors ``format`` marker is not counted."""
    return sorted(k for k in ckpt.metadata if k != "format")


def torch_layout(ckpt: Checkpoint):
    """The storages and the state dict of ``ckpt`` as a torch file: every stored tensor a
    storage of its own, every alias a view of its source's storage (``torch.load`` gives
    them shared memory). Returns ``(storages, tensors)`` for ``write_torch``.

    Raises:
        OutputError: an alias whose view would not read back as the same tie.
    """
    from .torch_writer import TorchTensor
    from .writer import WriteItem
    from ..views import Strided, contiguous_strides, layout_of, view_steps

    ckpt.check_invariants()
    index: dict[str, int] = {}
    storages: list[WriteItem] = []

    def storage(name: str) -> int:
        if name not in index:
            s = ckpt.stored[name]
            index[name] = len(storages)
            storages.append(WriteItem(s.name, s.dtype, s.shape, s.nbytes, s.write))
        return index[name]

    tensors = []
    for name in _dict_order(ckpt):
        if name in ckpt.stored:
            s = ckpt.stored[name]
            tensors.append(TorchTensor(name, storage(name), s.dtype, s.shape, contiguous_strides(s.shape)))
            continue
        a = ckpt.aliases[name]
        view = layout_of(a.transform, a.base.shape, a.base.dtype)
        if view.numel and view_steps(Strided.contiguous(a.base.shape, a.base.dtype), view) is None:
            raise OutputError(
                f"alias {name!r} = {a.transform}({a.source}) cannot be written as a view that reads back as that tie",
                hint="untie it first, or write safetensors",
            )
        tensors.append(TorchTensor(name, storage(a.source), a.dtype, view.shape, view.strides, view.offset))
    return storages, tensors


def _dict_order(ckpt: Checkpoint) -> list[str]:
    """Names in natural order, except that an alias comes right after its source when it
    would come before it: a reader takes the first of equal views as the source."""
    out: list[str] = []
    waiting: dict[str, list[str]] = {}
    for name in ckpt.names():
        a = ckpt.aliases.get(name)
        if a is not None and a.source not in out:
            waiting.setdefault(a.source, []).append(name)
            continue
        out.append(name)
        out.extend(waiting.pop(name, []))
    return out


def save(
    ckpt: Checkpoint,
    plan: OutputPlan,
    *,
    overwrite: bool = False,
    replace_input: bool = False,
    progress=None,
    sync: bool = True,
) -> SaveResult:
    """Write ``ckpt`` as ``plan`` says, atomically; see :meth:`Checkpoint.save`."""
    from ..model import SaveResult, natural_key
    from .destination import check_file_target, check_folder_target

    inputs = ckpt.input_files
    aliases = {n: ckpt.aliases[n].record() for n in sorted(ckpt.aliases, key=natural_key)}
    fmt = FORMATS[plan.format]
    extra: dict = {}
    stored, nbytes = len(ckpt.stored), ckpt.total_bytes
    if plan.folder:
        exists = check_folder_target(plan.path, inputs, overwrite=overwrite, replace_input=replace_input)
        extra = _write_folder(ckpt, plan, replace=exists, progress=progress, sync=sync)
        if fmt.folder_format:  # no aliases: each is a tensor of its own
            aliases, stored = {}, stored + len(ckpt.aliases)
            nbytes += sum(a.nbytes for a in ckpt.aliases.values())
    else:
        check_file_target(plan.path, inputs, overwrite=overwrite, replace_input=replace_input)

        def write():
            return fmt.write(ckpt, plan.path, progress=progress, sync=sync)

        s = distributed.current()
        extra["dropped_metadata"] = write() if s is None else s.first_writes(write)
    return SaveResult(os.fspath(plan.path), stored, nbytes, aliases, format=plan.format, **extra)


def _write_folder(ckpt: Checkpoint, plan: OutputPlan, *, replace: bool, progress, sync: bool) -> dict:
    """Weights (one file, shards or a DCP checkpoint) and the input folder's other files,
    as one folder; under a process group, written by every rank (see the module docstring)."""
    from . import hf_config as hf
    from .hf import carry
    from .sharded_writer import atomic_folder, shard_name, write_shards_into

    fmt = FORMATS[plan.format]
    source = None if fmt.folder_format else ckpt.model_folder
    config_bytes = None
    change: dict = {}
    if source is not None and source.config is not None:
        new_config, change = hf.config_for_output(ckpt, source.config)
        config_bytes = None if new_config is None else hf.dump_config(new_config)
    s = distributed.current()
    first = s is None or s.is_first
    out: dict = {}
    target = atomic_folder if s is None else s.shared_folder
    with target(plan.path, replace=replace, sync=sync) as tmp:
        if fmt.folder_format:
            dropped, as_values = fmt.write(ckpt, tmp, progress=progress, sync=sync, final=os.fspath(plan.path))
            out["dropped_metadata"] = dropped
            out["aliases_as_values"] = as_values
        elif plan.max_shard_size is not None:
            shards, shard_meta, index_meta = ckpt._shard_plan(plan.max_shard_size)
            names = [shard_name(i, len(shards)) for i in range(len(shards))]
            mine = None
            if s is not None:
                owner = distributed.split_by_bytes([sum(i.nbytes for i in sh) for sh in shards], s.world_size)
                mine = {i for i, r in enumerate(owner) if r == s.rank}
            write_shards_into(
                tmp, names, shards, shard_meta, index_meta, progress=progress, sync=sync, only=mine, index=first
            )
            out["shards"] = names
            out["dropped_metadata"] = []
        elif first:
            out["dropped_metadata"] = fmt.write(ckpt, os.path.join(tmp, fmt.model_file), progress=progress, sync=sync)
        if source is not None and first:
            out["files"] = carry(source, tmp, config=config_bytes, sync=sync)
            out["config"] = change
    return out if s is None else s.exchange("saved", out)[0]
