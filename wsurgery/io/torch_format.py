"""torch checkpoints: one ``torch.save`` file (zip or legacy), or a folder of shards
with ``pytorch_model.bin.index.json`` (as ``save_pretrained(safe_serialization=False)``
writes them).

Every file goes through the safe unpickler (:mod:`wsurgery.io.pickles`), never
``pickle``; tensors that share storage become aliases. Written files are ``torch.save``
zip files that ``torch.load(weights_only=True)`` reads, aliases as views of shared
storage.
"""

from __future__ import annotations

import builtins
import json
import os
from typing import TYPE_CHECKING, Any

from .. import aliases as alias_codec
from ..dtypes import name_of_torch_dtype
from ..errors import InputError, OutputError
from ..model import Checkpoint, Derived, Stored, TensorStored
from . import sniff as _sniff

if TYPE_CHECKING:
    from .options import Collective, WriteOptions
    from .writer import WriteItem

KINDS = (_sniff.TORCH_ZIP, _sniff.TORCH_LEGACY, _sniff.TORCH_SHARDED)
INDEX_NAME = "pytorch_model.bin.index.json"


def shard_name(i: int, n: int) -> str:
    """The name transformers gives shard ``i`` of ``n``."""
    return f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"


def from_tensors(
    tensors: dict, path: str = "<state dict>", fmt: str = "memory", explicit: dict | None = None, **given: Any
) -> Checkpoint:
    """A checkpoint over torch tensors; shared storage becomes aliases.

    ``explicit`` adds aliases given as ``{alias: (source, [specs])}``; ``given``: the
    other fields of the checkpoint (``metadata``, ``skipped``, ``input_files``...).
    """
    from ..errors import SurgeryError
    from ..transforms import parse

    bad = [n for n, t in tensors.items() if _dtype_name_or_none(t) is None]
    if bad:
        raise InputError(f"{path}: dtype not storable in safetensors for {', '.join(bad[:5])}")
    records = alias_codec.find_shared(tensors, path)
    stored: dict[str, Stored] = {n: TensorStored(n, t) for n, t in tensors.items() if n not in records}
    aliases = {n: Derived.of(stored[r.source], parse(list(r.specs))) for n, r in records.items()}
    for name, (source, specs) in (explicit or {}).items():
        if name in stored or name in aliases:
            raise SurgeryError(f"alias {name!r} is also a tensor of the state dict")
        if source not in stored:
            raise SurgeryError(f"alias {name!r} names {source!r}, which is not a stored tensor")
        transform = parse(list(specs))
        if not transform.is_view:
            raise SurgeryError(f"alias {name!r}: a tie takes view steps only, got {transform}")
        aliases[name] = Derived.of(stored[source], transform)
    given.setdefault("metadata", {})
    return Checkpoint(stored, aliases, path=path, format=fmt, **given)


def _dtype_name_or_none(t: Any) -> str | None:
    try:
        return name_of_torch_dtype(t.dtype)
    except KeyError:
        return None


def _kind_of(path: str) -> str:
    with builtins.open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return _sniff.TORCH_ZIP
    if head[:1] == b"\x80":
        return _sniff.TORCH_LEGACY
    raise InputError(f"{path}: not a torch.save file (first bytes {head.hex()})")


def open_file(path: str, kind: str, **given: Any) -> Checkpoint:
    """One ``torch.save`` file, through the safe unpickler (memory-mapped)."""
    from .pickles import load_pickle

    result = load_pickle(path, zip_format=kind == _sniff.TORCH_ZIP)
    return from_tensors(
        result.tensors,
        path=path,
        fmt=kind,
        skipped=list(result.skipped),
        container=result.container,
        input_files=[os.path.abspath(path)],
        **given,
    )


def open_sharded(path: str, **given: Any) -> Checkpoint:
    """A ``pytorch_model.bin.index.json`` and its shards: every shard through the safe
    unpickler, every name in the shard the index says (``HeaderError`` otherwise). Ties
    within a shard (shared storage) are aliases."""
    from .pickles import load_pickle
    from .sharded import check_agreement, read_index, shard_files

    meta, weight_map, folder = read_index(path)
    files = shard_files(path, folder, weight_map)
    canonical: dict[str, str] = {}  # real path -> the first spelling of it
    for shard, real in files.items():
        canonical.setdefault(real, shard)
    stored: dict[str, Stored] = {}
    aliases: dict[str, Derived] = {}
    skipped: list[str] = []
    held: dict[str, list[str]] = {}
    container = None
    for shard in canonical.values():
        full = os.path.join(folder, shard)
        result = load_pickle(full, zip_format=_kind_of(full) == _sniff.TORCH_ZIP)
        part = from_tensors(result.tensors, path=full)
        held[shard] = [*part.stored, *part.aliases]
        stored.update(part.stored)
        aliases.update(part.aliases)
        skipped.extend(f"{shard}: {s}" for s in result.skipped)
        container = container or result.container
    check_agreement(path, {n: canonical[files[s]] for n, s in weight_map.items()}, held)
    metadata = {k: v for k, v in meta.items() if isinstance(v, str)}
    return Checkpoint(
        stored,
        aliases,
        metadata,
        path=path,
        format=_sniff.TORCH_SHARDED,
        skipped=skipped,
        container=container,
        input_files=[os.path.abspath(path), *(os.path.join(folder, s) for s in canonical.values())],
        **given,
    )


