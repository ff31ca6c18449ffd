"""safetensors: one file, or a folder of shards with ``model.safetensors.index.json``.

Aliases are recorded in the metadata (``wsurgery.aliases``, see :mod:`wsurgery.aliases`);
opening reads headers only and never imports torch.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from .. import aliases as alias_codec
from ..errors import InputError
from ..model import Checkpoint, Derived, Stored
from . import sniff as _sniff
from .safetensors import FileStored, SafetensorsFile

if TYPE_CHECKING:
    from .options import Collective, WriteOptions

KINDS = (_sniff.SAFETENSORS, _sniff.SHARDED)


def alias_records(ckpt: Checkpoint) -> dict[str, alias_codec.AliasRecord]:
    """The alias records of ``ckpt``, as the metadata stores them."""
    return {n: alias_codec.AliasRecord(a.source, tuple(a.specs)) for n, a in ckpt.aliases.items()}


def with_aliases(stored: dict[str, Stored], metadata: Any, path: str) -> tuple[dict[str, Derived], dict[str, str]]:
    """The aliases the metadata records over ``stored``, and the other metadata."""
    facts = {n: (s.shape, s.dtype) for n, s in stored.items()}
    records, others = alias_codec.decode(metadata, facts, path)
    if not records:
        return {}, others
    from ..transforms import parse  # only where there are aliases (an import start-up skips otherwise)

    out = {name: Derived.of(stored[rec.source], parse(list(rec.specs))) for name, rec in records.items()}
    return out, others


def open_file(path: str, **given: Any) -> Checkpoint:
    """One safetensors file, lazily (headers only)."""
    sf = SafetensorsFile.open(path)
    stored: dict[str, Stored] = {name: FileStored(sf, rec) for name, rec in sf.tensors.items()}
    aliases, others = with_aliases(stored, sf.metadata, path)
    return Checkpoint(
        stored,
        aliases,
        others,
        path=path,
        format=_sniff.SAFETENSORS,
        input_files=[os.path.abspath(path)],
        **given,
    )


def open_sharded(path: str, **given: Any) -> Checkpoint:
    """A ``*.safetensors.index.json`` and its shards, each validated against the index."""
    from .sharded import open_index

    index = open_index(path)
    stored: dict[str, Stored] = {}
    for name, shard in index.weight_map.items():
        sf = index.shards[shard]
        stored[name] = FileStored(sf, sf.tensors[name])
    metadata: dict[str, str] = {}
    for sf in index.shards.values():
        metadata.update(sf.metadata or {})
    records = alias_codec.ALIASES_KEY
    merged: dict = {}
    for sf in index.shards.values():
        text = (sf.metadata or {}).get(records)
        if text:
            merged.update(alias_codec.parse_table(text, sf.path))
    idx_text = index.metadata.get(records)
    if isinstance(idx_text, str):
        merged.update(alias_codec.parse_table(idx_text, path))
    elif idx_text is not None:
        raise InputError(f"{path}: index metadata {records} must be a JSON string")
    if merged:
        metadata[records] = json.dumps(merged, sort_keys=True)
    for key, value in index.metadata.items():
        if key != records and isinstance(value, str):
            metadata.setdefault(key, value)
    aliases, others = with_aliases(stored, metadata, path)
    files = [os.path.abspath(path), *(os.path.abspath(sf.path) for sf in index.shards.values())]
    return Checkpoint(stored, aliases, others, path=path, format=_sniff.SHARDED, input_files=files, **given)


def open(path: str, kind: str, **given: Any) -> Checkpoint:  # noqa: A001 - the registry's word
    """Open ``path`` (``kind``: :data:`KINDS`); ``given``: fields the caller adds (a
    model folder)."""
    return open_sharded(path, **given) if kind == _sniff.SHARDED else open_file(path, **given)


def write(ckpt: Checkpoint, path: str, options: WriteOptions, *, notes: list[str] | None = None) -> list[str]:
    """One safetensors file, atomically; returns the metadata keys not kept (none)."""
    from .sinks import write_items
    from .writer import write_safetensors

    meta = alias_codec.encode(alias_records(ckpt), ckpt.metadata)
    write_safetensors(path, write_items(ckpt), meta, progress=options.progress, sync=options.sync)
    return []


def shard_plan(ckpt: Checkpoint, max_shard_size: int) -> tuple[list, list[dict[str, str]], dict]:
    """Shards in the order of one file; each records the aliases whose source it stores,
    the index's ``metadata`` records them all, ``weight_map`` lists stored tensors only.
    Returns ``(shards, shard metadata, index metadata)``."""
    from .sharded_writer import plan_shards
    from .sinks import write_items

    shards = plan_shards(write_items(ckpt), max_shard_size)
    records = alias_records(ckpt)
    shard_meta = []
    for shard in shards:
        here = {i.name for i in shard}
        mine = {n: r for n, r in records.items() if r.source in here}
        shard_meta.append(alias_codec.encode(mine, ckpt.metadata))
    # The index keeps the JSON record of every alias, not the per-name save_model entries.
    index_meta = alias_codec.encode(records, ckpt.metadata, convention=False)
    return shards, shard_meta, index_meta


def write_shards(
    ckpt: Checkpoint, folder: str, max_shard_size: int, options: WriteOptions, group: Collective | None
) -> list[str]:
    """The shards and the index into the (temporary) ``folder``; under a process group
    each rank writes its share of the shards and rank 0 the index. Returns the names."""
    from .sharded_writer import shard_name, write_shards_into

    shards, shard_meta, index_meta = shard_plan(ckpt, max_shard_size)
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    mine = None
    if group is not None:
        owner = group.owners([sum(i.nbytes for i in sh) for sh in shards])
        mine = {i for i, r in enumerate(owner) if r == group.rank}
    write_shards_into(
        folder,
        names,
        shards,
        shard_meta,
        index_meta,
        progress=options.progress,
        sync=options.sync,
        only=mine,
        index=group is None or group.is_first,
    )
    return names
