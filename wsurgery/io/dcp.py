"""Distributed checkpoint folders as lists of tensors made of chunks, validated before any
data is read: torch.distributed.checkpoint (DCP) folders, DCP's safetensors layout (the
Hugging Face storage writer), Megatron-Core ``torch_dist`` folders and NeMo 2 checkpoints.

A folder is a :class:`~wsurgery.io.folders.Folder` (a directory, or a folder inside
an uncompressed ``.nemo`` tar), so the same code reads either. Opening reads metadata
only (``.metadata``, safetensors headers, ``metadata.json``); each tensor is a
:class:`TensorPlan`: dtype, global shape, and its chunks, each a box of the tensor with a
:class:`ChunkSource` that reads it when asked:

- :class:`TorchChunk`: a ``torch.save`` blob at an offset of a ``.distcp`` file, loaded
  through the pickles package's scan and ``weights_only`` load (:mod:`.ranges`);
- :class:`SafetensorsChunk`: a tensor of a validated safetensors file, read without torch.

Every check that needs no data is made at open: the metadata (:mod:`.dcp_metadata`),
each chunk's byte range inside its file, each file name inside the folder. A chunk's
own dtype and shape are checked against the metadata when it is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..dtypes import BY_NAME
from ..errors import InputError
from .dcp_metadata import MAX_METADATA_BYTES, METADATA_FILE, Chunk, parse_metadata, tiling_problem, validate
from .folders import Folder, Located
from .pickles.interpreter import printable
from .ranges import ByteRange, FileMaps, PlainTensor, load_tensor, plain_tensor
from .safetensors import SafetensorsFile
from .writer import copy_range, write_all

if TYPE_CHECKING:
    import numpy as np  # imported where a chunk is decoded: a chunk copied as raw bytes needs none

SHARDING_INFO_KEY = "DCP_SHARDING_INFO"  # torch's Hugging Face storage writer
MEGATRON_METADATA = "metadata.json"
MEGATRON_COMMON = "common.pt"


# ----------------------------------------------------------------------------- chunk sources


class ChunkSource:
    """Where one chunk's bytes lie, and how to read them."""

    def raw_location(self) -> tuple[str, int, int] | None:
        """``(path, offset, nbytes)`` when the chunk's bytes lie verbatim in a file."""
        return None

    def array(self) -> np.ndarray:
        """The chunk's bytes, as ``uint8`` of shape ``(*sizes, itemsize)``."""
        raise NotImplementedError

    def tensor(self):
        """The chunk as a torch tensor of its dtype and sizes."""
        raise NotImplementedError

    def write_to(self, f) -> None:
        """Write the chunk's raw bytes at ``f``'s position (copied in the kernel when they
        lie verbatim in a file)."""
        loc = self.raw_location()
        if loc is not None:
            copy_range(loc[0], loc[1], loc[2], f)
        else:
            write_all(f, self.array().reshape(-1))


@dataclass
class PlainChunk(ChunkSource):
    """A plain dense tensor whose layout the pickles package's inert scan found
    (:class:`.ranges.PlainTensor`): its values are viewed in place through ``maps``, never
    decoded to be copied; torch and numpy are imported only where a step asks for a
    tensor or an array."""

    plain: PlainTensor
    maps: FileMaps

    def raw_location(self):
        return self.plain.raw()

    def array(self) -> np.ndarray:
        import numpy as np

        p = self.plain
        storage = np.frombuffer(self.maps.view(p.path, p.start, p.nbytes), dtype=np.uint8)
        if p.raw() is not None:
            return storage.reshape(*p.size, p.itemsize)
        strides = (*(st * p.itemsize for st in p.stride), 1)
        view = np.lib.stride_tricks.as_strided(
            storage[p.offset * p.itemsize :], shape=(*p.size, p.itemsize), strides=strides, writeable=False
        )
        return np.ascontiguousarray(view)  # np.array would keep a transposed view's order

    def tensor(self):
        import numpy as np
        import torch

        flat = torch.from_numpy(np.array(self.array()).reshape(-1))
        return flat.view(getattr(torch, self.plain.dtype)).reshape(self.plain.size)


