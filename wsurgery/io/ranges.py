"""torch.save files that lie inside bigger files: a DCP chunk (a byte range of a
``.distcp`` file), a ``.nemo`` archive's ``model_weights.ckpt`` (a tar member).

Such a file goes through exactly the checks of any torch file (the pickles package's
:func:`~wsurgery.io.pickles.scan`, then ``torch.load(weights_only=True)``, or
:func:`~wsurgery.io.pickles.load_pickle` with its restricted fallback), which read
a file by path. So the range is *staged*: a private scratch file (an in-memory
``memfd`` on Linux, a temporary file elsewhere or when large) that holds the range's
bytes, except that the payload of every large stored ``data/<key>`` zip entry is left
as a hole with a 16-byte random tag at its start. The checks and the load run on the
scratch file, which holds everything they read (zip directory, ``data.pkl``, small
records); torch maps the storages without reading them. Then each tensor whose storage
starts with a tag is *relocated*: rebuilt, with the same dtype, size, stride and offset,
over a private read-only mapping of the tagged bytes in the original file. Nothing of
the payloads is copied, so a multi-GB member costs a few pages of memory.

Invariants:

- everything torch or the scan interprets is read from the scratch file; only payload
  bytes come from the original, and only for storages whose tag, byte size and offset
  match a record the scan validated;
- a legacy (non-zip) file, or a big-endian one, is staged whole (bounded by the range);
- error messages name the range (``ckpt/__0_0.distcp[2522:4099]``), never the scratch file.

Most such files need no torch at all: :func:`plain_tensor` (a DCP chunk) and
:func:`plain_state` (Megatron's ``common.pt``, a ``.nemo``'s weights) find where plain
tensors lie by the pickles package's inert scan alone, and their values are viewed in
place (:class:`FileMaps`); staging and torch's loader are for everything else.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InputError, WsurgeryError
from .folders import PositionedReader

if TYPE_CHECKING:
    from .pickles.layout import Layout

TAG_BYTES = 16
MIN_TAGGED = 64  # payloads smaller than this are copied into the scratch file as they are
MAX_IN_MEMORY = 64 << 20  # scratch files holding more than this go to a temporary file on disk
_COPY = 8 << 20


@dataclass(frozen=True)
class ByteRange:
    """``length`` bytes of ``path`` from ``offset``; ``what`` names it in messages."""

    path: str
    offset: int
    length: int
    what: str


@dataclass
class RangeTensor:
    """A tensor loaded from a range, and where its bytes lie verbatim in the original
    file (``(path, offset, nbytes)``), when they do: contiguous, little-endian, the whole
    storage."""

    tensor: object
    raw: tuple[str, int, int] | None


class _View(PositionedReader):
    """A seekable, read-only file object over a byte range (for Python's zip reader)."""

    def __init__(self, fd: int, offset: int, length: int):
        self.fd, self.base, self.length, self.pos = fd, offset, length, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos)
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.length - self.pos))
        data = os.pread(self.fd, n, self.base + self.pos) if n else b""
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _payloads(fd: int, rng: ByteRange) -> list[tuple[int, int]]:
    """``(start, size)`` of each large stored ``<archive>/data/<key>`` payload, by Python's
    zip reader; disjoint and inside the range. Anything odd is left untagged (and so
    copied): the scan on the scratch file has the last word."""
    try:
        infos = zipfile.ZipFile(_View(fd, rng.offset, rng.length)).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error,
            NotImplementedError, KeyError, IndexError, OverflowError) as exc:  # fmt: skip
        raise InputError(f"{rng.what}: invalid torch checkpoint: not a readable zip archive ({exc})") from None
    found = []
    for info in infos:
        parts = info.filename.split("/")
        if len(parts) < 3 or parts[-2] != "data" or info.compress_type != zipfile.ZIP_STORED:
            continue
        if info.file_size < MIN_TAGGED or info.file_size != info.compress_size or info.header_offset < 0:
            continue
        head = os.pread(fd, 30, rng.offset + info.header_offset) if info.header_offset + 30 <= rng.length else b""
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            continue
        start = info.header_offset + 30 + sum(struct.unpack("<HH", head[26:30]))
        if start + info.file_size <= rng.length:
            found.append((start, info.file_size))
    found.sort()
    disjoint = [p for i, p in enumerate(found) if (i == 0 or found[i - 1][0] + found[i - 1][1] <= p[0])
                and (i + 1 == len(found) or p[0] + p[1] <= found[i + 1][0])]  # fmt: skip
    return disjoint


