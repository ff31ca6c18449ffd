"""Checkpoints from files: every readable format, opened lazily as a ``Checkpoint``.

The format comes from the file's first bytes (``formats.sniff``), never its name. Reading
a safetensors checkpoint reads headers only and never imports torch; a torch file goes
through the safe pickle path (``formats.pickles``).
"""

from __future__ import annotations

import os

from .. import aliases as alias_codec
from ..model import Checkpoint, Derived, FileStored, Stored, TensorStored, parse
from ..dtypes import name_of_torch_dtype
from ..errors import InputError
from . import sniff as _sniff
from .safetensors import SafetensorsFile


def _with_aliases(stored: dict[str, Stored], metadata, path) -> tuple[dict[str, Derived], dict[str, str]]:
    facts = {n: (s.shape, s.dtype) for n, s in stored.items()}
    records, others = alias_codec.decode(metadata, facts, path)
    out = {}
    for name, rec in records.items():
        out[name] = Derived.of(stored[rec.source], parse(list(rec.specs)))
    return out, others


def load_safetensors(path: str) -> Checkpoint:
    sf = SafetensorsFile.open(path)
    stored: dict[str, Stored] = {name: FileStored(sf, rec) for name, rec in sf.tensors.items()}
    aliases, others = _with_aliases(stored, sf.metadata, path)
    return Checkpoint(
        stored, aliases, others, path=path, format=_sniff.SAFETENSORS, input_files=[os.path.abspath(path)]
    )


def load_sharded(path: str) -> Checkpoint:
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
        import json

        metadata[records] = json.dumps(merged, sort_keys=True)
    for key, value in index.metadata.items():
        if key != records and isinstance(value, str):
            metadata.setdefault(key, value)
    aliases, others = _with_aliases(stored, metadata, path)
    files = [os.path.abspath(path), *(os.path.abspath(sf.path) for sf in index.shards.values())]
    return Checkpoint(stored, aliases, others, path=path, format=_sniff.SHARDED, input_files=files)


def from_tensors(tensors: dict, path="<state dict>", fmt="memory", explicit: dict | None = None) -> Checkpoint:
    """A checkpoint over torch tensors; shared storage becomes aliases.

    ``explicit`` adds aliases given as ``{alias: (source, [specs])}``.
    """
    from ..errors import SurgeryError

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
    return Checkpoint(stored, aliases, {}, path=path, format=fmt)


def _dtype_name_or_none(t):
    try:
        return name_of_torch_dtype(t.dtype)
    except KeyError:
        return None


def load_torch(path: str, fmt: str) -> Checkpoint:
    from .pickles import load_pickle

    result = load_pickle(path, zip_format=fmt == _sniff.TORCH_ZIP)
    ckpt = from_tensors(result.tensors, path=path, fmt=fmt)
    ckpt.skipped = result.skipped
    ckpt.container = result.container
    ckpt.input_files = [os.path.abspath(path)]
    return ckpt


def load(path) -> Checkpoint:
    """Open any checkpoint lazily; the format comes from the file's first bytes. A folder
    is what its structure says: a distributed layout (DCP, Megatron / NeMo 2, DCP's
    safetensors shards), else a model folder read as a whole (``formats.hf``): its
    weights, its ``config.json`` if any, and the other files a folder output carries."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from .layouts import folder_format

        layout = folder_format(path)
        return _load_file(layout, path) if layout is not None else load_folder(path)
    return _load_file(*_sniff.sniff(path))


def _load_file(fmt: str, real: str) -> Checkpoint:
    if fmt == _sniff.SAFETENSORS:
        return load_safetensors(real)
    if fmt == _sniff.SHARDED:
        return load_sharded(real)
    if fmt in _sniff.DISTRIBUTED:  # DCP, Megatron / NeMo 2 folders, .nemo archives
        from .dcp_reader import load_distributed

        return load_distributed(real, fmt)
    return load_torch(real, fmt)


def load_folder(folder: str) -> Checkpoint:
    """A model folder: the weights transformers would load (else the folder's one index or
    safetensors file), with the folder kept as ``model_folder``."""
    from .hf import open_folder

    found = open_folder(folder)
    ckpt = load(found.weights) if found.weights is not None else _load_file(*_sniff.sniff(folder))
    ckpt.model_folder = found
    return ckpt
