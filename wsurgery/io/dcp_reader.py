"""Checkpoints from distributed layouts: DCP folders, DCP's safetensors layout,
Megatron-Core ``torch_dist`` folders, NeMo 2 checkpoint folders and NeMo 1 ``.nemo``
archives, each opened lazily as a ``Checkpoint``.

Opening reads metadata only (``.metadata``, safetensors headers, ``metadata.json``,
``model_config.yaml``; ``common.pt`` and a ``.nemo``'s ``model_weights.ckpt`` by the
pickles package's inert scan, their plain tensors viewed in place without torch, or
else through the safe torch path, memory-mapped). A DCP tensor is a :class:`ChunkedStored`: its chunks
are read and assembled when the tensor is asked for, one tensor at a time; a tensor held
whole by one chunk whose bytes lie verbatim in a file is written by copying those bytes.

For a later DCP writer or a rank-split diff: :func:`open_layout` gives the tensors as
``io.dcp.TensorPlan`` objects (dtype, global shape, chunk boxes and their sources),
without building a ``Checkpoint``.
"""

from __future__ import annotations

import os

from ..errors import InputError
from ..model import ByteSink, Checkpoint, Stored
from . import layouts
from .dcp import (
    MEGATRON_COMMON,
    Layout,
    PlainChunk,
    Resources,
    TensorPlan,
    megatron_metadata,
    open_dcp,
    open_dcp_safetensors,
)
from .dcp_metadata import Chunk
from .folders import DirFolder, Folder
from .ranges import ByteRange, FileMaps, plain_state
from .sinks import FileSink

MAX_CONFIG = 1 << 20
MAX_LISTED = 50


