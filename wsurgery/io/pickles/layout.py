"""Where a torch file's pieces lie: the zip or legacy archive, validated before anything loads it.

:func:`scan` runs the inert interpreter over the file's pickle(s), records every storage
the pickle claims, and returns a :class:`Layout`: the pickle and each storage's bytes.
Invariants:

- nothing the pickle names is imported or called, and no claimed size is allocated;
- every claimed storage is backed by exactly ``numel x itemsize`` bytes inside the file:
  an uncompressed zip entry ``data/<key>``, or a legacy record whose size field agrees;
  a key claimed twice is claimed with the same size and type;
- zip entries do not repeat a name, overlap, lie outside the file or the archive
  folder, nor are encrypted; a deflated entry claims to inflate to at most
  ``MAX_INFLATED_RECORD``; Python's zip reader and torch's see the same entries at the
  same offsets, and data.pkl is read through torch's reader, as torch.load will read it;
- every failure is an InputError (or the allow-list's UnsafePickleError) naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
from dataclasses import dataclass

from ...errors import InputError
from .allowlist import ClaimedStorage, Resolver, is_int
from .interpreter import Malformed, Placeholder, Source, StorageType, Unpickler, budget_for, first_line, short

MAX_INFLATED_RECORD = 256 << 20  # a compressed (non-tensor) zip entry may inflate to at most this
_DEFLATE_MAX_RATIO = 1032  # deflate cannot inflate more than this per compressed byte
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


# ----------------------------------------------------------------------------- storage claims


@dataclass(frozen=True)
class _Claim:
    """A storage the pickle asks for: ``key`` with ``nbytes`` of ``dtype_name``."""

    key: str
    dtype_name: str
    itemsize: int
    nbytes: int
    view: tuple | None = None  # legacy (view_key, offset, numel)

    @property
    def seen_bytes(self) -> int:
        """The bytes a tensor over this claim can reach: the legacy view's, or the storage's."""
        return self.nbytes if self.view is None else self.view[2] * self.itemsize


def storage_claim(pid, legacy: bool) -> _Claim | None:
    """Validate a persistent id; ``None`` for a legacy ``module`` id (source of a pickled class)."""
    if not isinstance(pid, tuple) or not pid:
        raise Malformed(f"a persistent id is a {short(pid)}, not a tuple")
    kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
    if legacy and kind == "module":
        return None
    if kind != "storage":
        raise Malformed(f"a persistent id of kind {short(kind)} (only storages are read)")
    if len(pid) != (6 if legacy else 5):
        raise Malformed(f"a storage persistent id has {len(pid)} fields")
    stype, key, location, numel = pid[1:5]
    if not isinstance(stype, StorageType):
        raise Malformed(f"a storage of unknown type {short(stype)}")
    if not isinstance(key, str) or not key or len(key) > 256:
        raise Malformed(f"a storage key {short(key)}")
    if not isinstance(location, (str, bytes)):
        raise Malformed(f"a storage location {short(location)}")
    if not is_int(numel) or numel < 0 or numel.bit_length() > 62:
        raise Malformed(f"storage {key!r} claims {short(numel)} elements")
    view = None
    if legacy and pid[5] is not None:
        v = pid[5]
        if not (isinstance(v, tuple) and len(v) == 3 and isinstance(v[0], str) and is_int(v[1]) and is_int(v[2])):
            raise Malformed(f"storage {key!r} has a malformed view record")
        if v[1] < 0 or v[2] < 0 or v[1] + v[2] > numel:
            raise Malformed(f"storage view {short(v[0])} lies outside storage {key!r}")
        view = v
    return _Claim(key, stype.dtype_name, stype.itemsize, numel * stype.itemsize, view)


class _Claims:
    """The persistent-id hook of the scan: records every storage the pickle asks for."""

    def __init__(self, legacy: bool):
        self.legacy = legacy
        self.by_key: dict[str, _Claim] = {}

    def __call__(self, pid):
        claim = storage_claim(pid, self.legacy)
        if claim is None:
            return Placeholder("a pickled module's source")
        seen = self.by_key.get(claim.key)
        if seen is not None and (seen.nbytes, seen.dtype_name) != (claim.nbytes, claim.dtype_name):
            raise Malformed(f"storage {claim.key!r} is claimed twice with different sizes or types")
        self.by_key.setdefault(claim.key, claim)
        return ClaimedStorage(claim.seen_bytes, claim.itemsize, claim.key if claim.view is None else "",
                              claim.dtype_name)  # fmt: skip


# ----------------------------------------------------------------------------- archives


@dataclass
class Layout:
    """Where a torch file's pieces lie, validated: the pickle and each storage's bytes."""

    path: str
    size: int
    zip: bool
    pickle_bytes: bytes | None  # zip: data.pkl; legacy: read on demand from pickle_span
    pickle_span: tuple[int, int]  # legacy: [start, end) of the main pickle in the file
    records: dict[str, tuple[int, int]]  # storage key -> (absolute offset, nbytes)
    claims: dict[str, _Claim]
    big_endian: bool
    placeholders: list[str]  # globals the scan saw that are not allow-listed by torch
    value: object = None  # what the (zip) pickle scanned to: inert placeholders, ScannedTensors
    named: frozenset[str] = frozenset()  # every global the (zip) pickle names


def bad(path, rule: str) -> InputError:
    return InputError(
        f"{path}: invalid torch checkpoint: {rule}", hint="the file is corrupt or was not written by torch.save"
    )


def _scan(path: str, src: Source, claims: _Claims, file_size: int):
    """Run the inert interpreter over one pickle; returns (value, resolver)."""
    resolver = Resolver(path, calls=False, file_size=file_size)
    try:
        value = Unpickler(src, resolver, claims, budget=budget_for(file_size), on_build=resolver.on_build).load()
    except Malformed as exc:
        raise bad(path, str(exc)) from None
    except (RecursionError, MemoryError):
        raise bad(path, "the pickle is too deeply nested or too large") from None
    return value, resolver


def _local_data_offset(f, info: zipfile.ZipInfo, size: int, path) -> int:
    if info.header_offset < 0 or info.header_offset + 30 > size:
        raise bad(path, f"zip entry {short(info.filename)} starts outside the file")
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise bad(path, f"zip entry {short(info.filename)} has no local header")
    n, m = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + n + m


def _zip_layout(path: str, f, size: int | None = None, torch_reader: bool = True) -> Layout:
    """Validate a zip-format torch file read through ``f`` (``size`` bytes; the file's
    own size when None). ``torch_reader=False`` reads data.pkl with Python's zip reader
    alone: for a caller that will read the storages itself, never through torch."""
    size = os.fstat(f.fileno()).st_size if size is None else size
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error,
            NotImplementedError, KeyError, IndexError, OverflowError) as exc:  # fmt: skip
        raise bad(path, f"not a readable zip archive ({first_line(exc)})") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise bad(path, f"zip entry {short(n)} appears twice")
            seen.add(n)
        spans = []
        entries: dict[str, tuple[int, int, zipfile.ZipInfo]] = {}
        for info in infos:
            if info.flag_bits & 0x1:
                raise bad(path, f"zip entry {short(info.filename)} is encrypted")
            start = _local_data_offset(f, info, size, path)
            if start + info.compress_size > size:
                raise bad(
                    path,
                    f"zip entry {short(info.filename)} claims {info.compress_size} bytes past the end of the file",
                )
            if info.compress_type == zipfile.ZIP_STORED:
                if info.file_size != info.compress_size:
                    raise bad(path, f"stored zip entry {short(info.filename)} has two sizes")
            elif info.compress_type == zipfile.ZIP_DEFLATED:
                if info.file_size > min(MAX_INFLATED_RECORD, _DEFLATE_MAX_RATIO * info.compress_size + 64):
                    raise bad(path, f"zip entry {short(info.filename)} claims to inflate to {info.file_size} bytes")
            else:
                raise bad(path, f"zip entry {short(info.filename)} uses unsupported compression {info.compress_type}")
            spans.append((info.header_offset, start + info.compress_size, info.filename))
            entries[info.filename] = (start, info.file_size, info)
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise bad(path, f"zip entries {short(a)} and {short(b)} overlap")

        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if any(n.endswith("constants.pkl") for n in names):
            raise InputError(
                f"{path}: a TorchScript archive (torch.jit.save) holds code, not a state dict",
                hint="load it with torch.jit.load where you trust it and save model.state_dict()",
            )
        if len(pkls) != 1:
            raise bad(path, "no single <archive>/data.pkl entry" if not pkls else "several data.pkl entries")
        prefix = pkls[0][: -len("data.pkl")]
        stray = [n for n in names if not n.startswith(prefix)]
        if stray:
            raise bad(path, f"zip entry {short(stray[0])} lies outside the archive folder {short(prefix)}")
        rel = {n[len(prefix) :]: v for n, v in entries.items()}
        big_endian = False
        if "byteorder" in rel:
            order = _read_small(zf, rel["byteorder"][2], path)
            if order not in (b"little", b"big"):
                raise bad(path, f"unknown byte order {short(order)}")
            big_endian = order == b"big"

        if not torch_reader:
            pickle_bytes = _read_pickle(zf, rel["data.pkl"][2], path)
    if torch_reader:
        pickle_bytes = _torch_reader_agrees(path, rel)
    claims = _Claims(legacy=False)
    value, resolver = _scan(path, Source(pickle_bytes), claims, size)
    records: dict[str, tuple[int, int]] = {}
    for key, claim in claims.by_key.items():
        entry = rel.get(f"data/{key}")
        if entry is None:
            raise bad(path, f"storage {key!r} has no zip entry data/{key}")
        start, nbytes, info = entry
        if info.compress_type != zipfile.ZIP_STORED:
            raise bad(path, f"storage {key!r} is compressed; torch.save stores tensor data uncompressed")
        if nbytes != claim.nbytes:
            raise bad(
                path,
                f"storage {key!r} claims {claim.nbytes} bytes ({claim.nbytes // claim.itemsize} x {claim.dtype_name})"
                f" but its zip entry holds {nbytes}",
            )
        records[key] = (start, nbytes)
    return Layout(path, size, True, pickle_bytes, (0, 0), records, claims.by_key, big_endian,
                  sorted(resolver.placeholders), value, frozenset(resolver.named))  # fmt: skip


def _read_pickle(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path) -> bytes:
    if info.file_size > MAX_INFLATED_RECORD:
        raise bad(path, f"data.pkl claims {info.file_size} bytes")
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise bad(path, f"data.pkl is unreadable ({first_line(exc)})") from None


def scan_zip(path: str, f, size: int) -> Layout:
    """Validate a zip-format torch file that ``f`` reads (``size`` bytes), without torch.

    For a caller that reads the storages itself (a DCP chunk): the same checks as
    :func:`scan`, except that torch's zip reader is not consulted, since torch will not
    read the file. ``path`` names the file in messages.

    Example:
        >>> layout = scan_zip("ckpt/__0_0.distcp[2522:4099]", view, 1577)  # doctest: +SKIP
    """
    try:
        return _zip_layout(path, f, size, torch_reader=False)
    except (ValueError, struct.error, OSError):
        raise InputError(f"{path}: the file changed while it was read") from None


def _read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path) -> bytes:
    if info.file_size > 64:
        raise bad(path, f"zip entry {short(info.filename)} is larger than expected")
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise bad(path, f"zip entry {short(info.filename)} is unreadable ({first_line(exc)})") from None


def _torch_reader_agrees(path: str, rel: dict) -> bytes:
    """Open the archive with torch's own reader, check it sees the same entries at the same
    offsets as the validation did, and return data.pkl as torch will unpickle it."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(path)
        records = set(reader.get_all_records())
        if records != set(rel):
            odd = sorted(records ^ set(rel))[0]
            raise bad(path, f"zip readers disagree about entry {short(odd)}")
        for name, (start, nbytes, info) in rel.items():
            if info.compress_type == zipfile.ZIP_STORED and (
                reader.get_record_offset(name) != start  # type: ignore[attr-defined]  # missing from torch's stubs
                or reader.get_record_size(name) != nbytes
            ):
                raise bad(path, f"zip readers disagree about where entry {short(name)} lies")
        if reader.get_record_size("data.pkl") != rel["data.pkl"][1]:
            raise bad(path, "zip readers disagree about the size of data.pkl")
        data = reader.get_record("data.pkl")
    except RuntimeError as exc:
        raise bad(path, f"not a readable torch archive ({first_line(exc)})") from None
    return bytes(data)


