"""``Checkpoint``: ordered names -> lazy tensor entries, aliases, metadata, source format.

A checkpoint holds *stored* tensors (each with its own bytes) and *aliases* (a name
whose value is a view transform of one stored tensor). Nothing here reads tensor data
until asked; importing this module and loading a safetensors checkpoint never imports
torch.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import aliases as alias_codec
from .dtypes import BY_NAME, name_of_torch_dtype
from .errors import InputError, UnknownNameError
from .formats import sniff as _sniff
from .formats.safetensors import SafetensorsFile, TensorRecord

if TYPE_CHECKING:
    from .transforms import Transform

# The writer and the transforms are imported where they are used: `inspect` of a file
# without aliases needs neither, and it must stay well under 0.2 s as a whole process.


def parse(specs):
    from .transforms import parse as _parse

    return _parse(specs)


def natural_key(name: str):
    """Sort ``layers.2`` before ``layers.10``."""
    return [(0, int(p), "") if p.isdecimal() else (1, 0, p) for p in re.split(r"(\d+)", name)]


# --- stored tensors -------------------------------------------------------------------


class Stored:
    """A tensor with bytes of its own. Subclasses say where the bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * BY_NAME[self.dtype].itemsize

    def raw_location(self) -> tuple[str, int, int] | None:
        """``(path, offset, nbytes)`` when the bytes lie verbatim in a file."""
        return None

    def tensor(self, device="cpu"):
        raise NotImplementedError

    def write(self, f) -> None:
        """Write the tensor's raw little-endian bytes at ``f``'s position."""
        from .formats.writer import copy_range, write_all

        loc = self.raw_location()
        if loc is not None:
            copy_range(loc[0], loc[1], loc[2], f)
            return
        write_all(f, tensor_bytes(self.tensor("cpu")))

    def renamed(self, name: str) -> Stored:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.name = name
        return clone


def tensor_bytes(t):
    """A zero-copy (where possible) byte view of a CPU tensor's contiguous data."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().data


class FileStored(Stored):
    """Bytes in a safetensors file, reached lazily."""

    def __init__(self, file: SafetensorsFile, record: TensorRecord, name: str | None = None):
        self.file = file
        self.record = record
        self.name = name or record.name
        self.dtype = record.dtype
        self.shape = record.shape

    def raw_location(self):
        offset, nbytes = self.file.absolute_range(self.record.name)
        return self.file.path, offset, nbytes

    def raw(self) -> memoryview:
        return self.file.raw(self.record.name)

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Unmap the pages of bytes ``[start, stop)`` of this tensor (``MADV_DONTNEED`` on
        the file's read-only shared map): the data stays in the page cache and is mapped
        again on the next access. Keeps a streaming read's resident set bounded."""
        import mmap

        m = self.file._mmap
        if m is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        offset, nbytes = self.file.absolute_range(self.record.name)
        stop = nbytes if stop is None else min(stop, nbytes)
        lo = (offset + max(0, start)) // mmap.PAGESIZE * mmap.PAGESIZE
        if offset + stop > lo:
            m.madvise(mmap.MADV_DONTNEED, lo, offset + stop - lo)

    def tensor(self, device="cpu"):
        import torch

        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        if self.nbytes:
            self.file.read_into(self.record.name, buf.numpy())
        t = buf.view(getattr(torch, self.dtype)).reshape(self.shape)
        return t if str(device) == "cpu" else t.to(device)


class TensorStored(Stored):
    """A torch tensor in memory (or memory-mapped by ``torch.load(mmap=True)``)."""

    def __init__(self, name: str, t):
        self.name = name
        self.t = t
        self.dtype = name_of_torch_dtype(t.dtype)
        self.shape = tuple(t.shape)

    def tensor(self, device="cpu"):
        return self.t if self.t.device == _device(device) else self.t.to(device)