class ChunkedStored(Stored):
    """A tensor of a distributed checkpoint: assembled from its chunks when read.

    ``tensor()`` reads each chunk (through the safe pickle path for ``torch.save`` blobs)
    and copies it into its box; memory holds the tensor and one chunk. ``write(f)``
    copies the bytes of a tensor that one chunk holds whole, in the kernel, when they lie
    verbatim in a file. ``file`` is what :meth:`Checkpoint.close` releases.
    """

    def __init__(self, plan: TensorPlan, resources: Resources, name: str | None = None):
        self.plan, self.file = plan, resources
        self.name, self.dtype, self.shape = name or plan.name, plan.dtype, plan.shape

    def raw_location(self):
        one = self.plan.whole()
        return None if one is None else one.raw_location()

    def raw(self) -> memoryview:
        """The tensor's bytes, without torch: viewed in place when one chunk holds them
        verbatim, else assembled from the chunks."""
        return memoryview(self.plan.array().reshape(-1))  # type: ignore[arg-type]  # a flat uint8 ndarray

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Unmap the pages of bytes ``[start, stop)`` of a tensor viewed in place."""
        one = self.plan.whole()
        loc = None if one is None else one.raw_location()
        maps = getattr(one, "maps", None)
        if loc is not None and maps is not None:
            end = loc[2] if stop is None else min(stop, loc[2])
            maps.release(loc[0], loc[1] + max(0, start), loc[1] + end)

    def tensor(self, device="cpu"):
        t = self.plan.tensor()
        return t if str(device) == "cpu" else t.to(device)

    def write(self, f: ByteSink) -> None:
        one = self.plan.whole()
        if isinstance(f, FileSink):  # copied in the kernel where the bytes lie verbatim in a file
            if one is not None:
                one.write_to(f.f)
                return
            runs = self.plan.runs()
            if runs is not None and all(src.raw_location() is not None for src in runs):
                for src in runs:  # the tensor's bytes are the chunks' bytes, one after another
                    src.write_to(f.f)
                return
        f.write_bytes((self.plan if one is None else one).array().reshape(-1))


class _Parts:
    """What a checkpoint is made of, gathered before the one constructor call."""

    def __init__(self, path: str, fmt: str):
        self.path, self.format = path, fmt
        self.stored: dict[str, Stored] = {}
        self.aliases: dict = {}
        self.metadata: dict[str, str] = {}
        self.skipped: list[str] = []
        self.container: str | None = None
        self.input_files: list[str] = []

    def build(self) -> Checkpoint:
        return Checkpoint(
            self.stored,
            self.aliases,
            self.metadata,
            path=self.path,
            format=self.format,
            skipped=self.skipped,
            container=self.container,
            input_files=self.input_files,
        )


def _parts(layout: Layout, path: str, fmt: str) -> _Parts:
    parts = _Parts(path, fmt)
    parts.stored = {n: ChunkedStored(p, layout.resources) for n, p in layout.tensors.items()}
    parts.metadata = dict(layout.metadata)
    parts.skipped = list(layout.skipped)
    parts.input_files = [os.path.abspath(p) for p in layout.input_files]
    return parts


def _torch_file(folder: Folder, name: str):
    """A torch checkpoint inside a folder (a file, or an archive member), through the safe
    torch path."""
    from .pickles import load_pickle
    from .ranges import load_state_dict

    loc = folder.locate(name)
    with open(loc.path, "rb") as f:
        f.seek(loc.offset)
        head = f.read(2)
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise InputError(f"{folder.shown(name)}: not a torch.save file (first bytes {head.hex()})")
    if loc.offset == 0 and loc.size == os.path.getsize(loc.path):
        return load_pickle(loc.path, zip_format=head == b"PK")
    return load_state_dict(ByteRange(loc.path, loc.offset, loc.size, folder.shown(name)))


def _add_torch_file(parts: _Parts, folder: Folder, name: str, *, prefix_skipped: bool, resources: Resources) -> bool:
    """Merge the tensors (and skipped entries) of a torch file into ``parts``.

    Read without torch when its tensors are all plain (:func:`.ranges.plain_state`): each
    is a :class:`ChunkedStored` of one chunk viewed in place, whose maps ``resources``
    releases. Returns whether it was (the stored tensors then read from the file)."""
    loc = folder.locate(name)
    state = plain_state(ByteRange(loc.path, loc.offset, loc.size, folder.shown(name)))
    if state is not None:
        maps = FileMaps()
        resources.files.append(maps)
        stored: dict[str, Stored] = {}
        for key, p in state.tensors.items():
            plan = TensorPlan(key, p.dtype, p.size, [(Chunk((0,) * len(p.size), p.size), PlainChunk(p, maps))])
            stored[key] = ChunkedStored(plan, resources)
        aliases: dict = {}
        skipped, container = state.skipped, state.container
    else:
        from .torch_format import from_tensors

        result = _torch_file(folder, name)
        inner = from_tensors(result.tensors, path=folder.shown(name), fmt=parts.format)
        stored, aliases = inner.stored, inner.aliases
        skipped, container = result.skipped, result.container
    clash = sorted(set(stored).union(aliases) & set(parts.stored))
    if clash:
        raise InputError(f"{folder.shown(name)}: tensor {clash[0]!r} is also a tensor of the distributed checkpoint")
    parts.stored.update(stored)
    parts.aliases.update(aliases)
    parts.skipped.extend(f"{name}: {s}" if prefix_skipped else s for s in skipped)
    parts.container = container
    return state is not None


def _text(folder: Folder, name: str) -> str:
    return folder.read(name, MAX_CONFIG).decode("utf-8", "replace")


def open_layout(folder: Folder, fmt: str, resources: Resources | None = None) -> Layout:
    """The tensors of a DCP-based folder as chunk plans, validated, no data read.

    Args:
        folder: a DCP, DCP-safetensors or Megatron ``torch_dist`` folder (on disk or in an
            archive).
        fmt: its layout (``io.layouts.DCP``, ``DCP_SAFETENSORS`` or ``MEGATRON``).
        resources: files to share with other parts of one checkpoint.

    Returns:
        A ``io.dcp.Layout``: ``tensors`` maps each name to a ``TensorPlan`` (dtype,
        global shape, chunk boxes with their sources), with ``skipped``, ``metadata`` and
        ``input_files``.

    Example:
        >>> layout = open_layout(DirFolder("ckpt"), "dcp")             # doctest: +SKIP
        >>> [c.offsets for c, _ in layout.tensors["w"].chunks]         # doctest: +SKIP
        [(0, 0), (16, 0)]
    """
    if fmt == layouts.DCP_SAFETENSORS:
        return open_dcp_safetensors(folder, [n for n in folder.names() if "/" not in n and n.endswith(".safetensors")])
    if fmt == layouts.MEGATRON:
        info = megatron_metadata(folder)
        layout = open_dcp(folder, resources)
        layout.metadata.update({f"megatron.{k}": str(v) for k, v in sorted(info.items()) if isinstance(v, (str, int))})
        layout.input_files.append(folder.locate("metadata.json").path)
        return layout
    return open_dcp(folder, resources)


def _megatron(folder: Folder, path: str, fmt: str, res: Resources | None = None) -> _Parts:
    layout = open_layout(folder, layouts.MEGATRON, res)
    parts = _parts(layout, path, fmt)
    if folder.exists(MEGATRON_COMMON):
        _add_torch_file(parts, folder, MEGATRON_COMMON, prefix_skipped=True, resources=layout.resources)
        parts.input_files.append(os.path.abspath(folder.locate(MEGATRON_COMMON).path))
    parts.input_files = sorted(set(parts.input_files))
    return parts


def _weights_folder(folder: Folder, path: str, fmt: str, res: Resources | None = None) -> _Parts:
    """A torch_dist folder, or a bare DCP folder."""
    if folder.exists("metadata.json"):
        return _megatron(folder, path, fmt, res)
    if not folder.exists(".metadata"):
        raise InputError(f"{folder.root}: neither a torch_dist (metadata.json) nor a DCP (.metadata) checkpoint")
    return _parts(open_layout(folder, layouts.DCP, res), path, fmt)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def load_nemo2(path: str) -> Checkpoint:
    """A NeMo 2 checkpoint folder: ``weights/`` (torch_dist) read, ``context/`` shown.

    Args:
        path: the folder holding ``weights/`` and ``context/``.

    Returns:
        A lazy ``Checkpoint``; ``metadata`` lists the context files (``nemo.context``) and
        holds ``context/model.yaml``'s text (``nemo.model_config``) when there is one.

    Example:
        >>> ckpt = load_nemo2("nemo2_ckpt")  # doctest: +SKIP
    """
    top = DirFolder(path)
    parts = _weights_folder(top.sub("weights"), path, layouts.NEMO2)
    context = top.sub("context")
    names = context.names() if os.path.isdir(context.root) else []
    if names:
        parts.metadata["nemo.context"] = _listing(names)
    if "model.yaml" in names:
        parts.metadata["nemo.model_config"] = _text(context, "model.yaml")
    return parts.build()


def load_nemo(path: str) -> Checkpoint:
    """A NeMo 1 ``.nemo`` archive (tar or tar.gz), or one rank of it (``model.nemo/mp_rank_01``).

    Args:
        path: the archive, or the archive followed by a model-parallel rank folder.

    Returns:
        A lazy ``Checkpoint`` of ``model_weights.ckpt`` (or of a ``model_weights/``
        torch_dist folder), read from inside the archive; ``metadata`` holds
        ``model_config.yaml`` (``nemo.model_config``) and the ranks (``nemo.ranks``,
        ``nemo.rank``).

    Raises:
        ModelParallelArchiveError: several ranks and none chosen (an InputError that
            lists them).
        InputError: an unsafe or malformed archive, a missing rank or weights file.

    Example:
        >>> ckpt = load_nemo("megatron_gpt.nemo/mp_rank_00")  # doctest: +SKIP
    """
    from .layouts import ModelParallelArchiveError
    from .nemo import DIST_WEIGHTS, WEIGHTS, open_archive

    archive_path, rank = path, None
    if not os.path.exists(path):
        split = layouts.split_archive_path(path)
        if split is None:
            raise InputError(f"{path}: no such file or folder")
        archive_path, rank = split
    arc = open_archive(archive_path, rank)
    keep = False
    try:
        ranks = arc.ranks
        config = arc.config_text()
        if rank is not None and rank not in ranks:
            raise InputError(
                f"{archive_path}: no rank folder {rank!r} holding {WEIGHTS}"
                + (f"; it holds {_listing(ranks)}" if ranks else "; it is not a model-parallel archive"),
            )
        if rank is None and WEIGHTS not in arc.names and not any(n.startswith(DIST_WEIGHTS + "/") for n in arc.names):
            if len(ranks) > 1:
                raise ModelParallelArchiveError(archive_path, ranks, [f"{r}/{WEIGHTS}" for r in ranks], config)
            if not ranks:
                raise InputError(f"{archive_path}: the archive holds no {WEIGHTS}: not a NeMo checkpoint")
            rank = ranks[0]
        shown = archive_path if rank is None else f"{archive_path}/{rank}"
        if rank is None and WEIGHTS not in arc.names:
            res = Resources()
            res.cleanups.append(arc.close)
            keep = True
            parts = _weights_folder(arc.folder.sub(DIST_WEIGHTS), shown, layouts.NEMO, res)
        else:
            member = WEIGHTS if rank is None else f"{rank}/{WEIGHTS}"
            parts = _Parts(shown, layouts.NEMO)
            res = Resources()
            res.cleanups.append(arc.close)  # a decompressed weights file is read until the checkpoint is closed
            keep = _add_torch_file(parts, arc.folder, member, prefix_skipped=False, resources=res)
        if config is not None:
            parts.metadata["nemo.model_config"] = config
        if ranks:
            parts.metadata["nemo.ranks"] = _listing(ranks)
        if rank is not None:
            parts.metadata["nemo.rank"] = rank
        parts.input_files = [os.path.abspath(archive_path)]
        return parts.build()
    finally:
        if not keep:
            arc.close()  # a decompressed weights file stays readable through its mapping


def load_distributed(path: str, fmt: str) -> Checkpoint:
    """Open a checkpoint of a distributed layout (DCP, its Hugging Face layout, Megatron, NeMo 2 or ``.nemo``) lazily.

    Args:
        path: the folder or archive (as ``io.sniff.sniff`` resolved it).
        fmt: its layout.

    Returns:
        A lazy ``Checkpoint`` whose ``format`` is ``fmt``.

    Example:
        >>> ckpt = load_distributed("ckpt", "dcp")  # doctest: +SKIP
    """
    if fmt == layouts.NEMO:
        return load_nemo(path)
    if fmt == layouts.NEMO2:
        return load_nemo2(path)
    folder = DirFolder(path)
    if fmt == layouts.MEGATRON:
        return _megatron(folder, path, fmt).build()
    return _parts(open_layout(folder, fmt), path, fmt).build()
