"""safetensors files without torch: strict header validation and lazy raw access.

The file layout is ``u64 little-endian header length N`` + ``N bytes of UTF-8 JSON``
+ the data section. Every rule the reference loader enforces is checked here, and
each broken rule raises :class:`HeaderError` naming the file and the rule:

- the file holds at least the 8-byte prefix, and N fits in the file and is at most
  ``MAX_HEADER_SIZE`` (nothing is allocated from N before that check);
- the header is UTF-8, parses as a JSON object, and has no duplicate keys; names and
  metadata hold no lone surrogate escapes (``"\\ud800"``), which no UTF-8 output can hold;
- every tensor entry has a known dtype, a shape of non-negative integers whose byte
  size does not overflow 2**64 (multiplied step by step, as the reference loader does,
  so a shape of huge numbers costs nothing to refuse), and ``data_offsets``
  ``[start, end]`` with ``0 <= start <= end < 2**64``;
- every shape is one torch can hold (:func:`wsurgery.limits.shape_problem`: at most 64
  dims, sizes, strides and byte size within int64), which the reference loader does
  not ask: ``F64 [0, 2**64-1]`` with 0 bytes is valid there, and no tensor in torch;
- byte size (shape x itemsize) equals ``end - start``;
- sorted by start, the entries tile the data section from 0 with no hole and no
  overlap, and the data section ends exactly at the end of the file;
- ``__metadata__``, when present, maps strings to strings.

Accepted as valid: an empty checkpoint (``{}``), zero-size tensors, scalars (shape
``[]``), and files that hold only ``__metadata__``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NamedTuple

from ..dtypes import BY_CODE, BY_NAME
from ..errors import HeaderError, InputError, OutputError
from ..limits import INT64_MAX, MAX_DIMS, shape_problem
from ..model import Stored
from ..show import short

MAX_HEADER_SIZE = 100_000_000
_U64_MAX = 2**64 - 1
METADATA_KEY = "__metadata__"


class TensorRecord(NamedTuple):
    """One stored tensor of a safetensors file: where its bytes lie, relative to the data
    section. (A named tuple: a header of a million tensors makes a million of them.)"""

    name: str
    dtype: str  # wsurgery (torch) dtype name
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Header:
    tensors: dict[str, TensorRecord]  # in header order
    metadata: dict[str, str] | None
    header_size: int  # N, the JSON length

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


def reject_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


class DuplicateKey(Exception):
    pass


def _fail(path, rule: str) -> HeaderError:
    return HeaderError(
        f"{path}: invalid safetensors header: {rule}", hint="the file is corrupt or not a safetensors file"
    )


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _unicode(text: str) -> bool:
    """JSON escapes can spell lone surrogates, which no UTF-8 file or terminal can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_entry(path, name: str, entry) -> TensorRecord:
    if not isinstance(entry, dict):
        raise _fail(path, f"entry {name!r} is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise _fail(path, f"entry {name!r} lacks {', '.join(missing)}")
    code = entry["dtype"]
    if not isinstance(code, str) or code not in BY_CODE:
        raise _fail(path, f"entry {name!r} has unknown dtype {code!r}")
    dtype = BY_CODE[code]
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise _fail(path, f"entry {name!r} has a shape that is not a list of integers: {short(shape)}")
    if any(d < 0 for d in shape):
        raise _fail(path, f"entry {name!r} has a negative dimension in shape {short(shape)}")
    # Multiply step by step and stop at the first overflow, as the reference loader does:
    # a shape of huge dimensions must not cost a huge product to refuse.
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
        if d > _U64_MAX or nbytes > _U64_MAX:
            raise _fail(path, f"entry {name!r} shape {short(shape)} overflows the byte size")
    problem = shape_problem(shape, dtype.itemsize)
    if problem:
        raise _fail(path, f"entry {name!r} has shape {short(shape)}, which no torch tensor can have: {problem}")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or offsets[0] < 0
        or offsets[1] < offsets[0]
    ):
        raise _fail(path, f"entry {name!r} has invalid data_offsets {short(offsets)}")
    start, end = offsets
    if end > _U64_MAX:
        raise _fail(path, f"entry {name!r} has data_offsets past 2**64")
    if end - start != nbytes:
        raise _fail(
            path,
            f"entry {name!r}: data_offsets span {end - start} bytes but shape {short(shape)} x {code} needs {nbytes}",
        )
    return TensorRecord(name, dtype.name, tuple(shape), start, end)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _common_entry(name: str, entry) -> TensorRecord | None:
    """The usual valid entry, checked in a few operations (a million entries are fine):
    exactly the three keys, a known dtype, positive sizes of a shape torch holds, offsets
    that span its bytes. Anything else returns None, for :func:`_parse_entry` to judge
    and name."""
    if type(entry) is not dict or len(entry) != 3:
        return None
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if type(code) is not str or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return None
    dtype = BY_CODE.get(code)
    if dtype is None or len(shape) > MAX_DIMS:
        return None
    for d in shape:
        if type(d) is not int or d <= 0:
            return None
    start, end = offsets
    if type(start) is not int or type(end) is not int or start < 0:
        return None
    nbytes = dtype.itemsize * math.prod(shape)  # no 0 size: every stride is at most this
    if nbytes > INT64_MAX or end - start != nbytes:
        return None
    return TensorRecord(name, dtype.name, tuple(shape), start, end)