class ComputedStored(Stored):
    """``transform(base)``, computed when written or read: one tensor in flight at a time.

    Written on the CPU from a safetensors file, it is computed with numpy when every step
    allows (``_use_numpy``), with the bytes torch would give; otherwise with torch."""

    def __init__(self, name: str, base: Stored, transform: Transform, device="cpu"):
        self.name = name
        self.base = base
        self.transform = transform
        self.device = device
        self.shape, self.dtype = transform.infer(base.shape, base.dtype)

    def raw_location(self):
        """The identity of bytes that lie in a file is those bytes: copied, never decoded."""
        return self.base.raw_location() if self.transform.is_identity else None

    def _compute(self, own: bool = False):
        base = self.base.tensor(self.device)
        out = self.transform.apply(base, allow_copy=True).contiguous()
        if own and out.numel() and out.untyped_storage().data_ptr() == base.untyped_storage().data_ptr():
            out = out.clone()  # a view of an in-memory base: give it bytes of its own
        return out

    def tensor(self, device="cpu"):
        """The value as a tensor of its own: never a view of the base's memory."""
        out = self._compute(own=True)
        return out if out.device == _device(device) else out.to(device)

    def _use_numpy(self) -> bool:
        """Whether :meth:`write` computes with numpy rather than torch: on the CPU, over the
        bytes of a safetensors file, with steps that numpy computes bit for bit as torch
        does (``wsurgery.numpy_apply.supports``). Then writing never imports torch."""
        if str(self.device) != "cpu" or not isinstance(self.base, FileStored):
            return False
        from .numpy_apply import supports

        return supports(self.transform, self.base.dtype)

    def _write_numpy(self, f) -> bool:
        """Compute and write with numpy; False (nothing written) when the result holds a NaN
        whose bits torch may set otherwise: the caller then computes with torch."""
        import numpy as np

        from .formats.writer import write_all
        from .numpy_apply import apply, has_nan, needs_nan_check, numpy_view

        base = self.base
        try:
            out = apply(self.transform, numpy_view(base.raw(), base.dtype, base.shape), base.dtype)
            out = np.ascontiguousarray(out)
            if needs_nan_check(self.transform, base.dtype) and has_nan(out):
                return False
            write_all(f, out.reshape(-1).view(np.uint8))
            return True
        finally:
            base.release()  # the pages read stay in the page cache, out of this process

    def write(self, f) -> None:
        from .formats.writer import copy_range, write_all

        loc = self.raw_location()
        if loc is not None:
            copy_range(loc[0], loc[1], loc[2], f)
            return
        if self._use_numpy() and self._write_numpy(f):
            return
        write_all(f, tensor_bytes(self._compute()))


def _device(device):
    import torch

    return torch.device(device)


# --- aliases --------------------------------------------------------------------------


@dataclass(frozen=True)
class Alias:
    name: str
    source: str  # a stored name
    transform: Transform
    dtype: str
    shape: tuple[int, ...]

    @property
    def specs(self) -> list[str]:
        return self.transform.specs()

    def record(self) -> dict:
        return {"source": self.source, "transform": self.specs}


# --- the checkpoint -------------------------------------------------------------------