class _Scratch:
    """The staged copy of a range: a path for the checks and torch, and the tags."""

    def __init__(self, rng: ByteRange, src: int, holes: list[tuple[int, int]]):
        import secrets  # staging only: a plain chunk or state never gets here
        import tempfile

        self.tags: dict[bytes, tuple[int, int]] = {}
        kept = rng.length - sum(n for _, n in holes)
        self._unlink: str | None = None
        if hasattr(os, "memfd_create") and kept <= MAX_IN_MEMORY and os.path.isdir("/proc/self/fd"):
            self.fd = os.memfd_create("wsurgery-range", os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self.fd}"
        else:
            fd, self.path = tempfile.mkstemp(prefix=".wsurgery-range-", suffix=".pt")
            self.fd, self._unlink = fd, self.path
        try:
            os.ftruncate(self.fd, rng.length)
            cursor = 0
            for start, size in [*holes, (rng.length, 0)]:
                self._copy(src, rng, cursor, start)
                if size:
                    tag = secrets.token_bytes(TAG_BYTES)
                    self.tags[tag] = (start, size)
                    os.pwrite(self.fd, tag, start)
                cursor = start + size
        except OSError as exc:
            self.close()
            raise InputError(f"{rng.what}: cannot stage the range for its checks: {exc.strerror or exc}") from None

    def _copy(self, src: int, rng: ByteRange, start: int, stop: int) -> None:
        while start < stop:
            data = os.pread(src, min(_COPY, stop - start), rng.offset + start)
            if not data:
                raise InputError(f"{rng.what}: the file ended early (was it changed meanwhile?)")
            os.pwrite(self.fd, data, start)
            start += len(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self._unlink:
            with contextlib.suppress(OSError):
                os.unlink(self._unlink)


def _open_range(rng: ByteRange) -> int:
    """A descriptor of ``rng``'s file, which holds the whole range (else an input error)."""
    try:
        fd = os.open(rng.path, os.O_RDONLY)
    except OSError as exc:
        raise InputError(f"{rng.what}: cannot read: {exc.strerror or exc}") from None
    try:
        if rng.offset + rng.length > os.fstat(fd).st_size:
            raise InputError(f"{rng.what}: the range runs past the end of {rng.path}")
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _staged(rng: ByteRange, *, whole: bool = False):
    src = _open_range(rng)
    try:
        head = os.pread(src, 4, rng.offset)
        is_zip = head[:2] == b"PK"
        holes = _payloads(src, rng) if is_zip and not whole else []
        scratch = _Scratch(rng, src, holes)
    finally:
        os.close(src)
    try:
        yield scratch, is_zip
    finally:
        scratch.close()


def _renamed(exc: WsurgeryError, scratch: str, what: str) -> WsurgeryError:
    """The same error, naming the range instead of the scratch file."""
    try:
        return type(exc)(exc.message.replace(scratch, what), hint=exc.hint)
    except TypeError:
        return exc


def _relocator(scratch: _Scratch, rng: ByteRange, valid: set) -> Callable:
    """Rebuild tagged tensors over one private mapping of the original file, made for this
    load only: its pages go with the tensors (a cache of mappings would keep every page
    ever read mapped until the checkpoint is closed)."""
    import torch

    done: dict[bytes, object] = {}
    whole: list = []

    def original(offset: int, nbytes: int):
        if not whole:
            whole.append(torch.UntypedStorage.from_file(rng.path, False, os.path.getsize(rng.path)))
        if offset + nbytes > whole[0].nbytes():
            raise InputError(f"{rng.what}: the file shrank while it was read")
        return whole[0][offset : offset + nbytes]

    def relocate(t):
        """``(t over the original file, payload start)``, or ``(t, None)`` when not relocated."""
        st = t.untyped_storage()
        n = st.nbytes()
        if n < MIN_TAGGED or t.device.type != "cpu":
            return t, None
        tag = bytes(st[0:TAG_BYTES].tolist())
        where = scratch.tags.get(tag)
        if where is None:
            return t, None  # bytes copied into the scratch file as they are
        start, size = where
        if size != n or where not in valid:
            raise InputError(f"{rng.what}: invalid torch checkpoint: a storage of {n} bytes over a record of {size}")
        if tag not in done:
            done[tag] = original(rng.offset + start, size)
        return torch.empty(0, dtype=t.dtype).set_(done[tag], t.storage_offset(), t.size(), t.stride()), start

    return relocate


def _checked(rng: ByteRange, load: Callable):
    """Stage, scan, load with ``load(scratch_path, layout)``, relocate: ``(value, relocate, layout)``."""
    from .pickles import scan

    for whole in (False, True):
        with _staged(rng, whole=whole) as (scratch, is_zip):
            try:
                layout = scan(scratch.path, is_zip)
                if layout.big_endian and scratch.tags:
                    continue  # the loader byteswaps storages in place: stage the payloads too
                value = load(scratch.path, is_zip)
            except WsurgeryError as exc:
                raise _renamed(exc, scratch.path, rng.what) from None
            valid = set(layout.records.values())
            return value, _relocator(scratch, rng, valid), layout
    raise AssertionError("unreachable")


def load_tensor(rng: ByteRange) -> RangeTensor:
    """Load a ``torch.save(tensor)`` blob that lies in a byte range, safely and lazily.

    Args:
        rng: where the blob lies.

    Returns:
        The tensor, over a private mapping of the original file where its bytes lie
        there verbatim, and that location when the tensor covers its whole storage.

    Raises:
        UnsafePickleError: the blob names a dangerous global, or one torch's weights-only
            loader refuses.
        InputError: the blob is malformed, or holds something other than one tensor.

    Example:
        >>> got = load_tensor(ByteRange("ck/__0_0.distcp", 2522, 1577, "ck/__0_0.distcp[2522:4099]"))  # doctest: +SKIP
        >>> got.tensor.shape, got.raw                                                                 # doctest: +SKIP
        (torch.Size([2, 3]), ('ck/__0_0.distcp', 3226, 24))
    """
    import torch

    from .pickles import torch_load

    value, relocate, _ = _checked(rng, lambda path, is_zip: torch_load(path, mmap=is_zip))
    if not isinstance(value, torch.Tensor) or type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise InputError(f"{rng.what}: expected one tensor, found {type(value).__name__}")
    t, start = relocate(value.detach())
    if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
        raise InputError(f"{rng.what}: a {t.layout} tensor (only dense tensors are read)")
    nbytes = t.numel() * t.element_size()
    whole = start is not None and t.is_contiguous() and t.storage_offset() == 0
    raw = (rng.path, rng.offset + start, nbytes) if whole and t.untyped_storage().nbytes() == nbytes else None
    return RangeTensor(t, raw)


@dataclass(frozen=True)
class PlainTensor:
    """Where a plain ``torch.save(tensor)`` blob's values lie, found without torch: the
    storage's bytes in the original file and the strided view over them (elements)."""

    dtype: str
    path: str
    start: int  # absolute offset of the storage's bytes in ``path``
    nbytes: int  # the storage's bytes
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    itemsize: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.size:
            n *= d
        return n

    def raw(self) -> tuple[str, int, int] | None:
        """``(path, offset, nbytes)`` when the values are the whole storage, in order."""
        expect, contiguous = 1, True
        for n, st in zip(reversed(self.size), reversed(self.stride), strict=True):
            if n != 1 and st != expect:
                contiguous = False
            expect *= n
        if contiguous and self.offset == 0 and self.numel * self.itemsize == self.nbytes:
            return self.path, self.start, self.nbytes
        return None


@functools.lru_cache(maxsize=1)
def _plain_globals() -> frozenset[str]:
    from ..dtypes import BY_NAME
    from .pickles.allowlist import _storage_types

    typed = (k for k, v in _storage_types().items() if "Untyped" not in k and v.dtype_name in BY_NAME)
    return frozenset({"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "collections.OrderedDict",
                      *typed})  # fmt: skip


def _scanned(rng: ByteRange) -> Layout | None:
    """The inert scan of the torch zip at ``rng`` (its pickle and entries, nothing run), or
    None when the range is not a zip (a legacy torch file: torch's loader reads it)."""
    from .pickles.layout import scan_zip

    fd = _open_range(rng)
    try:
        if os.pread(fd, 2, rng.offset) != b"PK":
            return None
        return scan_zip(rng.what, _View(fd, rng.offset, rng.length), rng.length)
    finally:
        os.close(fd)


def plain_tensor(rng: ByteRange) -> PlainTensor | None:
    """Read a ``torch.save(tensor)`` blob's layout without torch, as DCP writes each chunk.

    The zip archive and its pickle go through the same checks as any torch file (the
    pickles package's inert scan: refused globals, storages backed by their zip entries,
    views inside their storages); the values are never decoded here.

    Args:
        rng: where the blob lies.

    Returns:
        The tensor's layout, or None when the blob is anything but one plain dense tensor
        of a typed storage in little-endian order (a Parameter subclass, flags, a
        quantized tensor, another container, a legacy file): the caller then loads it
        through torch's weights-only loader, whose verdict stands.

    Raises:
        UnsafePickleError: the blob names a dangerous global.
        InputError: the blob is malformed.

    Example:
        >>> plain_tensor(ByteRange("ck/__0_0.distcp", 2522, 1577, "ck/__0_0.distcp[2522:4099]"))  # doctest: +SKIP
        PlainTensor(dtype='float32', path='ck/__0_0.distcp', start=3226, nbytes=24, ...)
    """
    from .pickles.allowlist import ScannedTensor

    layout = _scanned(rng)
    if layout is None:
        return None
    value = layout.value
    if layout.big_endian or not isinstance(value, ScannedTensor) or value.plain is None:
        return None
    if not layout.named <= _plain_globals():
        return None
    storage, offset, size, stride = value.plain
    if not storage.key or storage.key not in layout.records:
        return None
    start, nbytes = layout.records[storage.key]
    return PlainTensor(storage.dtype_name, rng.path, rng.offset + start, nbytes, offset, size, stride, storage.itemsize)


@dataclass
class PlainState:
    """A torch checkpoint read without torch: its tensors (each a :class:`PlainTensor`, in
    file order), one line per entry that is not a tensor, and the key the state dict was
    found under (as :class:`~wsurgery.io.pickles.PickleResult` has them)."""

    tensors: dict[str, PlainTensor]
    skipped: list[str]
    container: str | None


# What a checkpoint read without torch may name under ``torch.``: the plain rebuilds,
# typed storages (checked per tensor) and inert values. Any other torch global (a
# Parameter, a sparse or meta rebuild) is torch's loader's to read.
_INERT_TORCH = frozenset({"torch.Size", "torch.device", "torch.strided", "torch.contiguous_format",
                          "torch.preserve_format", "torch.channels_last"})  # fmt: skip


def _allowed_without_torch(qualname: str) -> bool:
    from ..dtypes import BY_NAME
    from .pickles.allowlist import _storage_types

    if not qualname.startswith("torch."):
        return True
    if qualname in ("torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2") or qualname in _INERT_TORCH:
        return True
    st = _storage_types().get(qualname)
    return (st is not None and "Untyped" not in qualname) or qualname.removeprefix("torch.") in BY_NAME


def _real_dicts(value, memo: dict[int, object]):
    """``value`` with the scan's ``collections.OrderedDict`` placeholders (built with no
    arguments, then filled by SETITEMS) made dicts, through dicts, lists and tuples;
    shared containers stay shared. Anything else is kept as it is."""
    from .pickles import Placeholder

    done = memo.get(id(value))
    if done is not None:
        return done
    if isinstance(value, Placeholder):
        if value.of != "collections.OrderedDict" or value.args not in ((), ((),)) or value.items:
            return value
        out: object = OrderedDict()
        memo[id(value)] = out
        for k, v in value.keys.items():
            out[k] = _real_dicts(v, memo)  # type: ignore[index]
        return out
    if type(value) is dict:
        d: dict = {}
        memo[id(value)] = d
        for k, v in value.items():
            d[k] = _real_dicts(v, memo)
        return d
    if type(value) in (list, tuple):
        items: list = []
        memo[id(value)] = items
        items.extend(_real_dicts(v, memo) for v in value)
        if type(value) is tuple:
            memo[id(value)] = tuple(items)  # a tuple that holds itself cannot be pickled
            return memo[id(value)]
        return items
    return value


def plain_state(rng: ByteRange) -> PlainState | None:
    """Read a torch checkpoint whose tensors are all plain (Megatron's ``common.pt``, a
    ``.nemo``'s ``model_weights.ckpt``) without torch: the pickles package's inert scan
    finds each tensor's layout, its values stay in the file.

    Args:
        rng: where the checkpoint lies (a whole file, or a range of one).

    Returns:
        A :class:`PlainState` (non-tensor entries are described as the restricted
        unpickler describes them: unknown classes are inert placeholders), or None when
        the file may need torch's loader: it is not a little-endian zip, it names a
        torch global other than the plain rebuilds, typed storages and inert values, a
        tensor is not plain, two tensors share a storage (a tie), or a storage is not
        reached by a tensor of the state dict. The caller then reads it through the safe
        torch path, whose verdict stands.

    Raises:
        UnsafePickleError: the pickle names a dangerous global.
        InputError: the file is malformed.

    Example:
        >>> state = plain_state(ByteRange("ckpt/common.pt", 0, 1363, "ckpt/common.pt"))  # doctest: +SKIP
        >>> state.skipped                                                               # doctest: +SKIP
        ['args: placeholder for argparse.Namespace', 'iteration: int']
    """
    from ..dtypes import BY_NAME
    from .pickles.allowlist import ScannedTensor
    from .pickles.state_dict import extract_state_dict

    layout = _scanned(rng)
    if layout is None or layout.big_endian or not all(_allowed_without_torch(n) for n in layout.named):
        return None
    value = layout.value
    if "collections.OrderedDict" in layout.named:
        try:
            value = _real_dicts(value, {})
        except RecursionError:
            return None
    try:
        result = extract_state_dict(value, rng.what, tensor_type=ScannedTensor, file_size=rng.length)
    except InputError:
        return None  # not a state dict: torch's path says why
    tensors: dict[str, PlainTensor] = {}
    used: set[str] = set()
    for name, t in result.tensors.items():
        if t.plain is None:
            return None
        storage, offset, size, stride = t.plain
        if not storage.key or storage.key in used or storage.key not in layout.records:
            return None
        if storage.dtype_name not in BY_NAME:
            return None
        used.add(storage.key)
        start, nbytes = layout.records[storage.key]
        plain = PlainTensor(storage.dtype_name, rng.path, rng.offset + start, nbytes, offset, size, stride,
                            storage.itemsize)  # fmt: skip
        if plain.numel * plain.itemsize > nbytes:
            return None  # an expanded view: torch's path decides
        tensors[name] = plain
    if used != set(layout.claims):
        return None  # a storage outside the state dict (in an object): torch's path reads what it holds
    skipped = list(result.skipped)
    # the OrderedDicts were made dicts, and torch's loader makes the torch values (dtypes) real
    named = [p for p in layout.placeholders if p != "collections.OrderedDict" and not p.startswith("torch.")]
    if named:
        shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        skipped.insert(0, f"(read by wsurgery's scan, without torch; inert placeholders for {shown})")
    return PlainState(tensors, skipped, result.container)


class FileMaps:
    """Read-only maps of whole files, one per path, shared by the chunks of a checkpoint:
    a chunk's bytes are viewed in place (the page cache), never copied to read them."""

    def __init__(self) -> None:
        self._maps: dict[str, object] = {}

    def view(self, path: str, start: int, nbytes: int) -> memoryview:
        """``nbytes`` bytes of ``path`` from ``start``, read-only."""
        import mmap

        if nbytes == 0:
            return memoryview(b"")
        m = self._maps.get(path)
        if m is None:
            with open(path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = m
        if start + nbytes > len(m):  # type: ignore[arg-type]
            raise InputError(f"{path}: the file shrank while it was read")
        return memoryview(m)[start : start + nbytes]  # type: ignore[arg-type]

    def release(self, path: str, start: int, stop: int) -> None:
        """Unmap the pages of bytes ``[start, stop)`` of ``path`` (they stay cached)."""
        import mmap

        m = self._maps.get(path)
        if m is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = start // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(stop, len(m)) // mmap.PAGESIZE * mmap.PAGESIZE  # type: ignore[arg-type]
        if hi > lo:
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)  # type: ignore[attr-defined]

    def close(self) -> None:
        for m in self._maps.values():
            with contextlib.suppress(BufferError, ValueError):
                m.close()  # type: ignore[attr-defined]
        self._maps.clear()


def load_state_dict(rng: ByteRange):
    """Load a torch checkpoint (a state dict) that lies in a byte range, as
    :func:`~wsurgery.io.pickles.load_pickle` loads a file.

    Args:
        rng: where the checkpoint lies.

    Returns:
        A :class:`~wsurgery.io.pickles.PickleResult` whose tensors lie over a private
        mapping of the original file (small ones over the scratch copy).

    Raises:
        UnsafePickleError, InputError: as for any torch file.

    Example:
        >>> result = load_state_dict(ByteRange("m.nemo", 1536, 11254, "m.nemo/model_weights.ckpt"))  # doctest: +SKIP
        >>> sorted(result.tensors)                                                                  # doctest: +SKIP
    """
    from .pickles import load_pickle

    result, relocate, _ = _checked(rng, lambda path, is_zip: load_pickle(path, zip_format=is_zip))
    result.tensors = {name: relocate(t)[0] for name, t in result.tensors.items()}
    return result