def open(path: str, kind: str, **given: Any) -> Checkpoint:  # noqa: A001 - the registry's word
    """Open ``path`` (``kind``: :data:`KINDS`)."""
    return open_sharded(path, **given) if kind == _sniff.TORCH_SHARDED else open_file(path, kind, **given)


def dropped_metadata(ckpt: Checkpoint) -> list[str]:
    """Metadata keys a torch file cannot keep (a state dict holds tensors only); the
    safetensors ``format`` marker is not counted."""
    return sorted(k for k in ckpt.metadata if k != "format")


def torch_layout(ckpt: Checkpoint) -> tuple[list[WriteItem], list[Any]]:
    """The storages and the state dict of ``ckpt`` as a torch file: every stored tensor a
    storage of its own, every alias a view of its source's storage (``torch.load`` gives
    them shared memory). Returns ``(storages, tensors)`` for ``write_torch``.

    Raises:
        OutputError: an alias whose view would not read back as the same tie.
    """
    from ..views import Strided, contiguous_strides, layout_of, view_steps
    from .sinks import item_of
    from .torch_writer import TorchTensor

    index: dict[str, int] = {}
    storages: list[WriteItem] = []

    def storage(name: str) -> int:
        if name not in index:
            s = ckpt.stored[name]
            index[name] = len(storages)
            storages.append(item_of(s))
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


def write(ckpt: Checkpoint, path: str, options: WriteOptions, *, notes: list[str] | None = None) -> list[str]:
    """One ``torch.save`` zip file, atomically; returns the metadata keys not kept.

    From a torch input (unless ``options.flat``) the file keeps the input's structure:
    its containers, keys and plain values, tensors in place (``pickles.structure``);
    what could not be carried is added to ``notes``."""
    from .pickles.structure import structure_for
    from .torch_writer import write_torch

    storages, tensors = torch_layout(ckpt)
    kept = None if options.flat else structure_for(ckpt, [t.name for t in tensors], notes)
    if kept is not None:
        storages, tensors = _with_carried(storages, tensors, kept[1])
    write_torch(path, storages, tensors, options.progress, sync=options.sync, tree=None if kept is None else kept[0])
    return dropped_metadata(ckpt)


def _with_carried(storages: list[WriteItem], tensors: list[Any], carried: dict) -> tuple[list[WriteItem], list[Any]]:
    """``storages`` and ``tensors`` with the tensors a kept structure carries as they are
    (outside the state dict), each a storage of its own."""
    from ..views import contiguous_strides
    from .sinks import item_of
    from .torch_writer import TorchTensor

    storages, tensors = list(storages), list(tensors)
    for name, t in carried.items():
        s = TensorStored(name, t.contiguous())
        tensors.append(TorchTensor(name, len(storages), s.dtype, s.shape, contiguous_strides(s.shape)))
        storages.append(item_of(s))
    return storages, tensors


def _groups(ckpt: Checkpoint) -> list[list[str]]:
    """Each stored tensor with the aliases over it (one shard holds them: a tie is shared
    storage, which never crosses files), largest itemsize first as in one file."""
    from ..dtypes import BY_NAME

    order = sorted(ckpt.stored.values(), key=lambda s: (-BY_NAME[s.dtype].itemsize, s.name))
    over: dict[str, list[str]] = {}
    for name, a in ckpt.aliases.items():
        over.setdefault(a.source, []).append(name)
    return [[s.name, *over.get(s.name, [])] for s in order]


def write_shards(
    ckpt: Checkpoint, folder: str, max_shard_size: int, options: WriteOptions, group: Collective | None
) -> list[str]:
    """``pytorch_model-0000i-of-0000N.bin`` shards and ``pytorch_model.bin.index.json`` into
    the (temporary) ``folder``, as transformers writes them: a new shard starts when the
    next tensor would pass ``max_shard_size`` (a tensor larger than it is a shard of its
    own). Under a process group each rank writes its share; rank 0 the index."""
    from .torch_writer import write_torch
    from .writer import atomic_file, write_all

    shards: list[list[str]] = []
    size = 0
    for group_names in _groups(ckpt):
        nbytes = ckpt.stored[group_names[0]].nbytes
        if not shards or (size + nbytes > max_shard_size and size > 0):
            shards.append([])
            size = 0
        shards[-1].extend(group_names)
        size += nbytes
    if not shards:
        shards = [[]]
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    mine = set(range(len(shards)))
    if group is not None:
        sizes = [sum(ckpt.stored[n].nbytes for n in sh if n in ckpt.stored) for sh in shards]
        mine = {i for i, r in enumerate(group.owners(sizes)) if r == group.rank}
    weight_map: dict[str, str] = {}
    for i, (name, members) in enumerate(zip(names, shards, strict=True)):
        for n in members:
            weight_map[n] = name
        if i in mine:
            keep = set(members)
            part = ckpt.evolve(
                stored={n: s for n, s in ckpt.stored.items() if n in keep},
                aliases={n: a for n, a in ckpt.aliases.items() if n in keep},
            )
            storages, tensors = torch_layout(part)
            write_torch(os.path.join(folder, name), storages, tensors, options.progress, sync=options.sync)
    if group is None or group.is_first:
        record = {
            "metadata": {"total_size": ckpt.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        with atomic_file(os.path.join(folder, INDEX_NAME), sync=options.sync) as f:
            write_all(f, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    return names