@dataclass
class Checkpoint:
    stored: dict[str, Stored]
    aliases: dict[str, Alias] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # user metadata, alias records removed
    path: str | None = None
    format: str = "memory"
    skipped: list[str] = field(default_factory=list)
    container: str | None = None
    input_files: list[str] = field(default_factory=list)

    # -- names ---------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted([*self.stored, *self.aliases], key=natural_key)

    def __contains__(self, name: str) -> bool:
        return name in self.stored or name in self.aliases

    def __len__(self) -> int:
        return len(self.stored) + len(self.aliases)

    def entry(self, name: str) -> Stored | Alias:
        if name in self.stored:
            return self.stored[name]
        if name in self.aliases:
            return self.aliases[name]
        raise self.unknown(name)

    def unknown(self, name: str, what: str = "tensor or module") -> UnknownNameError:
        import difflib

        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)
        return UnknownNameError(name, path=self.path, candidates=close, what=what)

    def resolve(self, name: str) -> list[tuple[str, str]]:
        """``[(full name, suffix)]`` for a tensor name or a module prefix.

        A name that is a tensor resolves to that tensor (suffix ``""``), even if it is
        also a module prefix. Otherwise every tensor under ``name.`` is returned, with
        the part after the prefix as suffix (``""`` prefix means every tensor).
        """
        if name in self:
            return [(name, "")]
        prefix = name.rstrip(".") + "." if name else ""
        found = [(n, n[len(prefix) :]) for n in self.names() if n.startswith(prefix)]
        if not found:
            raise self.unknown(name)
        return found

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        e = self.entry(name)
        return e.shape, e.dtype

    # -- data ----------------------------------------------------------------------
    def tensor(self, name: str, device="cpu"):
        """One tensor, read now. An alias comes back as a view of its source tensor."""
        e = self.entry(name)
        if isinstance(e, Alias):
            return e.transform.apply(self.stored[e.source].tensor(device))
        return e.tensor(device)

    def state_dict(self, device="cpu") -> dict:
        """Every tensor read into memory; aliases are views of their sources."""
        out = {name: s.tensor(device) for name, s in self.stored.items()}
        for name, a in self.aliases.items():
            out[name] = a.transform.apply(out[a.source])
        return {n: out[n] for n in self.names()}

    # -- totals --------------------------------------------------------------------
    @property
    def total_params(self) -> int:
        return sum(s.numel for s in self.stored.values())

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.stored.values())

    def alias_records(self) -> dict[str, alias_codec.AliasRecord]:
        return {n: alias_codec.AliasRecord(a.source, tuple(a.specs)) for n, a in self.aliases.items()}

    def check_invariants(self) -> None:
        """Every alias points at a stored tensor and no name is both stored and aliased."""
        for name, a in self.aliases.items():
            if name in self.stored:
                raise InputError(f"{name!r} is both stored and an alias")
            if a.source not in self.stored:
                raise InputError(f"alias {name!r} points at {a.source!r}, which is not stored")

    # -- writing -------------------------------------------------------------------
    def save(self, path, metadata: dict[str, str] | None = None, progress=None, *, sync: bool = True) -> None:
        """Write one safetensors file atomically, recording aliases in the metadata.

        Tensors are ordered by descending itemsize, then name, so every tensor is
        aligned and the same checkpoint always writes the same bytes. ``sync=False``
        skips the fsyncs: still atomic if the process dies, but an operating-system
        crash or power loss soon after may leave the file empty or partial.
        """
        self.check_invariants()
        meta = alias_codec.encode(self.alias_records(), self.metadata if metadata is None else metadata)
        order = sorted(self.stored.values(), key=lambda s: (-BY_NAME[s.dtype].itemsize, s.name))
        from .formats.writer import WriteItem, write_safetensors

        items = [WriteItem(s.name, s.dtype, s.shape, s.nbytes, s.write) for s in order]
        write_safetensors(path, items, meta, progress=progress, sync=sync)

    def save_sharded(
        self, folder, max_shard_size: int, *, replace: bool = False, progress=None, sync: bool = True
    ) -> list[str]:
        """Write Hugging Face-style shards and ``model.safetensors.index.json`` into ``folder``.

        Tensors keep the order of :meth:`save`. Each shard records the aliases whose source
        it stores; the index's ``metadata`` records them all; ``weight_map`` lists stored
        tensors only. Returns the shard file names. ``sync=False`` skips the fsyncs, as
        for :meth:`save`.
        """
        from .formats.sharded_writer import plan_shards, write_sharded
        from .formats.writer import WriteItem

        self.check_invariants()
        order = sorted(self.stored.values(), key=lambda s: (-BY_NAME[s.dtype].itemsize, s.name))
        items = [WriteItem(s.name, s.dtype, s.shape, s.nbytes, s.write) for s in order]
        shards = plan_shards(items, max_shard_size)
        records = self.alias_records()
        shard_meta = []
        for shard in shards:
            here = {i.name for i in shard}
            mine = {n: r for n, r in records.items() if r.source in here}
            shard_meta.append(alias_codec.encode(mine, self.metadata))
        # The index keeps the JSON record of every alias, not the per-name save_model entries.
        index_meta = {k: v for k, v in alias_codec.encode(records, self.metadata).items() if k not in records}
        return write_sharded(folder, shards, shard_meta, index_meta, replace=replace, progress=progress, sync=sync)

    def close(self) -> None:
        seen = set()
        for s in self.stored.values():
            f = getattr(s, "file", None)
            if f is not None and id(f) not in seen:
                seen.add(id(f))
                f.close()


