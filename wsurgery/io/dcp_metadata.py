"""DCP's ``.metadata``, read without torch's unpickler: inert stand-ins, then validation.

torch.distributed.checkpoint writes ``.metadata`` with ``pickle.dump`` and reads it with
``pickle.load``: any global runs. wsurgery reads it with the pickles package's opcode
interpreter and a resolver that knows only DCP's metadata classes (:data:`ALLOWED`):
``Metadata``, ``TensorStorageMetadata``, ``ChunkStorageMetadata``,
``BytesStorageMetadata``, ``MetadataIndex``, ``_StorageInfo``, ``StorageMeta``,
``TensorProperties`` and its ``_MEM_FORMAT_ENCODING``, ``torch.Size``, dtypes, the
layout helper, ``pathlib`` paths (a ``checkpoint_id``) and builtin containers. Each is
an inert :class:`~wsurgery.io.pickles.Placeholder` that records its arguments and
state; nothing is imported and nothing is called. Any other global is an
:class:`UnsafePickleError` naming it. The placeholders are then read into plain frozen
dataclasses (:class:`DcpMetadata`), checking every type and value.

:func:`validate` checks the layout before any data is read: every tensor's dtype and
shape, chunk boxes inside the tensor that tile it exactly (no gap, no overlap), one
storage record per chunk, and file names that stay inside the folder. Byte ranges are
checked against the files by the reader that opens them.

Torch is never imported here: ``inspect`` of a DCP folder reads this file only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..dtypes import BY_NAME
from ..errors import InputError, UnsafePickleError
from .folders import safe_relative
from .pickles import Placeholder, refused_global
from .pickles.interpreter import Malformed, Source, Unpickler, printable, short

if TYPE_CHECKING:
    import numpy as np  # imported only to check a layout of many chunks

METADATA_FILE = ".metadata"
MAX_METADATA_BYTES = 1 << 30  # a .metadata larger than this is refused before it is read
MAX_CHUNKS = 10_000_000
# A chunk takes far more than this in any .metadata torch writes (its box, its storage
# record, its index: ~150 bytes); a file that claims more chunks than its size allows
# reuses memoized objects to describe work it does not hold.
MIN_BYTES_PER_CHUNK = 16

_MD = "torch.distributed.checkpoint.metadata."
_FS = "torch.distributed.checkpoint.filesystem."
_CLASSES = {
    _MD + "Metadata": "metadata",
    _MD + "TensorStorageMetadata": "tensor",
    _MD + "ChunkStorageMetadata": "chunk",
    _MD + "BytesStorageMetadata": "bytes",
    _MD + "MetadataIndex": "index",
    _MD + "TensorProperties": "properties",
    _MD + "StorageMeta": "storage_meta",
    _MD + "_MEM_FORMAT_ENCODING": "memory_format",
    _FS + "_StorageInfo": "storage_info",
    "torch.Size": "size",
    "torch.serialization._get_layout": "layout",
    "collections.OrderedDict": "dict",
    "builtins.set": "set",
    "builtins.frozenset": "set",
    "pathlib.Path": "path",
    "pathlib.PosixPath": "path",
    "pathlib.WindowsPath": "path",
    "pathlib.PurePosixPath": "path",
    "pathlib.PureWindowsPath": "path",
    "pathlib._local.PosixPath": "path",
    "pathlib._local.WindowsPath": "path",
}
# Every torch dtype a checkpoint may name (not only those wsurgery stores: others are skipped).
TORCH_DTYPES = frozenset(
    """
    float64 float32 float16 bfloat16 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu
    float4_e2m1fn_x2 complex32 complex64 complex128 int64 int32 int16 int8 uint64 uint32 uint16 uint8 bool
    qint8 quint8 qint32 quint4x2 quint2x4 bits1x8 bits2x4 bits4x2 bits8 bits16 uint1 uint2 uint3 uint4 uint5
    uint6 uint7 int1 int2 int3 int4 int5 int6 int7 double float half cfloat cdouble long int short
    """.split()
)
_LAYOUTS = frozenset({"torch.strided", "torch.sparse_coo", "torch.sparse_csr", "torch.jagged"})
ALLOWED = frozenset(_CLASSES) | {f"torch.{d}" for d in TORCH_DTYPES} | _LAYOUTS


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Chunk:
    """A box of a tensor: ``offsets`` (its corner) and ``sizes``, one of each per dim."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the checkpoint: its dtype (torch name), global shape and chunks."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class StorageInfo:
    """Where one item's bytes lie: ``length`` bytes of ``relative_path`` from ``offset``.

    ``transforms`` are DCP's stream-transform descriptors (``zstandard``...), empty when
    the bytes are stored as they are.
    """

    relative_path: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass
class DcpMetadata:
    """What ``.metadata`` says, as plain data.

    Attributes:
        tensors: name -> tensor entry, in file order.
        byte_entries: names of non-tensor items (pickled objects DCP stores as bytes).
        storage: ``(name, chunk offsets)`` -> storage record (offsets None for bytes items).
        version: DCP's format version (``"1.0.0"``), if recorded.
        save_id: the writer's save id, if recorded.
    """

    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    byte_entries: list[str] = field(default_factory=list)
    storage: dict[tuple[str, tuple[int, ...] | None], StorageInfo] = field(default_factory=dict)
    version: str | None = None
    save_id: str | None = None


# ----------------------------------------------------------------------------- reading


class _Resolver:
    """DCP's metadata classes become inert placeholders; every other global is refused."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, module: str, name: str):
        qualname = printable(f"{module}.{name}")
        if qualname not in ALLOWED or refused_global(module, name):
            raise UnsafePickleError(
                f"{self.path}: refused to unpickle global {qualname}: a DCP metadata file names only DCP's metadata "
                "classes, and wsurgery never imports or runs anything a checkpoint names",
                hint="the checkpoint is corrupt or hostile; load it only where you trust its author",
            )
        return Placeholder(qualname)


def _no_persistent(pid):
    raise Malformed("a persistent id in DCP metadata")


class _Reader:
    """Placeholders to the model: every value is checked for type and range."""

    def __init__(self, path: str, size: int = MAX_METADATA_BYTES):
        self.path = path
        self.nbytes = size

    def bad(self, rule: str) -> InputError:
        return InputError(
            f"{self.path}: invalid DCP metadata: {rule}", hint="the file is corrupt or was not written by DCP"
        )

    def kind(self, value, expected: str, what: str):
        """The placeholder's instance, built from one of DCP's classes of kind ``expected``."""
        if not isinstance(value, Placeholder) or not value.called or _CLASSES.get(value.of) != expected:
            raise self.bad(f"{what} is {short(value)}, not a {expected} record")
        return value

    def state(self, value: Placeholder, what: str) -> dict:
        """The attribute dict a BUILD gave (a dataclass may pickle ``(dict, slots)``)."""
        s = value.state
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], dict):
            s = {**(s[0] or {}), **s[1]}
        if s is None:
            return {}
        if not isinstance(s, dict) or not all(isinstance(k, str) for k in s):
            raise self.bad(f"{what} has state {short(s)}")
        return s

    def integer(self, x, what: str) -> int:
        if not isinstance(x, int) or isinstance(x, bool) or x < 0 or x.bit_length() > 62:
            raise self.bad(f"{what} is {short(x)}, not a non-negative integer below 2**62")
        return x

    def optional_text(self, x, what: str) -> str | None:
        return None if x is None else self.text(x, what)

    def text(self, x, what: str) -> str:
        if not isinstance(x, str):
            raise self.bad(f"{what} is {short(x)}, not a string")
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            raise self.bad(f"{what} {short(x)} is not valid Unicode") from None
        return x

    def size(self, x, what: str) -> tuple[int, ...]:
        """A ``torch.Size`` (or a plain tuple or list) of non-negative integers."""
        if isinstance(x, Placeholder) and x.called and _CLASSES.get(x.of) == "size":
            if len(x.args) != 1:
                raise self.bad(f"{what}: torch.Size with {len(x.args)} arguments")
            x = x.args[0]
        if not isinstance(x, (tuple, list)) or len(x) > 64:
            raise self.bad(f"{what} is {short(x)}, not a size")
        return tuple(self.integer(d, what) for d in x)

    def dtype(self, x, what: str) -> str:
        if not isinstance(x, Placeholder) or x.called or not x.of.startswith("torch."):
            raise self.bad(f"{what} is {short(x)}, not a dtype")
        name = x.of.removeprefix("torch.")
        if name not in TORCH_DTYPES:
            raise self.bad(f"{what} is {short(x)}, not a dtype")
        return {"double": "float64", "float": "float32", "half": "float16", "long": "int64", "int": "int32",
                "short": "int16", "cfloat": "complex64", "cdouble": "complex128"}.get(name, name)  # fmt: skip

    def properties(self, x, what: str) -> str:
        """The dtype of a ``TensorProperties`` (pickled as a 5-tuple by its ``__getstate__``,
        or as an attribute dict by older torch); its other fields are checked and dropped."""
        p = self.kind(x, "properties", what)
        s = p.state
        if isinstance(s, tuple):
            if len(s) != 5:
                raise self.bad(f"{what}: tensor properties of {len(s)} fields")
            dtype, layout, requires_grad, mem, pin = s
        else:
            d = self.state(p, what)
            dtype, layout, mem = d.get("dtype"), d.get("layout"), d.get("memory_format")
            requires_grad, pin = d.get("requires_grad", False), d.get("pin_memory", False)
        for flag in (requires_grad, pin):
            if not isinstance(flag, bool):
                raise self.bad(f"{what}: a tensor property flag is {short(flag)}")
        self.layout(layout, what)
        if mem is not None and not (isinstance(mem, Placeholder) and _CLASSES.get(mem.of) == "memory_format"):
            if not (isinstance(mem, Placeholder) and mem.of.startswith("torch.") and not mem.called):
                raise self.bad(f"{what}: memory format {short(mem)}")
        if isinstance(mem, Placeholder) and mem.called and mem.args not in ((0,), (1,), (2,)):
            raise self.bad(f"{what}: memory format encoding {short(mem.args)}")
        return self.dtype(dtype, what)

    def layout(self, x, what: str) -> None:
        if x is None or isinstance(x, Placeholder) and not x.called and x.of in _LAYOUTS:
            if x is not None and x.of != "torch.strided":
                raise self.bad(f"{what}: layout {x.of} (only dense tensors are read)")
            return
        if not (isinstance(x, Placeholder) and x.called and _CLASSES.get(x.of) == "layout"):
            raise self.bad(f"{what}: layout {short(x)}")
        if x.args != ("torch.strided",):
            raise self.bad(f"{what}: layout {short(x.args[0] if x.args else None)} (only dense tensors are read)")

    def chunk(self, x, ndim: int, what: str) -> Chunk:
        s = self.state(self.kind(x, "chunk", what), what)
        offsets, sizes = self.size(s.get("offsets"), what + " offsets"), self.size(s.get("sizes"), what + " sizes")
        if len(offsets) != ndim or len(sizes) != ndim:
            raise self.bad(f"{what} has {len(offsets)} offsets and {len(sizes)} sizes for a {ndim}-dim tensor")
        return Chunk(offsets, sizes)

    def tensor(self, name: str, x) -> TensorEntry:
        what = f"tensor {printable(name)!r}"
        s = self.state(x, what)
        dtype = self.properties(s.get("properties"), what)
        shape = self.size(s.get("size"), what + " size")
        chunks = s.get("chunks")
        if not isinstance(chunks, list):
            raise self.bad(f"{what} has chunks {short(chunks)}")
        return TensorEntry(name, dtype, shape, tuple(self.chunk(c, len(shape), f"{what} chunk {i}")
                                                     for i, c in enumerate(chunks)))  # fmt: skip

    def storage_info(self, x, what: str) -> StorageInfo:
        s = self.state(self.kind(x, "storage_info", what), what)
        rel = self.text(s.get("relative_path"), what + " relative_path")
        offset, length = (
            self.integer(s.get("offset"), what + " offset"),
            self.integer(s.get("length"), what + " length"),
        )
        transforms = s.get("transform_descriptors") or ()
        if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
            raise self.bad(f"{what} has transform descriptors {short(transforms)}")
        return StorageInfo(rel, offset, length, tuple(transforms))

    def index(self, x, what: str) -> tuple[str, tuple[int, ...] | None]:
        s = self.state(self.kind(x, "index", what), what)
        fqn = self.text(s.get("fqn"), what + " fqn")
        offset = s.get("offset")
        return fqn, None if offset is None else self.size(offset, what + " offset")

    def read(self, root) -> DcpMetadata:
        meta = DcpMetadata()
        s = self.state(self.kind(root, "metadata", "the top-level object"), "the metadata")
        entries = s.get("state_dict_metadata")
        if isinstance(entries, Placeholder) and _CLASSES.get(entries.of) == "dict":
            entries = dict(entries.keys)
        if not isinstance(entries, dict):
            raise self.bad(f"state_dict_metadata is {short(entries)}")
        limit = min(MAX_CHUNKS, max(1, self.nbytes // MIN_BYTES_PER_CHUNK))
        total = 0
        for name, entry in entries.items():
            name = self.text(name, "an item name")
            if isinstance(entry, Placeholder) and _CLASSES.get(entry.of) == "bytes" and entry.called:
                meta.byte_entries.append(name)
            else:
                meta.tensors[name] = self.tensor(name, self.kind(entry, "tensor", f"item {printable(name)!r}"))
                total += len(meta.tensors[name].chunks)
                if total > limit:
                    raise self.bad(
                        f"more than {limit:,} chunks (at most one per {MIN_BYTES_PER_CHUNK} bytes of the file, "
                        f"and {MAX_CHUNKS:,} in all)"
                    )
        storage = s.get("storage_data")
        if not isinstance(storage, dict):
            raise self.bad(f"storage_data is {short(storage)}, not a dict of storage records")
        for i, (key, info) in enumerate(storage.items()):
            idx = self.index(key, f"storage key {i}")
            if idx in meta.storage:
                raise self.bad(f"two storage records for {printable(idx[0])!r} at {idx[1]}")
            meta.storage[idx] = self.storage_info(info, f"storage record of {printable(idx[0])!r}")
        meta.version = self.optional_text(s.get("version"), "version")
        sm = s.get("storage_meta")
        if sm is not None:
            sms = self.state(self.kind(sm, "storage_meta", "storage_meta"), "storage_meta")
            meta.save_id = self.optional_text(sms.get("save_id"), "save_id")
        return meta


def parse_metadata(data, path: str) -> DcpMetadata:
    """Read a ``.metadata`` pickle's bytes into a :class:`DcpMetadata`, importing nothing.

    Args:
        data: the file's bytes (or a read-only buffer over them).
        path: the file, for messages.

    Returns:
        The metadata, every field type-checked (the layout is checked by :func:`validate`).

    Raises:
        UnsafePickleError: the pickle names a global outside DCP's metadata classes.
        InputError: anything malformed.

    Example:
        >>> meta = parse_metadata(open("ckpt/.metadata", "rb").read(), "ckpt/.metadata")  # doctest: +SKIP
        >>> sorted(meta.tensors)                                                           # doctest: +SKIP
        ['model.embed.weight', ...]
    """
    reader = _Reader(path, len(data))
    try:
        root = Unpickler(Source(data), _Resolver(path), _no_persistent).load()
    except Malformed as exc:
        raise reader.bad(str(exc)) from None
    return reader.read(root)


# ----------------------------------------------------------------------------- validation


def _overlap(a: Chunk, b: Chunk) -> bool:
    boxes = zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in boxes)


def tiling_problem(shape: tuple[int, ...], chunks) -> str | None:
    """Why ``chunks`` do not tile a tensor of ``shape`` exactly, or None when they do.

    Every chunk must lie inside the tensor; non-empty chunks must not overlap and must
    cover it. Empty chunks (a zero size) are allowed anywhere inside. The check is exact
    and near n log n in the number of chunks (see :func:`_first_overlap`), so a grid of
    tens of thousands of tiny chunks is checked in well under a second.

    Args:
        shape: the tensor's global shape.
        chunks: its :class:`Chunk` boxes.

    Returns:
        One line naming the first misfit, or None.

    Example:
        >>> tiling_problem((4, 2), [Chunk((0, 0), (2, 2)), Chunk((2, 0), (2, 2))]) is None
        True
    """
    for c in chunks:
        for d, (o, s, n) in enumerate(zip(c.offsets, c.sizes, shape, strict=True)):
            if o + s > n:
                return f"chunk at {list(c.offsets)} of size {list(c.sizes)} exceeds dim {d} ({n})"
    boxes = [c for c in chunks if c.numel > 0]
    pair = _first_overlap(shape, boxes)
    if pair is not None:
        a, b = pair
        return f"chunks at {list(a.offsets)} and {list(b.offsets)} overlap"
    covered, numel = sum(c.numel for c in boxes), math.prod(shape)
    if covered != numel:
        return f"chunks cover {covered} of its {numel} elements (a gap)"
    return None


_GRID_CELLS_PER_CHUNK = 8  # the cell grid is used when it has at most this many cells per chunk
_MIN_GRID_CELLS = 1 << 16
_FEW_BOXES = 32  # up to this many boxes the sweep (a few hundred comparisons) decides, without numpy


def _first_overlap(shape: tuple[int, ...], boxes: list[Chunk]) -> tuple[Chunk, Chunk] | None:
    """Two non-empty boxes (all inside ``shape``) that overlap, or None.

    The boxes' corners cut each dim into intervals, and so the tensor into a grid of
    cells; two boxes overlap exactly when some cell lies in both. When the grid is small
    (at most a few cells per box: any regular sharding, a grid of 1x1x1x1 chunks) every
    box is located by binary search and the cells are counted in one array: n log n plus
    the cells. An irregular layout (a brick wall of differently cut rows) falls back to
    a sweep along the dim with the most distinct corners, comparing a box only with the
    boxes that are still open where it starts; so do a few boxes (a tensor split over
    a few ranks), which then need no numpy."""
    if len(boxes) < 2:
        return None
    ndim = len(shape)
    if ndim == 0:
        return boxes[0], boxes[1]
    if len(boxes) <= _FEW_BOXES:
        return _sweep_overlap(boxes)
    import numpy as np

    cuts = [np.unique(np.array([v for c in boxes for v in (c.offsets[d], c.offsets[d] + c.sizes[d])], dtype=np.int64))
            for d in range(ndim)]  # fmt: skip
    cells = math.prod(len(k) - 1 for k in cuts)
    if cells <= max(_MIN_GRID_CELLS, _GRID_CELLS_PER_CHUNK * len(boxes)):
        return _grid_overlap(cuts, boxes)
    return _sweep_overlap(boxes)


def _grid_overlap(cuts: list[np.ndarray], boxes: list[Chunk]) -> tuple[Chunk, Chunk] | None:
    import numpy as np

    offsets = np.array([c.offsets for c in boxes], dtype=np.int64)
    ends = offsets + np.array([c.sizes for c in boxes], dtype=np.int64)
    lo = np.stack([np.searchsorted(k, offsets[:, d]) for d, k in enumerate(cuts)], axis=1)
    hi = np.stack([np.searchsorted(k, ends[:, d]) for d, k in enumerate(cuts)], axis=1)
    dims = tuple(len(k) - 1 for k in cuts)
    if bool(np.all(hi - lo == 1)):  # every box is one cell: a duplicate cell is an overlap
        flat = np.ravel_multi_index(tuple(lo.T), dims)
        order = np.argsort(flat, kind="stable")
        same = np.flatnonzero(flat[order][1:] == flat[order][:-1])
        if same.size == 0:
            return None
        return boxes[int(order[same[0]])], boxes[int(order[same[0] + 1])]
    count = np.zeros(dims, dtype=np.int32)
    for i in range(len(boxes)):
        region = tuple(slice(int(a), int(b)) for a, b in zip(lo[i], hi[i], strict=True))
        count[region] += 1
    twice = np.flatnonzero(count.reshape(-1) > 1)
    if twice.size == 0:
        return None
    cell = np.array(np.unravel_index(int(twice[0]), dims))
    inside = np.flatnonzero(np.all((lo <= cell) & (cell < hi), axis=1))
    return boxes[int(inside[0])], boxes[int(inside[1])]


def _sweep_overlap(boxes: list[Chunk]) -> tuple[Chunk, Chunk] | None:
    ndim = len(boxes[0].offsets)
    dim = max(range(ndim), key=lambda k: len({c.offsets[k] for c in boxes}))
    active: list[Chunk] = []
    for c in sorted(boxes, key=lambda c: c.offsets[dim]):
        start = c.offsets[dim]
        active = [a for a in active if a.offsets[dim] + a.sizes[dim] > start]
        for a in active:
            if _overlap(a, c):
                return a, c
        active.append(c)
    return None


@dataclass(frozen=True)
class Piece:
    """One chunk and the storage record that holds its bytes (file name checked)."""

    chunk: Chunk
    file: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


def validate(meta: DcpMetadata, where: str) -> tuple[dict[str, list[Piece]], list[str]]:
    """Check the layout of ``meta``; return each tensor's pieces and what was skipped.

    Args:
        meta: parsed metadata.
        where: the ``.metadata`` file, for messages.

    Returns:
        ``(pieces, skipped)``: tensor name -> its chunks with their storage records, for
        every tensor wsurgery reads; and one line per item it does not read (bytes items,
        dtypes safetensors cannot store).

    Raises:
        InputError: a misfit chunk, a missing or stray storage record, a file name that
            leaves the folder, a shape whose byte size overflows.

    Example:
        >>> pieces, skipped = validate(parse_metadata(data, "ckpt/.metadata"), "ckpt/.metadata")  # doctest: +SKIP
    """
    pieces: dict[str, list[Piece]] = {}
    skipped = [f"{printable(n)}: bytes item (a pickled object, not read)" for n in meta.byte_entries]
    names = set(meta.tensors) | set(meta.byte_entries)
    if len(names) != len(meta.tensors) + len(meta.byte_entries):
        raise InputError(f"{where}: invalid DCP metadata: an item is both a tensor and a bytes item")
    for (fqn, offsets), info in meta.storage.items():
        if fqn not in names:
            raise InputError(
                f"{where}: invalid DCP metadata: a storage record for {printable(fqn)!r}, which it does not list"
            )
        if (offsets is None) != (fqn in meta.byte_entries):
            raise InputError(f"{where}: invalid DCP metadata: storage record of {printable(fqn)!r} has the wrong kind")
        safe_relative(info.relative_path, where)
    for name, t in meta.tensors.items():
        label = printable(name)
        dt = BY_NAME.get(t.dtype)
        if dt is None:
            skipped.append(f"{label}: a {t.dtype} tensor (a dtype safetensors cannot store)")
            continue
        if math.prod(t.shape) * dt.itemsize >= 1 << 62:
            raise InputError(f"{where}: invalid DCP metadata: tensor {label!r} of shape {list(t.shape)} is too large")
        why = tiling_problem(t.shape, t.chunks)
        if why:
            raise InputError(f"{where}: invalid DCP metadata: tensor {label!r} {list(t.shape)}: {why}",
                             hint="the checkpoint is corrupt or hostile")  # fmt: skip
        mine = []
        for c in t.chunks:
            found = meta.storage.get((name, c.offsets))
            if found is None:
                if c.numel == 0:
                    continue
                raise InputError(
                    f"{where}: invalid DCP metadata: chunk at {list(c.offsets)} of {label!r} has no storage record"
                )
            rel = safe_relative(found.relative_path, where)
            mine.append(Piece(c, rel, found.offset, found.length, found.transforms))
        pieces[name] = mine
    return pieces, skipped