@dataclass
class TorchChunk(ChunkSource):
    """A ``torch.save(tensor)`` blob: ``rng`` of a ``.distcp`` file.

    A plain dense tensor (what DCP writes) is read without torch: its layout by the
    pickles package's inert scan (:func:`.ranges.plain_tensor`), then a
    :class:`PlainChunk`. Anything else goes through ``torch.load(weights_only=True)``.
    """

    rng: ByteRange
    dtype: str
    sizes: tuple[int, ...]
    transforms: tuple[str, ...] = ()
    maps: FileMaps | None = None
    _raw: tuple[str, int, int] | None = field(default=None, repr=False)
    _probed: bool = field(default=False, repr=False)
    _plain: PlainChunk | None = field(default=None, repr=False)

    def _refuse_transforms(self) -> None:
        if self.transforms:
            raise InputError(
                f"{self.rng.what}: stored through DCP stream transform {', '.join(self.transforms)}, "
                "which wsurgery does not read",
                hint="re-save the checkpoint without _extensions",
            )

    def _mismatch(self, dtype: str, shape) -> InputError:
        return InputError(
            f"{self.rng.what}: the chunk holds a {dtype} tensor of shape {list(shape)}, "
            f"the metadata says {self.dtype} {list(self.sizes)}"
        )

    def _probe(self) -> None:
        """Find the chunk's layout without torch when it is a plain tensor; checked."""
        if self._probed:
            return
        self._refuse_transforms()
        plain = plain_tensor(self.rng)
        if plain is None:
            self._load()
            return
        if plain.numel * plain.itemsize > plain.nbytes:
            raise InputError(f"{self.rng.what}: the chunk is a view larger than its storage (an expanded tensor)")
        if plain.dtype != self.dtype or plain.size != self.sizes:
            raise self._mismatch(plain.dtype, plain.size)
        self._plain = PlainChunk(plain, self.maps if self.maps is not None else FileMaps())
        self._raw, self._probed = plain.raw(), True

    def _load(self):
        self._refuse_transforms()
        got = load_tensor(self.rng)
        t = got.tensor
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise InputError(f"{self.rng.what}: the chunk is a view larger than its storage (an expanded tensor)")
        name = str(t.dtype).removeprefix("torch.")
        if name != self.dtype or tuple(t.shape) != self.sizes:
            raise self._mismatch(name, t.shape)
        self._raw, self._probed = got.raw, True
        return t

    def raw_location(self):
        self._probe()
        return self._raw

    def tensor(self):
        self._probe()
        return self._load() if self._plain is None else self._plain.tensor()

    def write_to(self, f) -> None:
        self._probe()
        if self._raw is not None:
            path, offset, nbytes = self._raw
            copy_range(path, offset, nbytes, f)
        else:
            import numpy as np

            write_all(f, np.ascontiguousarray(self.array()).reshape(-1))

    def array(self) -> np.ndarray:
        self._probe()
        if self._plain is None:
            return _uint8(self._load()).numpy().reshape(*self.sizes, BY_NAME[self.dtype].itemsize)
        return self._plain.array()


def _uint8(t):
    """A tensor's bytes as a flat ``uint8`` tensor (a view when it is contiguous)."""
    import torch

    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


@dataclass
class SafetensorsChunk(ChunkSource):
    """One tensor of a safetensors file (DCP's Hugging Face layout)."""

    file: SafetensorsFile
    name: str

    def raw_location(self):
        offset, nbytes = self.file.absolute_range(self.name)
        return self.file.path, offset, nbytes

    def array(self) -> np.ndarray:
        import numpy as np

        rec = self.file.tensors[self.name]
        raw = np.frombuffer(self.file.raw(self.name), dtype=np.uint8)
        return raw.reshape(*rec.shape, BY_NAME[rec.dtype].itemsize)

    def tensor(self):
        import torch

        rec = self.file.tensors[self.name]
        buf = torch.empty(rec.nbytes, dtype=torch.uint8)
        if rec.nbytes:
            self.file.read_into(self.name, buf.numpy())
        return buf.view(getattr(torch, rec.dtype)).reshape(rec.shape)


# ----------------------------------------------------------------------------- plans