def parse_header(raw: bytes, file_size: int, path="<bytes>") -> Header:
    """Validate a header. ``raw`` holds at least the first ``8 + N`` bytes of the file."""
    if file_size < 8 or len(raw) < 8:
        raise _fail(path, f"file is {file_size} bytes, shorter than the 8-byte length prefix")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_SIZE:
        raise _fail(path, f"header length {n} exceeds the limit of {MAX_HEADER_SIZE} bytes")
    if 8 + n > file_size:
        raise _fail(path, f"header length {n} runs past the end of the {file_size}-byte file")
    if len(raw) < 8 + n:
        raise _fail(path, "file is truncated inside the header")
    text_bytes = bytes(raw[8 : 8 + n])
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(path, f"header is not UTF-8 (byte {exc.start})") from None
    if not text.startswith("{"):
        raise _fail(path, "header does not start with a JSON object")
    try:
        obj = json.loads(text, object_pairs_hook=reject_duplicates)
    except DuplicateKey as exc:
        raise _fail(path, f"duplicate key {exc.args[0]!r}") from None
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"header is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise _fail(path, "header is not a JSON object")

    metadata = None
    tensors: dict[str, TensorRecord] = {}
    escapes = _SURROGATE_ESCAPE.search(text) is not None  # else every string is valid Unicode
    for key, value in obj.items():
        if escapes and not _unicode(key):
            raise _fail(path, f"name {short(key)} is not valid Unicode (a lone surrogate escape)")
        if key == METADATA_KEY:
            if value is None:
                continue
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise _fail(path, "__metadata__ must map strings to strings")
            bad = next((k for k, v in value.items() if not (_unicode(k) and _unicode(v))), None)
            if bad is not None:
                raise _fail(path, f"__metadata__ entry {short(bad)} is not valid Unicode (a lone surrogate escape)")
            metadata = dict(value)
            continue
        tensors[key] = _common_entry(key, value) or _parse_entry(path, key, value)

    data_size = file_size - 8 - n
    cursor = 0
    for rec in sorted(tensors.values(), key=attrgetter("start", "end")):
        if rec.start != cursor:
            what = "a hole" if rec.start > cursor else "an overlap"
            raise _fail(path, f"data_offsets leave {what} at byte {min(cursor, rec.start)} (entry {rec.name!r})")
        cursor = rec.end
    if cursor != data_size:
        if cursor > data_size:
            raise _fail(
                path, f"tensor data needs {cursor} bytes but the file holds {data_size} after the header (truncated)"
            )
        raise _fail(path, f"{data_size - cursor} trailing bytes after the last tensor")
    return Header(tensors=tensors, metadata=metadata, header_size=n)