def _legacy_layout(path: str, f) -> Layout:
    """The legacy (non-zip) layout: magic, protocol, sys_info, main pickle, storage keys, data.

    Every bound is checked against the mapping's length, not a size taken before it: a
    file that shrank meanwhile is refused like a truncated one."""
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        size = len(view)
        src = Source(view)
        magic, _ = _scan(path, src, _Claims(legacy=True), size)
        if magic != _LEGACY_MAGIC:
            raise bad(path, "wrong magic number for the legacy torch format")
        proto, _ = _scan(path, src, _Claims(legacy=True), size)
        if proto != _LEGACY_PROTOCOL:
            raise bad(path, f"legacy protocol version {short(proto)}")
        sys_info, _ = _scan(path, src, _Claims(legacy=True), size)
        big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
        start = src.pos
        claims = _Claims(legacy=True)
        _, resolver = _scan(path, src, claims, size)
        span = (start, src.pos)
        keys, _ = _scan(path, src, _Claims(legacy=True), size)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise bad(path, "the storage key list is not a list of strings")
        listed = set(keys)
        if len(listed) != len(keys):
            raise bad(path, "a storage key is listed twice")
        roots = claims.by_key
        missing = [k for k in roots if k not in listed]
        if missing:
            raise bad(path, f"storage {missing[0]!r} has no data in the file")
        records: dict[str, tuple[int, int]] = {}
        offset = src.pos
        for key in keys:
            claim = roots.get(key)
            if claim is None:
                raise bad(path, f"data for storage {short(key)}, which the pickle never uses")
            if offset + 8 > size:
                raise bad(path, f"storage {key!r} starts past the end of the file")
            (numel,) = struct.unpack_from("<q", view, offset)
            if numel < 0 or numel * claim.itemsize != claim.nbytes:
                raise bad(path, f"storage {key!r}: the pickle claims {claim.nbytes} bytes, the data record {numel} x "
                                 f"{claim.itemsize}")  # fmt: skip
            if offset + 8 + claim.nbytes > size:
                raise bad(path, f"storage {key!r} runs {offset + 8 + claim.nbytes - size} bytes past the end")
            records[key] = (offset + 8, claim.nbytes)
            offset += 8 + claim.nbytes
    return Layout(path, size, False, None, span, records, claims.by_key, big_endian, sorted(resolver.placeholders))


def scan(path: str, zip_format: bool) -> Layout:
    """Validate a torch file without allocating, importing or calling anything it names."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return _zip_layout(path, f) if zip_format else _legacy_layout(path, f)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, struct.error):  # mmap of a file emptied, or a read past an end that moved
        raise InputError(f"{path}: the file changed while it was read") from None