@dataclass
class TensorPlan:
    """A tensor of a distributed checkpoint: dtype, global shape, and its chunks."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: list[tuple[Chunk, ChunkSource]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * BY_NAME[self.dtype].itemsize

    def whole(self) -> ChunkSource | None:
        """The one chunk that is the whole tensor, if there is one."""
        full = [src for c, src in self.chunks if c.sizes == self.shape]
        return full[0] if len(self.chunks) == 1 and full else None

    def runs(self) -> list[ChunkSource] | None:
        """The chunks in the tensor's row-major order when each is one contiguous run of
        its elements (a split along the first dim that is split, as FSDP shards every
        tensor along dim 0 and tensor parallelism a column-parallel weight): the tensor's
        bytes are then the chunks' bytes one after another. None otherwise. The chunks
        tile the tensor (checked at open), so the runs leave no gap."""
        starts = []
        for c, src in self.chunks:
            if not c.numel:
                continue
            split = [d for d, (n, full) in enumerate(zip(c.sizes, self.shape, strict=True)) if n != full]
            if split and any(n != 1 for n in c.sizes[: split[-1]]):
                return None  # rows of several outer slices: not one run
            start, stride = 0, 1
            for o, n in zip(reversed(c.offsets), reversed(self.shape), strict=True):
                start += o * stride
                stride *= n
            starts.append((start, src))
        return [src for _, src in sorted(starts, key=lambda p: p[0])]

    def array(self) -> np.ndarray:
        """The whole tensor's bytes, assembled chunk by chunk: ``uint8`` of shape
        ``(*shape, itemsize)``. Memory holds the result and one chunk."""
        import numpy as np

        one = self.whole()
        if one is not None:
            return one.array()
        out = np.empty((*self.shape, BY_NAME[self.dtype].itemsize), dtype=np.uint8)
        for c, src in self.chunks:
            if c.numel:
                out[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))] = src.array()
        return out

    def tensor(self):
        """The whole tensor, assembled (a single whole chunk is returned as it is loaded)."""
        import torch

        one = self.whole()
        if one is not None:
            return one.tensor()
        flat = torch.from_numpy(self.array().reshape(-1))
        return flat.view(getattr(torch, self.dtype)).reshape(self.shape)


@dataclass
class Resources:
    """What a distributed checkpoint holds open: safetensors maps, decompressed archives."""

    files: list = field(default_factory=list)
    cleanups: list = field(default_factory=list)

    def close(self) -> None:
        for f in self.files:
            f.close()
        for fn in self.cleanups:
            fn()
        self.cleanups.clear()


@dataclass
class Layout:
    """A distributed checkpoint, opened: its tensors, what was skipped, metadata to show,
    the files it reads from, and the resources to release."""

    tensors: dict[str, TensorPlan]
    skipped: list[str]
    metadata: dict[str, str]
    input_files: list[str]
    resources: Resources


# ----------------------------------------------------------------------------- DCP folders


def _check_range(folder: Folder, name: str, loc: Located, offset: int, length: int, what: str) -> None:
    if offset + length > loc.size:
        raise InputError(
            f"{folder.shown(name)}: {what} lies at bytes [{offset}, {offset + length}), past the end of the "
            f"{loc.size}-byte file",
            hint="the checkpoint is truncated, corrupt or hostile",
        )


def open_dcp(folder: Folder, resources: Resources | None = None) -> Layout:
    """Open a DCP folder (``.metadata`` + ``__R_S.distcp``): metadata only, all validated.

    Args:
        folder: the checkpoint folder.
        resources: to share with other parts of one checkpoint (Megatron's common.pt).

    Returns:
        A :class:`Layout` whose tensors read their chunks when asked; bytes items and
        tensors of dtypes safetensors cannot store are in ``skipped``.

    Raises:
        UnsafePickleError: ``.metadata`` names a global outside DCP's metadata classes.
        InputError: malformed metadata, chunks that do not tile their tensor, a storage
            record outside its file, a file name that leaves the folder.

    Example:
        >>> layout = open_dcp(DirFolder("checkpoints/step_100"))  # doctest: +SKIP
        >>> layout.tensors["model.embed.weight"].shape            # doctest: +SKIP
        (32000, 4096)
    """
    res = resources or Resources()
    maps = FileMaps()
    res.files.append(maps)
    where = folder.shown(METADATA_FILE)
    meta = parse_metadata(folder.read(METADATA_FILE, MAX_METADATA_BYTES), where)
    pieces, skipped = validate(meta, where)
    located: dict[str, Located] = {}
    as_safetensors: dict[str, SafetensorsFile | None] = {}
    tensors: dict[str, TensorPlan] = {}
    for name, entry in meta.tensors.items():
        if name not in pieces:
            continue
        chunks: list[tuple[Chunk, ChunkSource]] = []
        for p in pieces[name]:
            if p.file not in located:
                located[p.file] = folder.locate(p.file)
                as_safetensors[p.file] = _whole_safetensors(located[p.file], res)
            loc = located[p.file]
            label = f"chunk {list(p.chunk.offsets)} of {printable(name)!r}"
            sf = as_safetensors[p.file]
            if sf is not None:
                chunks.append((p.chunk, _named_chunk(sf, name, entry.dtype, p.chunk, label)))
                continue
            _check_range(folder, p.file, loc, p.offset, p.length, label)
            need = p.chunk.numel * BY_NAME[entry.dtype].itemsize
            if p.length < need and not p.transforms:
                raise InputError(
                    f"{where}: {label} needs {need} bytes but its storage record holds {p.length}",
                    hint="the checkpoint is corrupt or hostile",
                )
            what = f"{folder.shown(p.file)}[{p.offset}:{p.offset + p.length}] ({label})"
            rng = ByteRange(loc.path, loc.offset + p.offset, p.length, what)
            chunks.append((p.chunk, TorchChunk(rng, entry.dtype, p.chunk.sizes, p.transforms, maps)))
        tensors[name] = TensorPlan(name, entry.dtype, entry.shape, chunks)
    metadata = {"dcp.version": meta.version} if meta.version else {}
    files = {folder.locate(METADATA_FILE).path, *(loc.path for loc in located.values())}
    return Layout(tensors, skipped, metadata, sorted(files), res)


def _whole_safetensors(loc: Located, res: Resources) -> SafetensorsFile | None:
    """A ``.distcp`` file that is a safetensors file, as torch's
    ``FileSystemWriter(serialization_format=SAFETENSORS)`` writes it (its storage records'
    offsets then locate nothing: each chunk is found by name)."""
    if loc.offset != 0 or loc.size < 9:
        return None
    with open(loc.path, "rb") as f:
        if f.read(9)[8:9] != b"{":
            return None
    sf = SafetensorsFile.open(loc.path)
    res.files.append(sf)
    return sf


def _named_chunk(sf: SafetensorsFile, name: str, dtype: str, chunk: Chunk, label: str) -> SafetensorsChunk:
    rec = sf.tensors.get(name)
    if rec is None or rec.dtype != dtype or rec.shape != chunk.sizes:
        found = "nothing" if rec is None else f"a {rec.dtype} tensor of shape {list(rec.shape)}"
        raise InputError(f"{sf.path}: holds {found} under {printable(name)!r}, where the metadata puts {label}")
    info = sharding_info(sf)
    if info is not None and tuple(info[name]["saved_offsets"]) != chunk.offsets:
        raise InputError(f"{sf.path}: {SHARDING_INFO_KEY} places {printable(name)!r} elsewhere than {label}")
    return SafetensorsChunk(sf, name)


# ----------------------------------------------------------------------------- DCP's safetensors layout


def sharding_info(sf: SafetensorsFile) -> dict | None:
    """The ``DCP_SHARDING_INFO`` record of a safetensors file (None when it has none).

    Args:
        sf: a validated safetensors file.

    Returns:
        ``{tensor name: {"saved_offsets": [...]}}`` checked for shape, or None.

    Example:
        >>> sharding_info(SafetensorsFile.open("shard-00001-model-00001-of-00001.safetensors"))  # doctest: +SKIP
        {'w': {'saved_offsets': [0, 0]}}
    """
    text = (sf.metadata or {}).get(SHARDING_INFO_KEY)
    if text is None:
        return None
    try:
        info = json.loads(text)
    except (ValueError, RecursionError):
        info = None
    if not isinstance(info, dict):
        raise InputError(f"{sf.path}: {SHARDING_INFO_KEY} is not a JSON object")
    for name, rec in sf.tensors.items():
        entry = info.get(name)
        offsets = entry.get("saved_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != len(rec.shape)
            or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 1 << 62 for o in offsets)
        ):
            raise InputError(f"{sf.path}: {SHARDING_INFO_KEY} has no valid saved_offsets for {printable(name)!r}")
    return info


def open_dcp_safetensors(folder: Folder, names: list[str]) -> Layout:
    """Open DCP's safetensors layout: safetensors files whose ``DCP_SHARDING_INFO`` metadata
    places each tensor as a chunk (``saved_offsets``) of a global tensor, as torch's
    ``HuggingFaceStorageWriter`` writes them. The global shape is the chunks' extent.

    Args:
        folder: the checkpoint folder (a directory).
        names: its safetensors files.

    Returns:
        A :class:`Layout`; headers only are read.

    Raises:
        InputError: a header breaks a safetensors rule, the sharding info is missing or
            malformed, a tensor's chunks disagree on dtype or do not tile it.

    Example:
        >>> names = ["shard-00001-model-00001-of-00001.safetensors"]
        >>> layout = open_dcp_safetensors(DirFolder("hf_dcp"), names)  # doctest: +SKIP
    """
    res = Resources()
    found: dict[str, list[tuple[Chunk, SafetensorsChunk, str]]] = {}
    paths = []
    try:
        for fname in names:
            loc = folder.locate(fname)
            sf = SafetensorsFile.open(loc.path)
            res.files.append(sf)
            paths.append(loc.path)
            info = sharding_info(sf)
            if info is None:
                raise InputError(f"{folder.shown(fname)}: no {SHARDING_INFO_KEY} metadata beside other DCP shards")
            for name, rec in sf.tensors.items():
                chunk = Chunk(tuple(info[name]["saved_offsets"]), rec.shape)
                found.setdefault(name, []).append((chunk, SafetensorsChunk(sf, name), rec.dtype))
        tensors: dict[str, TensorPlan] = {}
        for name, parts in found.items():
            dtypes = {d for _, _, d in parts}
            if len(dtypes) != 1:
                raise InputError(f"{folder.root}: the chunks of {printable(name)!r} have dtypes {sorted(dtypes)}")
            ndims = {len(c.offsets) for c, _, _ in parts}
            if len(ndims) != 1:
                raise InputError(f"{folder.root}: the chunks of {printable(name)!r} disagree on the number of dims")
            shape = tuple(max(c.offsets[d] + c.sizes[d] for c, _, _ in parts) for d in range(ndims.pop()))
            why = tiling_problem(shape, [c for c, _, _ in parts])
            if why:
                raise InputError(f"{folder.root}: tensor {printable(name)!r} {list(shape)}: {why}",
                                 hint="a shard is missing, or the checkpoint is corrupt or hostile")  # fmt: skip
            tensors[name] = TensorPlan(name, dtypes.pop(), shape, [(c, s) for c, s, _ in parts])
    except BaseException:
        res.close()
        raise
    return Layout(tensors, [], {}, paths, res)


# ----------------------------------------------------------------------------- Megatron-Core / NeMo 2


def megatron_metadata(folder: Folder) -> dict:
    """Megatron-Core's ``metadata.json``, checked: a ``torch_dist`` sharded backend.

    Args:
        folder: a Megatron-Core distributed checkpoint folder.

    Returns:
        The parsed JSON object.

    Raises:
        InputError: not JSON, or another backend (``zarr``), which wsurgery does not read.

    Example:
        >>> megatron_metadata(DirFolder("iter_0000100"))["sharded_backend"]  # doctest: +SKIP
        'torch_dist'
    """
    where = folder.shown(MEGATRON_METADATA)
    try:
        obj = json.loads(folder.read(MEGATRON_METADATA, 1 << 20).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{where}: not UTF-8 JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("sharded_backend"), str):
        raise InputError(f"{where}: no sharded_backend: not a Megatron-Core distributed checkpoint")
    backend = obj["sharded_backend"]
    if backend != "torch_dist":
        raise InputError(
            f"{where}: sharded backend {printable(backend)!r}: wsurgery reads torch_dist checkpoints only",
            hint="convert it with Megatron-Core's dist_checkpointing to the torch_dist backend",
        )
    if not folder.exists(METADATA_FILE):
        raise InputError(f"{folder.root}: a torch_dist checkpoint without its DCP {METADATA_FILE}")
    return obj
