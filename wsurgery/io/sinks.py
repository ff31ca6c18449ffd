"""Stored tensors written into open files: the :class:`~wsurgery.model.ByteSink` over a
file, and the writers' items (``WriteItem``) of a checkpoint's stored tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from ..dtypes import BY_NAME
from ..model import Checkpoint, Stored
from .writer import WriteItem, copy_range, write_all


class FileSink:
    """Bytes written at an open file's position."""

    __slots__ = ("f",)

    def __init__(self, f: IO[bytes]):
        self.f = f

    def write_bytes(self, data: Any) -> None:
        write_all(self.f, data)

    def copy_range(self, path: str, offset: int, nbytes: int) -> None:
        copy_range(path, offset, nbytes, self.f)


def writer_of(s: Stored) -> Callable[[IO[bytes]], None]:
    """``write(f)``: ``s``'s bytes at ``f``'s position."""

    def write(f: IO[bytes]) -> None:
        s.write(FileSink(f))

    return write


def item_of(s: Stored) -> WriteItem:
    return WriteItem(s.name, s.dtype, s.shape, s.nbytes, writer_of(s))


def write_items(ckpt: Checkpoint) -> list[WriteItem]:
    """Every stored tensor as a writer's item: largest itemsize first, then by name, so
    every tensor is aligned and the same checkpoint gives the same bytes every time."""
    order = sorted(ckpt.stored.values(), key=lambda s: (-BY_NAME[s.dtype].itemsize, s.name))
    return [item_of(s) for s in order]
