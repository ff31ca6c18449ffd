"""Atomic, streaming safetensors writers.

Every write goes to a temporary file in the destination's folder, is flushed and
fsynced, then moved into place with ``os.replace``. On any error the temporary is
removed and the destination is left as it was. A process killed mid-write leaves at
most a hidden ``.NAME.*.wsurgery-tmp`` file beside the destination, never a partial
destination.

``sync=False`` skips both fsyncs, of the file and of its
folder, for scratch outputs where speed matters more than durability. What is kept: the
temporary file and ``os.replace`` (a crash or kill of the *process* still never leaves a
partial destination), the same bytes, the same cleanup and errors on failure. What is
given up: after an operating-system crash or power loss soon after the write, the new
file may be empty or partial, and the old destination may be gone.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError, OutputError, SurgeryError
from .safetensors import MAX_HEADER_SIZE, build_header

TMP_SUFFIX = ".wsurgery-tmp"
_COPY_CHUNK = 64 << 20


_REASONS: dict[int, tuple[str | None, str | None]] = {
    errno.ENOSPC: ("no_space", "free some disk space or write elsewhere"),
    errno.EDQUOT: ("no_space", "free some disk space or write elsewhere"),
    errno.EFBIG: ("too_large", "the file-size limit (ulimit -f) is too small for this output"),
    errno.EACCES: ("permission", "choose a writable destination"),
    errno.EPERM: ("permission", "choose a writable destination"),
    errno.EROFS: ("permission", "choose a writable destination"),
}


def os_error(path, exc: OSError) -> OutputError:
    """An ``OSError`` met while writing ``path``, as an ``OutputError`` with its reason."""
    reason, hint = _REASONS.get(exc.errno or 0, (None, None))
    return OutputError(f"cannot write {path}: {exc.strerror or exc}", reason=reason, hint=hint)


def mode_for(path, like=None, *, folder: bool = False) -> int:
    """The permission bits for a file (or folder) about to replace ``path`` (or ``like``):
    those of the one it replaces, so that replacing a read-only input keeps it read-only;
    ``0644 & ~umask`` (a folder: ``0755 & ~umask``) for a new one. Set-id and sticky bits
    are never carried over to what wsurgery wrote."""
    default = (0o755 if folder else 0o644) & ~process_umask()
    try:
        st = os.stat(path if like is None else like)
    except (OSError, ValueError):
        return default
    same_kind = stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)
    return stat.S_IMODE(st.st_mode) & 0o777 if same_kind else default


@contextlib.contextmanager
def atomic_file(path, *, sync: bool = True, mode_like=None):
    """Yield an unbuffered binary file; on success it replaces ``path`` atomically.

    With ``sync`` (the default) the file is fsynced before the rename and its folder
    after it, so the new contents survive an operating-system crash or power loss.
    ``sync=False`` skips both: still atomic against the process dying, but an OS crash
    or power loss soon after may leave the file empty or partial (see the module
    docstring). The file gets the permission bits of the file it replaces (of
    ``mode_like`` when given), or ``0644 & ~umask`` when it replaces none
    (:func:`mode_for`).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=TMP_SUFFIX, dir=folder)
    except OSError as exc:
        raise os_error(path, exc) from None
    ok = False
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            try:
                yield f
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            except OSError as exc:
                raise os_error(path, exc) from None
        try:
            os.chmod(tmp, mode_for(path, mode_like))
            os.replace(tmp, path)
        except OSError as exc:
            raise os_error(path, exc) from None
        ok = True
        if sync:
            fsync_dir(folder)
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def process_umask() -> int:
    """The process umask, read without changing it where the system allows (no window in
    which another thread would create files with umask 0)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_all(f, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        if n is None or n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]


_SPLICE_PIPE = 1 << 20  # Linux's default pipe-max-size
_SPLICE_MIN = 1 << 20  # smaller copies gain nothing measurable
_SPLICE_FS = frozenset({"ext2", "ext3", "ext4", "tmpfs"})  # local, and no reflink or copy offload to lose
_UNSUPPORTED = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF)
_FS_TYPES: dict[int, str | None] = {}


def _fs_type(fd: int) -> str | None:
    """The type of the file system that holds ``fd`` (Linux's mount table), or None."""
    dev = os.fstat(fd).st_dev
    if dev not in _FS_TYPES:
        _FS_TYPES[dev] = None
        want = f"{os.major(dev)}:{os.minor(dev)}"
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as m:
                for line in m:
                    fields = line.split()
                    if fields[2] == want:
                        _FS_TYPES[dev] = fields[fields.index("-") + 1]
                        break
    return _FS_TYPES[dev]


def _spliced(src: int, dst: int, offset: int, nbytes: int) -> int:
    """Copy up to ``nbytes`` from ``src`` at ``offset`` to ``dst``'s position with
    splice(2) through a 1 MiB pipe; returns the bytes copied (the caller goes on from
    there: 0 where splice does not serve).

    ``copy_file_range`` between two files of a local file system without reflink is the
    kernel's own splice through a 16-page pipe. Where the source and destination offsets
    are not congruent modulo the page size (a DCP chunk's bytes into a safetensors file), a
    1 MiB pipe moves them faster on ext4; where they are, whole pages move and
    ``copy_file_range`` is the faster (figures in ``docs/performance.md``). Other file
    systems keep ``copy_file_range``, which may clone extents or copy on the server."""
    import fcntl

    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if nbytes < _SPLICE_MIN or setsize is None or not hasattr(os, "splice"):
        return 0
    if (offset - os.lseek(dst, 0, os.SEEK_CUR)) % mmap.PAGESIZE == 0:
        return 0  # page-aligned alike: copy_file_range moves whole pages, and is faster here
    if _fs_type(src) not in _SPLICE_FS or _fs_type(dst) not in _SPLICE_FS:
        return 0
    r, w = os.pipe()
    done = 0
    try:
        try:
            size = fcntl.fcntl(w, setsize, _SPLICE_PIPE)
        except OSError:  # past the user's pipe budget: a small pipe gains nothing
            return 0
        while done < nbytes:
            try:
                n = os.splice(src, w, min(size, nbytes - done), offset_src=offset + done)
            except OSError as exc:
                if exc.errno in _UNSUPPORTED:
                    return done  # nothing was moved: the caller copies the rest
                raise
            if n == 0:
                return done  # the source ended early: the caller says so
            left = n
            while left:
                try:
                    left -= os.splice(r, dst, left)
                except OSError as exc:
                    if exc.errno not in _UNSUPPORTED:
                        raise
                    while left:  # what is in the pipe goes out by plain writes
                        chunk = os.read(r, left)
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(dst, view) :]
                        left -= len(chunk)
                    return done + n
            done += n
        return done
    finally:
        os.close(r)
        os.close(w)


