"""Sharded safetensors: an index (``weight_map``) over several validated shard files.

Rules, each an input error (exit 3) naming the index and the rule: the index is UTF-8
JSON of at most 100 MB with no duplicate keys and a ``weight_map`` object of names to
non-empty shard paths; every shard path stays inside the index's folder (no absolute
path, no ``..``, no symlink out); every shard exists and is a valid safetensors file;
no tensor is stored in two shards; ``weight_map`` and the shards' headers agree both
ways. Two spellings of one file (``a.safetensors``, ``./a.safetensors``) are one shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import HeaderError, InputError
from ..show import short
from .safetensors import DuplicateKey, SafetensorsFile, reject_duplicates


@dataclass
class ShardedIndex:
    path: str
    folder: str
    metadata: dict  # the index's own "metadata" (total_size, alias records)
    weight_map: dict[str, str]
    shards: dict[str, SafetensorsFile]  # shard file name -> opened shard


def _fail(path, rule: str) -> HeaderError:
    return HeaderError(f"{path}: invalid sharded index: {rule}")


def _inside(folder: str, rel: str) -> bool:
    if os.path.isabs(rel) or not rel or "\x00" in rel:
        return False
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(folder, rel))
    return os.path.commonpath([root, target]) == root


def read_index(path) -> tuple[dict, dict[str, str], str]:
    """Parse an index (``*.index.json``): ``(metadata, weight_map, folder)``; any index
    whose ``weight_map`` maps tensor names to shard files (safetensors or torch)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(100_000_001)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > 100_000_000:
        raise _fail(path, "index is larger than 100,000,000 bytes")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicates)
    except DuplicateKey as exc:
        raise _fail(path, f"key {short(exc.args[0])} appears twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail(path, "not UTF-8 JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise _fail(path, 'no "weight_map" object')
    weight_map = obj["weight_map"]
    if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
        raise _fail(path, "weight_map must map tensor names to shard file names")
    metadata = obj.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise _fail(path, '"metadata" is not an object')
    return metadata, dict(weight_map), os.path.dirname(os.path.abspath(path))


def shard_files(path: str, folder: str, weight_map: dict[str, str]) -> dict[str, str]:
    """Every shard the index names -> its real path; a shard that leaves the folder or
    does not exist is refused. Two spellings of one file have one real path."""
    out: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if not _inside(folder, shard):
            raise _fail(path, f"shard path {short(shard)} leaves the checkpoint's folder")
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise InputError(
                f"{path}: shard {short(shard)} named in weight_map does not exist",
                hint="copy the missing shard beside the index, or pass a complete checkpoint folder",
            )
        out[shard] = os.path.realpath(shard_path)
    return out


def check_agreement(path: str, weight_map: dict[str, str], held: dict[str, list[str]]) -> None:
    """The index and its shards agree: ``held`` maps each distinct shard (one spelling)
    to the names it holds; every name is in exactly one shard, the one the index says."""
    owner: dict[str, str] = {}
    for shard, names in held.items():
        for name in names:
            if name in owner:
                raise _fail(path, f"tensor {short(name)} is stored in two shards: {owner[name]!r} and {shard!r}")
            owner[name] = shard
    for name, shard in weight_map.items():
        if owner.get(name) != shard:
            where = f"it is in {owner[name]!r}" if name in owner else "no shard holds it"
            raise _fail(path, f"weight_map puts {short(name)} in {shard!r} but {where}")
    for name, shard in owner.items():
        if name not in weight_map:
            raise _fail(path, f"shard {shard!r} holds {short(name)}, which weight_map does not list")


def open_index(path) -> ShardedIndex:
    """Parse the index and validate every shard and its agreement with ``weight_map``."""
    path = os.fspath(path)
    metadata, weight_map, folder = read_index(path)
    files = shard_files(path, folder, weight_map)
    shards: dict[str, SafetensorsFile] = {}
    by_real: dict[str, tuple[str, SafetensorsFile]] = {}  # two spellings of one file: one shard
    for shard, real in files.items():
        if real not in by_real:
            by_real[real] = (shard, SafetensorsFile.open(os.path.join(folder, shard)))
        shards[shard] = by_real[real][1]
    canonical = {shard: by_real[files[shard]][0] for shard in shards}
    check_agreement(
        path,
        {n: canonical[s] for n, s in weight_map.items()},
        {shard: list(sf.tensors) for shard, sf in by_real.values()},
    )
    return ShardedIndex(path=path, folder=folder, metadata=metadata, weight_map=weight_map, shards=shards)
