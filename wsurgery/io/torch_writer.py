"""Atomic, streaming ``torch.save`` files (the zip format), written without torch.

The layout is torch's own (``torch/serialization.py`` ``_save`` and its zip writer)::

    archive/data.pkl               the state dict, pickle protocol 2
    archive/.format_version        "1"
    archive/.storage_alignment     "64"
    archive/byteorder              "little"
    archive/data/0 ... data/N-1    each storage's raw bytes, uncompressed
    archive/version                "3\\n"
    archive/.data/serialization_id
    central directory (zip64 records where a size or offset needs them)

Every member is stored (no compression), with its data aligned to 64 bytes by an
``FB`` padding field in its local header, as torch writes it; ``torch.load`` (also with
``mmap=True``) and any zip reader read it. The pickle is a dict of
``torch._utils._rebuild_tensor_v2(persistent storage id, offset, shape, strides, False,
OrderedDict())`` (``_rebuild_tensor_v3`` with the dtype for the dtypes torch stores as
untyped storages: uint16/32/64, float8), the persistent id being torch's
``("storage", <Float>Storage, "<key>", "cpu", numel)``: only globals that
``torch.load(weights_only=True)`` allows. Tensors that share a storage name the same key,
so ``torch.load`` gives them shared memory.

Streaming: the pickle is built first (it holds only names, shapes and offsets), then each
storage is written by its item's ``write(f)`` (raw bytes copied in the kernel where they
lie in a file), its CRC-32 computed by reading the bytes just written back in 16 MiB
pieces, and patched into its local header. Memory holds the pickle, one piece and
whatever one item needs to produce its bytes. The same inputs give the same bytes.
"""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import OutputError
from .writer import WriteItem, atomic_file, write_all

ARCHIVE = "archive"
ALIGNMENT = 64
_CRC_CHUNK = 16 << 20
_ZIP64_LIMIT = 0xFFFFFFFF  # a size or offset at or past this needs zip64 records
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, the zip epoch: the same bytes every time
_DOS_TIME = 0

# dtype -> the typed storage class torch pickles (``_rebuild_tensor_v2``)
_TYPED = {
    "float64": "DoubleStorage",
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
    "complex64": "ComplexFloatStorage",
}


@dataclass(frozen=True)
class TorchTensor:
    """One name of the state dict: a view of storage ``storage`` (an index into the
    storages written), in elements of ``dtype``."""

    name: str
    storage: int
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0


# ----------------------------------------------------------------------------- pickle