def copy_range(src_path: str, offset: int, nbytes: int, f) -> None:
    """Copy ``nbytes`` of ``src_path`` from ``offset`` to the current position of ``f``.

    In the kernel, never through user space: splice(2) through a large pipe on a local
    file system (:func:`_spliced`), else ``os.copy_file_range``, where the system has
    them; a bounded buffer otherwise.
    """
    if nbytes == 0:
        return
    try:
        src = open(src_path, "rb", buffering=0)
    except OSError as exc:
        raise InputError(f"{src_path}: cannot read: {exc.strerror or exc}") from None
    with src:
        done = _spliced(src.fileno(), f.fileno(), offset, nbytes)
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    n = os.copy_file_range(src.fileno(), f.fileno(), nbytes - done, offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
        src.seek(offset + done)
        buf = bytearray(min(_COPY_CHUNK, nbytes - done))
        view = memoryview(buf)
        while done < nbytes:
            want = min(len(buf), nbytes - done)
            try:
                got = src.readinto(view[:want])
            except OSError as exc:
                raise InputError(f"{src_path}: cannot read: {exc.strerror or exc}") from None
            if not got:
                raise InputError(
                    f"{src_path}: the file ended {nbytes - done} bytes early while copying (was it changed meanwhile?)"
                )
            write_all(f, view[:got])
            done += got


def safetensors_prefix(path, items: list[WriteItem], metadata: dict[str, str] | None) -> bytes:
    """The length prefix and header of a safetensors file of ``items``, after checking that
    readers accept it: the safetensors library (and wsurgery) refuse a header past
    ``MAX_HEADER_SIZE`` bytes, so such a file is never written.

    Raises:
        SurgeryError: the header is too large (long names, many tensors or a large
            alias record); nothing has been written.
    """
    prefix, _ = build_header([(i.name, i.dtype, i.shape, i.nbytes) for i in items], metadata)
    size = len(prefix) - 8
    if size > MAX_HEADER_SIZE:
        names = sum(len(i.name.encode("utf-8")) for i in items)
        raise SurgeryError(
            f"{path}: its safetensors header would take {size} bytes ({len(items)} tensors, {names} bytes of names), "
            f"past the {MAX_HEADER_SIZE} bytes that safetensors readers accept",
            hint="use shorter tensor names, or write shards of fewer tensors",
            path=os.fspath(path),
        )
    return prefix


@dataclass
class WriteItem:
    """One stored tensor to write: header facts plus a function that writes its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    write: Callable  # write(f) writes exactly nbytes at f's position


def write_safetensors(
    path, items: list[WriteItem], metadata: dict[str, str] | None, progress=None, *, sync: bool = True,
    mode_like=None,
) -> None:  # fmt: skip
    """Write one safetensors file atomically, tensors in the order given.

    ``sync=False`` skips the fsyncs (see :func:`atomic_file`): still atomic, not durable
    across an operating-system crash or power loss. The file keeps the mode of the file
    it replaces (or of ``mode_like``).
    """
    names = [i.name for i in items]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise OutputError(f"internal error: tensor {dup!r} would be written twice to {path}")
    prefix = safetensors_prefix(path, items, metadata)
    with atomic_file(path, sync=sync, mode_like=mode_like) as f:
        write_all(f, prefix)
        for item in items:
            start = f.tell()
            item.write(f)
            written = f.tell() - start
            if written != item.nbytes:
                raise OutputError(f"internal error: {item.name!r} wrote {written} bytes, expected {item.nbytes}")
            if progress is not None:
                progress(item.nbytes)
