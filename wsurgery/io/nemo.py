"""NeMo 1 ``.nemo`` archives: a tar (or tar.gz) of ``model_config.yaml`` and
``model_weights.ckpt`` (NeMo's SaveRestoreConnector), read without extracting.

An uncompressed archive is read in place: each member is a byte range of the archive
(:class:`~wsurgery.io.folders.TarFolder`), so ``model_weights.ckpt`` is mapped, not
copied. A compressed one is decompressed as a stream into a private temporary folder,
removed when the checkpoint is closed, within a budget (:data:`MAX_INFLATE_RATIO` times
the archive's size, at least :data:`MIN_INFLATE_BUDGET`): a decompression bomb is refused
from its tar headers, before its data is inflated. Invariants:

- every member name is relative, without ``..``, NUL or backslash (``safe_relative``);
  symbolic links, hard links, devices, pipes, sparse files and duplicate names refuse the
  whole archive;
- no single read of tar metadata (a PAX or GNU long-name record) exceeds
  :data:`MAX_HEADER_READ`, and an archive holds at most :data:`MAX_MEMBERS` members;
- model-parallel archives (``mp_rank_00/``, ``tp_rank_00_pp_rank_000/``) are read one
  rank at a time: ``formats.layouts.split_archive_path`` picks ``model.nemo/mp_rank_01``, and an
  archive of several ranks opened whole is a :class:`ModelParallelArchiveError` that
  lists them.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import shutil
import stat
import tarfile
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field

from ..errors import InputError
from .folders import DirFolder, Folder, Member, PositionedReader, TarFolder, safe_relative

WEIGHTS = "model_weights.ckpt"
CONFIG = "model_config.yaml"
DIST_WEIGHTS = "model_weights"  # NeMo 1 with Megatron-Core: a torch_dist folder in the archive
RANK_RE = re.compile(r"^(mp_rank_\d+|tp_rank_\d+(?:_pp_rank_\d+)?)$")
MAX_MEMBERS = 100_000
MAX_HEADER_READ = 16 << 20
MAX_INFLATE_RATIO = 64
MIN_INFLATE_BUDGET = 256 << 20
MAX_CONFIG = 1 << 20
_CHUNK = 1 << 20


class _Bounded(PositionedReader):
    """A seekable reader that refuses reads of tar metadata past :data:`MAX_HEADER_READ`
    and any position past ``budget`` (the decompressed bytes a gz archive may inflate to)."""

    def __init__(self, raw, where: str, budget: int | None):
        self.raw, self.where, self.budget, self.pos = raw, where, budget, 0

    def _guard(self, pos: int) -> None:
        if self.budget is not None and pos > self.budget:
            raise InputError(
                f"{self.where}: inflates past {self.budget:,} bytes ({MAX_INFLATE_RATIO}x the archive): "
                "refused as a decompression bomb",
                hint="decompress it yourself (gunzip) if you trust it, then open the .tar",
            )

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self.pos
        elif whence == 2:
            if self.budget is not None:
                raise io.UnsupportedOperation("seek from the end of a compressed stream")
            pos += self.raw.seek(0, 2)
        self._guard(pos)
        self.pos = self.raw.seek(pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_HEADER_READ:
            raise InputError(f"{self.where}: a tar record claims more than {MAX_HEADER_READ:,} bytes of metadata")
        self._guard(self.pos + n)
        data = self.raw.read(n)
        self.pos += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def _member_name(ti: tarfile.TarInfo, where: str) -> str | None:
    """The normalised name of a regular member; None for a folder; InputError otherwise."""
    shown = repr(ti.name)[:80]
    if ti.issym() or ti.islnk():
        raise InputError(f"{where}: member {shown} is a link (to {ti.linkname!r:.80}): refused",
                         hint="a .nemo holds regular files only; the archive is corrupt or hostile")  # fmt: skip
    if ti.ischr() or ti.isblk() or ti.isfifo():
        raise InputError(f"{where}: member {shown} is a device or a pipe: refused", hint="the archive is hostile")
    if ti.isdir():
        if ti.name.strip("./"):
            safe_relative(ti.name, where, "member name")
        return None
    if ti.issparse() or not ti.isreg():
        raise InputError(f"{where}: member {shown} is of tar type {ti.type!r} (only regular files are read)")
    return safe_relative(ti.name, where, "member name")


@dataclass
class Archive:
    """An opened ``.nemo``: its regular files as a folder, and what it holds."""

    path: str
    compressed: bool
    folder: Folder
    names: list[str]
    cleanups: list = field(default_factory=list)

    def close(self) -> None:
        """Remove what a compressed archive was decompressed into (files already mapped stay
        readable through their mappings)."""
        for fn in self.cleanups:
            fn()

    @property
    def ranks(self) -> list[str]:
        """The model-parallel rank folders that hold weights, sorted."""
        tops = {n.split("/", 1)[0] for n in self.names if n.endswith("/" + WEIGHTS) and n.count("/") == 1}
        return sorted(t for t in tops if RANK_RE.match(t))

    def config_text(self) -> str | None:
        """``model_config.yaml``'s text (undecodable bytes replaced), or None."""
        if CONFIG not in self.names:
            return None
        return self.folder.read(CONFIG, MAX_CONFIG).decode("utf-8", "replace")