class _Pickle:
    """Protocol-2 opcodes for the one shape of pickle written here, memoizing globals and
    repeated strings as Python's pickler does."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.memo: dict[tuple, int] = {}

    def _put(self, key) -> None:
        i = len(self.memo)
        self.memo[key] = i
        self.out += b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)

    def _get(self, key) -> bool:
        i = self.memo.get(key)
        if i is None:
            return False
        self.out += b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)
        return True

    def global_(self, module: str, name: str) -> None:
        if not self._get(("g", module, name)):
            self.out += b"c" + f"{module}\n{name}\n".encode("ascii")
            self._put(("g", module, name))

    def str_(self, text: str, memo: bool = False) -> None:
        if memo and self._get(("s", text)):
            return
        data = text.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(data)) + data
        if memo:
            self._put(("s", text))

    def int_(self, n: int) -> None:
        if 0 <= n < 0x100:
            self.out += b"K" + bytes([n])
        elif 0 <= n < 0x10000:
            self.out += b"M" + struct.pack("<H", n)
        elif -0x80000000 <= n <= 0x7FFFFFFF:
            self.out += b"J" + struct.pack("<i", n)
        else:
            data = pickle.encode_long(n)
            self.out += b"\x8a" + bytes([len(data)]) + data

    def ints(self, values: Sequence[int]) -> None:
        if not values:
            self.out += b")"  # EMPTY_TUPLE
            return
        if len(values) > 3:
            self.out += b"("  # MARK
        for v in values:
            self.int_(v)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(values), b"t")

    def tensor(self, t: TorchTensor, key: str, storage_numel: int) -> None:
        v3 = t.dtype not in _TYPED
        self.global_("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")
        self.out += b"(("  # MARK (args), MARK (persistent id)
        self.str_("storage", memo=True)
        if v3:
            self.global_("torch.storage", "UntypedStorage")
        else:
            self.global_("torch", _TYPED[t.dtype])
        self.str_(key, memo=True)
        self.str_("cpu", memo=True)
        self.int_(storage_numel)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.int_(t.offset)
        self.ints(t.shape)
        self.ints(t.strides)
        self.out += b"\x89"  # NEWFALSE: requires_grad
        self.global_("collections", "OrderedDict")
        self.out += b")R"  # EMPTY_TUPLE, REDUCE: backward hooks
        if v3:
            self.global_("torch", t.dtype)
        self.out += b"tR"  # TUPLE, REDUCE

    def state_dict(self, tensors: Sequence[TorchTensor], storages: Sequence[WriteItem], itemsize) -> bytes:
        self.out += b"}"  # EMPTY_DICT
        self._put(("d",))
        for start in range(0, len(tensors), 1000):  # SETITEMS in batches, as pickle does
            self.out += b"("
            for t in tensors[start : start + 1000]:
                s = storages[t.storage]
                numel = s.nbytes if t.dtype not in _TYPED else s.nbytes // itemsize(t.dtype)
                self.str_(t.name)
                self.tensor(t, str(t.storage), numel)
            self.out += b"u"
        self.out += b"."  # STOP
        return bytes(self.out)

    def tree(self, value, slot) -> None:
        """Plain pickle data (dicts, OrderedDicts, lists, tuples, str, int, float, bool,
        None), ``slot(value)`` writing each tensor slot (see ``pickles.structure``)."""
        if isinstance(value, bool):
            self.out += b"\x88" if value else b"\x89"
        elif value is None:
            self.out += b"N"
        elif isinstance(value, int):
            self.int_(value)
        elif isinstance(value, float):
            self.out += b"G" + struct.pack(">d", value)
        elif isinstance(value, str):
            self.str_(value)
        elif isinstance(value, (dict, list, tuple)) and self._get(("obj", id(value))):
            return  # a container met before: the same object again, as torch.save shares it
        elif isinstance(value, dict):
            if isinstance(value, OrderedDict):
                self.global_("collections", "OrderedDict")
                self.out += b")R"
            else:
                self.out += b"}"
            self._put(("obj", id(value)))
            if value:
                self.out += b"("
                for k, v in value.items():
                    self.tree(k, slot)
                    self.tree(v, slot)
                self.out += b"u"
        elif isinstance(value, list):
            self.out += b"]"
            self._put(("obj", id(value)))
            if value:
                self.out += b"("
                for v in value:
                    self.tree(v, slot)
                self.out += b"e"
        elif isinstance(value, tuple):
            self.out += b"("
            for v in value:
                self.tree(v, slot)
            self.out += b"t"
            self._put(("obj", id(value)))
        else:
            slot(value)


def build_tree_pickle(tree, tensors: Sequence[TorchTensor], storages: Sequence[WriteItem]) -> bytes:
    """``data.pkl`` for ``tree`` (a skeleton filled by ``pickles.structure.fill``): its
    plain data as it is, each slot the tensor of its name."""
    from ..dtypes import BY_NAME

    by_name = {t.name: t for t in tensors}
    p = _Pickle()

    def slot(value) -> None:
        t = by_name[value.name]
        s = storages[t.storage]
        numel = s.nbytes if t.dtype not in _TYPED else s.nbytes // BY_NAME[t.dtype].itemsize
        p.tensor(t, str(t.storage), numel)

    p.tree(tree, slot)
    p.out += b"."  # STOP
    return bytes(p.out)


def build_pickle(tensors: Sequence[TorchTensor], storages: Sequence[WriteItem]) -> bytes:
    """``data.pkl`` for ``tensors`` over ``storages`` (storage ``i`` is member ``data/i``)."""
    from ..dtypes import BY_NAME

    return _Pickle().state_dict(tensors, storages, lambda name: BY_NAME[name].itemsize)


# ----------------------------------------------------------------------------- zip


@dataclass
class _Member:
    name: bytes
    offset: int  # of the local header
    size: int
    crc: int


class _ZipStream:
    """Stored (uncompressed) members written one after another, data aligned to 64 bytes;
    zip64 records only where a size or offset needs them."""

    def __init__(self, f):
        self.f = f
        self.members: list[_Member] = []
        self._buf = bytearray(min(_CRC_CHUNK, 1 << 20))

    def _local_header(self, name: bytes, size: int, crc: int) -> bytes:
        offset = self.f.tell()
        zip64 = size >= _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        pad = -(offset + 30 + len(name) + len(extra) + 4) % ALIGNMENT
        extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
        small = 0xFFFFFFFF if zip64 else size
        head = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0, 0, _DOS_TIME, _DOS_DATE, crc, small, small,
            len(name), len(extra),
        )  # fmt: skip
        return head + name + extra

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("utf-8")
        crc = zlib.crc32(data)
        offset = self.f.tell()
        write_all(self.f, self._local_header(raw, len(data), crc))
        write_all(self.f, data)
        self.members.append(_Member(raw, offset, len(data), crc))

    def add_item(self, name: str, item: WriteItem) -> None:
        """A member whose bytes ``item.write(f)`` writes; its CRC is read back from the file."""
        raw = name.encode("utf-8")
        offset = self.f.tell()
        write_all(self.f, self._local_header(raw, item.nbytes, 0))
        start = self.f.tell()
        item.write(self.f)
        written = self.f.tell() - start
        if written != item.nbytes:
            raise OutputError(f"internal error: {item.name!r} wrote {written} bytes, expected {item.nbytes}")
        crc = self._crc_of(start, item.nbytes)
        os.pwrite(self.f.fileno(), struct.pack("<I", crc), offset + 14)
        self.members.append(_Member(raw, offset, item.nbytes, crc))

    def _crc_of(self, start: int, nbytes: int) -> int:
        if len(self._buf) < min(_CRC_CHUNK, nbytes):
            self._buf = bytearray(min(_CRC_CHUNK, nbytes))
        view = memoryview(self._buf)
        fd = self.f.fileno()
        crc = 0
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[: min(len(view), nbytes - done)]], start + done)
            if got <= 0:
                raise OSError(5, "short read of the data just written")
            crc = zlib.crc32(view[:got], crc)
            done += got
        return crc

    def finish(self) -> None:
        cd_start = self.f.tell()
        central = bytearray()
        for m in self.members:
            extra = b""
            size, offset = m.size, m.offset
            if size >= _ZIP64_LIMIT:
                extra += struct.pack("<QQ", size, size)
                size = 0xFFFFFFFF
            if offset >= _ZIP64_LIMIT:
                extra += struct.pack("<Q", offset)
                offset = 0xFFFFFFFF
            if extra:
                extra = struct.pack("<HH", 1, len(extra)) + extra
            version = 45 if extra else 20
            central += struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0, 0, _DOS_TIME, _DOS_DATE, m.crc, size, size,
                len(m.name), len(extra), 0, 0, 0, 0, offset,
            )  # fmt: skip
            central += m.name + extra
        write_all(self.f, central)
        cd_size = len(central)
        count = len(self.members)
        if count >= 0xFFFF or cd_size >= _ZIP64_LIMIT or cd_start >= _ZIP64_LIMIT:
            eocd64 = self.f.tell()
            write_all(self.f, struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_start))
            write_all(self.f, struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
            count16 = min(count, 0xFFFF)
            tail = struct.pack(
                "<IHHHHIIH", 0x06054B50, 0, 0, count16, count16, min(cd_size, 0xFFFFFFFF),
                min(cd_start, 0xFFFFFFFF), 0,
            )  # fmt: skip
        else:
            tail = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_start, 0)
        write_all(self.f, tail)


def _serialization_id(members: Sequence[_Member]) -> str:
    """Two 20-digit numbers from the members' CRCs and sizes, as torch spells its id
    (torch's is random; this one is the same for the same bytes)."""
    h = 0
    total = 0
    for m in members:
        h = ((h * 1000003) ^ m.crc) & 0xFFFFFFFFFFFFFFFF
        total += m.size
    return f"{h:020d}{total & 0xFFFFFFFFFFFFFFFF:020d}"


def write_torch(
    path,
    storages: Sequence[WriteItem],
    tensors: Sequence[TorchTensor],
    progress=None,
    *,
    sync: bool = True,
    tree=None,
) -> None:
    """Write a ``torch.save`` zip file atomically: ``tensors`` (a state dict, in order) over
    ``storages`` (each written once, as ``data/<index>``); with ``tree`` (a filled
    skeleton of the input's structure), that structure with the tensors in their slots.

    ``sync=False`` skips the fsyncs (see :func:`.writer.atomic_file`).
    """
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise OutputError(f"internal error: tensor {dup!r} would be written twice to {path}")
    data_pkl = build_pickle(tensors, storages) if tree is None else build_tree_pickle(tree, tensors, storages)
    with atomic_file(path, sync=sync) as f:
        z = _ZipStream(f)
        z.add(f"{ARCHIVE}/data.pkl", data_pkl)
        z.add(f"{ARCHIVE}/.format_version", b"1")
        z.add(f"{ARCHIVE}/.storage_alignment", str(ALIGNMENT).encode())
        z.add(f"{ARCHIVE}/byteorder", b"little")
        for i, item in enumerate(storages):
            z.add_item(f"{ARCHIVE}/data/{i}", item)
            if progress is not None:
                progress(item.nbytes)
        z.add(f"{ARCHIVE}/version", b"3\n")
        z.add(f"{ARCHIVE}/.data/serialization_id", _serialization_id(z.members).encode())
        z.finish()