def read_header(path) -> Header:
    """Open ``path`` and validate its header; reads only the header bytes."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"file is {size} bytes, shorter than the 8-byte length prefix")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_SIZE or 8 + n > size:
                return parse_header(prefix, size, path)  # raises with the right rule
            raw = prefix + f.read(n)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_header(raw, size, path)


@dataclass
class SafetensorsFile:
    """A validated safetensors file; tensor bytes are reached lazily through a memory map."""

    path: str
    header: Header
    _mmap: mmap.mmap | None = field(default=None, repr=False)
    _file: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, path) -> SafetensorsFile:
        path = os.fspath(path)
        return cls(path=path, header=read_header(path))

    @property
    def tensors(self) -> dict[str, TensorRecord]:
        return self.header.tensors

    @property
    def metadata(self) -> dict[str, str] | None:
        return self.header.metadata

    def absolute_range(self, name: str) -> tuple[int, int]:
        rec = self.header.tensors[name]
        return self.header.data_start + rec.start, rec.nbytes

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            f = open(self.path, "rb")
            try:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file cannot be mapped; cannot happen for a valid one
                f.close()
                raise
            self._file = f
        return self._mmap

    def raw(self, name: str) -> memoryview:
        """Zero-copy view of one tensor's bytes (valid until :meth:`close`)."""
        offset, nbytes = self.absolute_range(name)
        if nbytes == 0:
            return memoryview(b"")
        return memoryview(self._map())[offset : offset + nbytes]

    def read_into(self, name: str, buffer) -> None:
        """Copy one tensor's bytes into a writable buffer of exactly its size."""
        offset, nbytes = self.absolute_range(name)
        view = memoryview(buffer).cast("B")
        if len(view) != nbytes:
            raise ValueError(f"buffer of {len(view)} bytes for a tensor of {nbytes}")
        if nbytes == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(offset)
            got = f.readinto(view)
        if got != nbytes:
            raise InputError(f"{self.path}: file shrank while reading {name!r}")

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive; the map is freed with it
                pass
            self._mmap = None
        if self._file is not None:
            self._file.close()
            self._file = None


def dtype_code(name: str) -> str:
    return BY_NAME[name].code


def build_header(entries, metadata: dict[str, str] | None) -> tuple[bytes, list[tuple[str, int, int]]]:
    """Lay out a header for ``entries`` (name, dtype, shape, nbytes), in the order given.

    Returns the full prefix (length + padded JSON) and ``(name, start, end)`` for each entry.
    The JSON is padded with spaces so the data section starts 8-byte aligned.
    """
    obj: dict[str, object] = {}
    if metadata:
        obj[METADATA_KEY] = dict(metadata)
    layout = []
    cursor = 0
    for name, dtype, shape, nbytes in entries:
        if name == METADATA_KEY:
            raise OutputError(
                f"a tensor named {METADATA_KEY!r} cannot be stored in safetensors, which reserves that key",
                hint="rename that entry of the state dict with torch and save it again",
            )
        obj[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        layout.append((name, cursor, cursor + nbytes))
        cursor += nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    pad = (-len(text)) % 8
    text += b" " * pad
    return struct.pack("<Q", len(text)) + text, layout


class FileStored(Stored):
    """Bytes in a safetensors file, reached lazily."""

    __slots__ = ("file", "record", "name", "dtype", "shape")

    def __init__(self, file: SafetensorsFile, record: TensorRecord, name: str | None = None):
        self.file = file
        self.record = record
        self.name = name or record.name
        self.dtype = record.dtype
        self.shape = record.shape

    def raw_location(self) -> tuple[str, int, int] | None:
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

    def tensor(self, device: Any = "cpu") -> Any:
        import torch

        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        if self.nbytes:
            self.file.read_into(self.record.name, buf.numpy())
        t = buf.view(getattr(torch, self.dtype)).reshape(self.shape)
        return t if str(device) == "cpu" else t.to(device)
