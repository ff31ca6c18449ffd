"""Copies in the kernel (``io.writer.copy_range``): splice(2) through a 1 MiB pipe on a
local file system, ``copy_file_range`` elsewhere, a buffer as the last resort. Each
route gives the same bytes; a refusal midway is finished by the next route; a source
that ends early is an input error."""

from __future__ import annotations

import errno
import os

import pytest

from wsurgery.errors import InputError
from wsurgery.io import writer
from wsurgery.io.writer import atomic_file

MIB = 1 << 20


def _source(tmp_path, nbytes: int) -> tuple[str, bytes]:
    data = os.urandom(nbytes)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return str(path), data


def _copied(tmp_path, src: str, offset: int, nbytes: int) -> bytes:
    """``nbytes`` of ``src`` from ``offset``, copied after 13 bytes already written (so
    neither side is page-aligned, like a DCP chunk into a safetensors file)."""
    dest = tmp_path / "out.bin"
    with atomic_file(dest, sync=False) as f:
        f.write(b"h" * 13)
        writer.copy_range(src, offset, nbytes, f)
        f.write(b"t")
    return dest.read_bytes()


@pytest.fixture
def spliced(monkeypatch):
    """The splice route taken wherever the test runs; the calls counted."""
    calls = []
    real = os.splice

    def counting(*args, **kw):
        calls.append(args[:3])
        return real(*args, **kw)

    monkeypatch.setattr(writer, "_fs_type", lambda fd: "ext4")
    monkeypatch.setattr(writer.os, "splice", counting)
    return calls


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
@pytest.mark.parametrize(("offset", "nbytes"), [(777, 2 * MIB + 5), (4096, 3 * MIB), (0, MIB)])
def test_a_spliced_copy_is_byte_exact(tmp_path, spliced, offset, nbytes):
    src, data = _source(tmp_path, 3 * MIB + 4096)
    assert _copied(tmp_path, src, offset, nbytes) == b"h" * 13 + data[offset : offset + nbytes] + b"t"
    assert len(spliced) >= 2 * (nbytes // MIB)  # into the pipe and out, a MiB at a time


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
def test_a_splice_refused_midway_is_finished_by_plain_writes(tmp_path, spliced, monkeypatch):
    src, data = _source(tmp_path, 3 * MIB)
    real = os.splice

    def refuse_second_write(fd_in, fd_out, count, **kw):
        spliced.append((fd_in, fd_out, count))
        if "offset_src" not in kw and len(spliced) >= 4:  # the second pipe -> file splice
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd_in, fd_out, count, **kw)

    monkeypatch.setattr(writer.os, "splice", refuse_second_write)
    assert _copied(tmp_path, src, 100, 3 * MIB - 200) == b"h" * 13 + data[100 : 3 * MIB - 100] + b"t"


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
def test_a_source_that_ends_early_while_spliced_is_an_input_error(tmp_path, spliced):
    src, _ = _source(tmp_path, MIB + MIB // 2)
    with pytest.raises(InputError, match=f"ended {MIB // 2} bytes early"):
        _copied(tmp_path, src, 0, 2 * MIB)
    assert spliced


def test_other_file_systems_keep_copy_file_range(tmp_path, monkeypatch):
    """Network and reflink file systems may copy on the server or clone extents."""
    calls = []
    monkeypatch.setattr(writer, "_fs_type", lambda fd: "nfs4")
    monkeypatch.setattr(writer.os, "splice", lambda *a, **k: calls.append(a), raising=False)
    src, data = _source(tmp_path, 2 * MIB)
    assert _copied(tmp_path, src, 5, 2 * MIB - 10) == b"h" * 13 + data[5 : 2 * MIB - 5] + b"t"
    assert calls == []


def test_the_file_system_type_is_read_from_the_mount_table(tmp_path):
    with open(tmp_path / "x", "wb") as f:
        kind = writer._fs_type(f.fileno())
    if os.path.exists("/proc/self/mountinfo"):
        assert isinstance(kind, str) and kind
    else:
        assert kind is None


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
def test_page_congruent_offsets_keep_copy_file_range(tmp_path, spliced):
    """Source and destination alike placed in their pages: whole pages move, and
    copy_file_range was the faster there."""
    src, data = _source(tmp_path, 3 * MIB)
    dest = tmp_path / "out.bin"
    with atomic_file(dest, sync=False) as f:
        f.write(b"h" * 13)
        writer.copy_range(src, 4096 + 13, 2 * MIB, f)
    assert dest.read_bytes() == b"h" * 13 + data[4096 + 13 : 4096 + 13 + 2 * MIB]
    assert spliced == []
