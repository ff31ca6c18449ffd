"""The files of a checkpoint folder, wherever they lie: a directory on disk, or the
members of an uncompressed tar archive (a ``.nemo``), each a byte range of one file.

Distributed checkpoints name their files from inside their metadata (DCP's
``relative_path``, a sharded index's file names), so every name is input: it is checked
by :func:`safe_relative` before it is joined to anything. Invariants:

- a name is relative, non-empty, without NUL, backslash or ``..`` component, and
  normalised (``./a//b`` is ``a/b``);
- a directory file resolves (symlinks followed) inside the directory and is a regular
  file; a tar member is a regular file whose bytes lie inside the archive;
- :meth:`Folder.locate` answers ``(real path, offset, size)``: where the file's bytes lie,
  so readers map or copy byte ranges without extracting anything;
- nothing here imports torch.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass, field

from ..errors import InputError
from ..show import short

MAX_NAME = 4096
MAX_DEPTH = 32  # folders in a relative path: checkpoint layouts nest a few; more is an attack


def safe_relative(name, where: str, what: str = "file name") -> str:
    """``name`` as a normalised relative POSIX path, or an :class:`InputError`.

    Args:
        name: a path read from a checkpoint's metadata or an archive's member list.
        where: the file the name comes from, for the message.
        what: what the name is (``"file name"``, ``"member name"``), for the message.

    Returns:
        The name without ``.`` components or repeated slashes (``./a//b`` -> ``a/b``).

    Example:
        >>> safe_relative("./__0_0.distcp", "ckpt/.metadata")
        '__0_0.distcp'
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise InputError(f"{where}: {what} {short(name)} is not a usable relative path")
    if "\x00" in name or "\\" in name:
        raise InputError(f"{where}: {what} {short(name)} holds a NUL or a backslash")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise InputError(
            f"{where}: {what} {short(name)} is an absolute path", hint="the checkpoint is corrupt or hostile"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InputError(
            f"{where}: {what} {short(name)} leaves its folder (..)", hint="the checkpoint is corrupt or hostile"
        )
    if not parts:
        raise InputError(f"{where}: {what} {short(name)} names no file")
    if len(parts) > MAX_DEPTH:
        raise InputError(
            f"{where}: {what} {short(name)} lies {len(parts) - 1} folders deep, more than the {MAX_DEPTH} a "
            "checkpoint needs",
            hint="the checkpoint is corrupt or hostile",
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where}: {what} {short(name)} is not valid Unicode") from None
    return "/".join(parts)


class PositionedReader(io.RawIOBase):
    """A read-only, seekable file object that keeps its own position (``pos``): the base
    of the byte-range views handed to Python's zip and tar readers."""

    pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos


@dataclass(frozen=True)
class Located:
    """Where a file's bytes lie: ``size`` bytes of ``path`` from ``offset``."""

    path: str
    offset: int
    size: int


class Folder:
    """The files of a checkpoint folder, by normalised relative name."""

    root: str  # what the user named (for messages)
    prefix: str = ""  # inside an archive: the folder's own path in it

    def names(self) -> list[str]:
        """Every regular file, by relative name, sorted."""
        raise NotImplementedError

    def locate(self, name: str) -> Located:
        """Where the bytes of file ``name`` lie; ``InputError`` if there is no such file."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        return name in set(self.names())

    def shown(self, name: str) -> str:
        """A file's name as messages show it."""
        return os.path.join(self.root, name)

    def read(self, name: str, limit: int) -> bytes:
        """The whole of a small file; ``InputError`` when it holds more than ``limit`` bytes."""
        loc = self.locate(name)
        if loc.size > limit:
            raise InputError(f"{self.shown(name)}: {loc.size} bytes, more than the {limit} expected for this file")
        try:
            fd = os.open(loc.path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"{self.shown(name)}: cannot read: {exc.strerror or exc}") from None
        try:
            data = os.pread(fd, loc.size, loc.offset)
        finally:
            os.close(fd)
        if len(data) != loc.size:
            raise InputError(f"{self.shown(name)}: the file ended early (was it changed meanwhile?)")
        return data

    def sub(self, name: str) -> Folder:
        """The folder ``name`` inside this one."""
        raise NotImplementedError


class DirFolder(Folder):
    """A directory on disk."""

    def __init__(self, root: str):
        self.root = os.fspath(root)
        self._real = os.path.realpath(self.root)
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        if self._names is None:
            found: list[str] = []
            try:
                for top, dirs, files in os.walk(self.root):
                    dirs.sort()
                    rel = os.path.relpath(top, self.root)
                    for f in sorted(files):
                        found.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
                    if len(found) > 1_000_000:
                        raise InputError(f"{self.root}: more than 1,000,000 files in the folder")
            except OSError as exc:
                raise InputError(f"{self.root}: cannot list folder: {exc.strerror or exc}") from None
            self._names = sorted(found)
        return self._names

    def exists(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name))

    def locate(self, name: str) -> Located:
        path = os.path.join(self.root, name)
        real = os.path.realpath(path)
        if os.path.commonpath([self._real, real]) != self._real:
            raise InputError(
                f"{path}: a link that leaves the checkpoint's folder", hint="copy the file into the folder"
            )
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file (the checkpoint's metadata names it)") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: not a regular file")
        return Located(real, 0, st.st_size)

    def sub(self, name: str) -> Folder:
        """The subfolder ``name``; refused when it is a link that leaves this folder."""
        path = os.path.join(self.root, name)
        real = os.path.realpath(path)
        if os.path.lexists(path) and os.path.commonpath([self._real, real]) != self._real:
            raise InputError(f"{path}: a link that leaves the checkpoint's folder", hint="copy it into the folder")
        return DirFolder(path)


@dataclass(frozen=True)
class Member:
    """A regular file inside a tar archive: ``size`` bytes from ``offset``."""

    name: str
    offset: int
    size: int


@dataclass
class TarFolder(Folder):
    """The members of an uncompressed tar archive under ``prefix`` (``""``: all of it).

    ``members`` maps each member's normalised name (relative to the archive) to its
    byte range in ``archive``, already validated by the archive reader.
    """

    archive: str
    members: dict[str, Member]
    prefix: str = ""
    root: str = field(default="")

    def __post_init__(self):
        if not self.root:
            self.root = self.archive + ("/" + self.prefix if self.prefix else "")

    def _full(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def names(self) -> list[str]:
        if not self.prefix:
            return sorted(self.members)
        head = self.prefix + "/"
        return sorted(n[len(head) :] for n in self.members if n.startswith(head))

    def exists(self, name: str) -> bool:
        return self._full(name) in self.members

    def locate(self, name: str) -> Located:
        m = self.members.get(self._full(name))
        if m is None:
            raise InputError(f"{self.shown(name)}: no such member in the archive (the checkpoint's metadata names it)")
        return Located(self.archive, m.offset, m.size)

    def sub(self, name: str) -> Folder:
        return TarFolder(self.archive, self.members, self._full(name))