class _Extracted(DirFolder):
    """Members decompressed into a private temporary folder, named as archive members."""

    def __init__(self, tmp: str, archive: str, prefix: str = ""):
        super().__init__(os.path.join(tmp, prefix) if prefix else tmp)
        self.tmp, self.archive, self.prefix = tmp, archive, prefix

    def shown(self, name: str) -> str:
        return "/".join(p for p in (self.archive, self.prefix, name) if p)

    def sub(self, name: str) -> Folder:
        return _Extracted(self.tmp, self.archive, f"{self.prefix}/{name}" if self.prefix else name)


def _walk(tf: tarfile.TarFile, where: str, limit: int, beyond: str) -> dict[str, tarfile.TarInfo]:
    found: dict[str, tarfile.TarInfo] = {}
    count = 0
    for ti in tf:
        count += 1
        if count > MAX_MEMBERS:
            raise InputError(f"{where}: more than {MAX_MEMBERS:,} members")
        name = _member_name(ti, where)
        if name is None:
            continue
        if name in found:
            raise InputError(f"{where}: member {name!r:.80} appears twice: refused (which one would be read?)")
        if ti.offset_data + ti.size > limit:
            raise InputError(
                f"{where}: member {name!r:.80} claims {ti.size:,} bytes at {ti.offset_data:,}, past {beyond}",
                hint="the archive is truncated, corrupt or hostile",
            )
        found[name] = ti
    return found


def _wanted(name: str, rank: str | None) -> bool:
    parts = name.split("/")
    if parts[0] == rank:
        parts = parts[1:]
    elif RANK_RE.match(parts[0]):
        return False
    return parts in ([CONFIG], [WEIGHTS]) or (len(parts) == 2 and parts[0] == DIST_WEIGHTS)  # a flat DCP folder


def open_archive(path: str, rank: str | None = None) -> Archive:
    """Open a ``.nemo`` archive: list and check its members; map (tar) or decompress (tar.gz).

    Args:
        path: the archive.
        rank: a model-parallel rank folder to read (``mp_rank_01``); a tar.gz extracts only
            the weights of that rank (or of no rank when None).

    Returns:
        An :class:`Archive`.

    Raises:
        InputError: not a readable tar, an unsafe member, a decompression bomb.

    Example:
        >>> arc = open_archive("model.nemo")  # doctest: +SKIP
        >>> arc.names                         # doctest: +SKIP
        ['model_config.yaml', 'model_weights.ckpt']
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    try:
        with open(path, "rb") as raw:
            if not compressed:
                with tarfile.open(fileobj=_Bounded(raw, path, None), mode="r:") as tf:
                    found = _walk(tf, path, size, "the end of the archive")
                members = {n: Member(n, ti.offset_data, ti.size) for n, ti in found.items()}
                return Archive(path, False, TarFolder(path, members), sorted(members))
            return _open_gz(path, raw, size, rank)
    except (
        tarfile.TarError,
        EOFError,
        OSError,
        zlib.error,
        gzip.BadGzipFile,
        ValueError,
        io.UnsupportedOperation,
    ) as exc:
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InputError(f"{path}: not a readable .nemo archive ({text[:200]})") from None


def _open_gz(path: str, raw, size: int, rank: str | None) -> Archive:
    budget = max(MIN_INFLATE_BUDGET, MAX_INFLATE_RATIO * size)
    stream = _Bounded(gzip.GzipFile(fileobj=raw, mode="rb"), path, budget)
    tmp = tempfile.mkdtemp(prefix="wsurgery-nemo-")
    folder = _Extracted(tmp, path)
    cleanup = weakref.finalize(folder, shutil.rmtree, tmp, True)  # also at exit, and when the folder is dropped
    try:
        with tarfile.open(fileobj=stream, mode="r:") as tf:
            found = _walk(tf, path, budget, f"the {budget:,} bytes it may inflate to (a decompression bomb)")
            for name, ti in found.items():
                if not _wanted(name, rank):
                    continue
                target = os.path.join(tmp, *name.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                src = tf.extractfile(ti)
                if src is None:  # a regular member always has a reader
                    raise InputError(f"{path}: member {name!r:.80} cannot be read")
                fd = os.open(
                    target,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                    stat.S_IRUSR | stat.S_IWUSR,
                )
                with os.fdopen(fd, "wb") as out, contextlib.closing(src):
                    left = ti.size
                    while left:
                        piece = src.read(min(_CHUNK, left))
                        if not piece:
                            raise InputError(f"{path}: member {name!r:.80} ends early")
                        out.write(piece)
                        left -= len(piece)
    except BaseException:
        cleanup()
        raise
    return Archive(path, True, folder, sorted(found), [cleanup])