def make_alias(name: str, source: str, transform: Transform, stored: Stored) -> Alias:
    shape, dtype = transform.infer(stored.shape, stored.dtype)
    return Alias(name, source, transform, dtype, tuple(shape))


# --- loading --------------------------------------------------------------------------


def _with_aliases(stored: dict[str, Stored], metadata, path) -> tuple[dict[str, Alias], dict[str, str]]:
    facts = {n: (s.shape, s.dtype) for n, s in stored.items()}
    records, others = alias_codec.decode(metadata, facts, path)
    out = {}
    for name, rec in records.items():
        out[name] = make_alias(name, rec.source, parse(list(rec.specs)), stored[rec.source])
    return out, others


def load_safetensors(path: str) -> Checkpoint:
    sf = SafetensorsFile.open(path)
    stored: dict[str, Stored] = {name: FileStored(sf, rec) for name, rec in sf.tensors.items()}
    aliases, others = _with_aliases(stored, sf.metadata, path)
    return Checkpoint(
        stored, aliases, others, path=path, format=_sniff.SAFETENSORS, input_files=[os.path.abspath(path)]
    )


def load_sharded(path: str) -> Checkpoint:
    from .formats.sharded import open_index

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
    from .errors import SurgeryError

    bad = [n for n, t in tensors.items() if _dtype_name_or_none(t) is None]
    if bad:
        raise InputError(f"{path}: dtype not storable in safetensors for {', '.join(bad[:5])}")
    records = alias_codec.find_shared(tensors, path)
    stored: dict[str, Stored] = {n: TensorStored(n, t) for n, t in tensors.items() if n not in records}
    aliases = {n: make_alias(n, r.source, parse(list(r.specs)), stored[r.source]) for n, r in records.items()}
    for name, (source, specs) in (explicit or {}).items():
        if name in stored or name in aliases:
            raise SurgeryError(f"alias {name!r} is also a tensor of the state dict")
        if source not in stored:
            raise SurgeryError(f"alias {name!r} names {source!r}, which is not a stored tensor")
        transform = parse(list(specs))
        if not transform.is_view:
            raise SurgeryError(f"alias {name!r}: a tie takes view steps only, got {transform}")
        aliases[name] = make_alias(name, source, transform, stored[source])
    return Checkpoint(stored, aliases, {}, path=path, format=fmt)


def _dtype_name_or_none(t):
    try:
        return name_of_torch_dtype(t.dtype)
    except KeyError:
        return None


def load_torch(path: str, fmt: str) -> Checkpoint:
    from .formats.pickles import load_pickle

    result = load_pickle(path, zip_format=fmt == _sniff.TORCH_ZIP)
    ckpt = from_tensors(result.tensors, path=path, fmt=fmt)
    ckpt.skipped = result.skipped
    ckpt.container = result.container
    ckpt.input_files = [os.path.abspath(path)]
    return ckpt


def load(path) -> Checkpoint:
    """Open any checkpoint lazily; the format comes from the file's first bytes."""
    path = os.fspath(path)
    fmt, real = _sniff.sniff(path)
    if fmt == _sniff.SAFETENSORS:
        return load_safetensors(real)
    if fmt == _sniff.SHARDED:
        return load_sharded(real)
    return load_torch(real, fmt)
