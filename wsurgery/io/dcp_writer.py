"""DCP folders written through ``torch.distributed.checkpoint``, one tensor at a time.

``dcp.save`` plans the checkpoint and writes ``.metadata``, as for any state dict; what
it is given is a state dict of *meta* tensors (shapes and dtypes, no data), and two
pieces of its API decide where the bytes come from and how much memory they take:

- the planner (:class:`_LazyPlanner`, a ``DefaultSavePlanner``) resolves each write item
  by computing that one tensor when it is written (``DcpItem.tensor``);
- the storage writer (:class:`_StreamingWriter`, a ``FileSystemWriter``) writes each
  rank's items into one ``__<rank>_0.distcp`` file, each a ``torch.save`` blob as torch's
  own writer lays it out, and lets go of each tensor once it is written. torch's writer
  keeps every tensor of a file until the file is done; this one holds one.

So memory holds one tensor (and what producing it takes: an assembled DCP tensor holds
one chunk besides), never the checkpoint. Under a process group (``distributed``) each
rank passes its own share and DCP's collectives combine the plans; rank 0 writes
``.metadata``.

Deterministic: the same tensors give the same bytes. The save id that torch draws at
random is derived from the layout (names, dtypes, shapes, files, offsets, lengths), and
the checkpoint id recorded is the final path, not the temporary folder written into.

``torch.distributed.checkpoint.load`` reads the result into a model's state dict, and so
does wsurgery.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import Checkpoint
    from .options import Collective, WriteOptions


@dataclass(frozen=True)
class DcpItem:
    """One tensor of the state dict: its name, dtype, shape and bytes, and a function
    that computes it (a CPU tensor) when it is written."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    tensor: Callable[[], object]


class _NoClose(io.IOBase):
    """The file, as torch's writer hands it to ``torch.save``: writes pass through, close
    does not close (the next blob follows in the same file)."""

    def __init__(self, raw):
        self.raw = raw

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.raw.write(b)

    def close(self) -> None:
        self.raw.flush()


def _plain(t):
    """A tensor as torch's writer stores it: detached, on the CPU, owning exactly its bytes."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.untyped_storage().nbytes() != t.nbytes:
        t = t.clone()
    return t


def _save_id(results) -> str:
    """A UUID from the layout written (every rank's storage records), the same for the
    same checkpoint; torch's is random."""
    h = hashlib.sha256()
    for wr in sorted(results, key=lambda w: (w.index.fqn, tuple(w.index.offset or ()))):
        sd = wr.storage_data
        h.update(f"{wr.index.fqn}\0{wr.index.offset}\0{sd.relative_path}\0{sd.offset}\0{sd.length}\n".encode())
    return str(uuid.UUID(bytes=h.digest()[:16], version=4))


def _classes():
    """The DCP classes this writer builds on (imported with torch, when it writes)."""
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

    class LazyPlanner(DefaultSavePlanner):
        """The default planner, whose write items are computed when they are written.
        ``carry`` makes an error cross DCP's collectives as plain data."""

        def __init__(self, items: dict[str, DcpItem], progress, carry):
            super().__init__()
            self._items = items
            self._progress = progress
            self._carry = carry

        def resolve_data(self, write_item):
            item = self._items.get(write_item.index.fqn)
            if item is None:
                return super().resolve_data(write_item)
            try:
                t = _plain(item.tensor())
            except Exception as exc:  # crosses DCP's collectives as plain data
                raise self._carry(exc) from None
            if tuple(t.shape) != item.shape or str(t.dtype).removeprefix("torch.") != item.dtype:
                raise self._carry(
                    RuntimeError(
                        f"{item.name!r} computed {t.dtype} {list(t.shape)}, expected {item.dtype} {list(item.shape)}"
                    )  # fmt: skip
                )
            return t

    class StreamingWriter(FileSystemWriter):
        """``FileSystemWriter`` that writes its rank's items into one file, one tensor in
        memory at a time, and records the final path and a derived save id."""

        def __init__(self, path: str, final: str, *, sync: bool, progress):
            super().__init__(path, sync_files=sync, thread_count=1, overwrite=True)
            self._final = self.fs.init_path(final)
            self._progress = progress

        def storage_meta(self):
            meta = super().storage_meta()
            meta.checkpoint_id = self._final
            return meta

        def write_data(self, plan, planner):
            from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
            from torch.distributed.checkpoint.planner import WriteItemType
            from torch.distributed.checkpoint.storage import WriteResult
            from torch.futures import Future

            name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            results = []
            # bytes items first, then tensors, in plan order: the order torch's writer uses
            ordered = [w for w in plan.items if w.type == WriteItemType.BYTE_IO]
            ordered += [w for w in plan.items if w.type != WriteItemType.BYTE_IO]
            if ordered:
                with open(os.path.join(self.path, name), "wb") as stream:
                    for w in ordered:
                        data = planner.resolve_data(w)
                        offset = stream.tell()
                        if w.type == WriteItemType.BYTE_IO:
                            stream.write(data.getbuffer())
                        else:
                            import torch

                            torch.save(data, _NoClose(stream))
                            if self._progress is not None:
                                self._progress(data.nbytes)
                        del data  # one tensor at a time
                        length = stream.tell() - offset
                        results.append(WriteResult(w.index, length, _StorageInfo(name, offset, length)))
                    stream.flush()
                    if self.sync_files:
                        os.fsync(stream.fileno())
            fut = Future()
            fut.set_result(results)
            return fut

        def finish(self, metadata, results) -> None:
            self.save_id = _save_id([wr for rank in results for wr in rank])
            super().finish(metadata, results)

    return LazyPlanner, StreamingWriter


def write_dcp(
    folder: str,
    items: Sequence[DcpItem],
    *,
    checkpoint_id: str,
    sync: bool = True,
    progress: Callable[[int], None] | None = None,
    group: Collective | None = None,
) -> None:
    """Write ``items`` as a DCP checkpoint into the existing (temporary) ``folder``.

    Args:
        folder: an empty folder; the caller renames it into place.
        items: the tensors, in the state dict's order (under a process group, this
            rank's share; the names of all ranks together must be unique).
        checkpoint_id: the final path, recorded in ``.metadata`` as torch records the
            path it writes to.
        sync: fsync every file written.
        progress: called with each tensor's bytes once it is written.
        group: the process group saving together (every rank calls this with its
            share); None: this process alone.

    Raises:
        The error met while computing a tensor (on every rank, under a process group),
        or ``OSError`` when a file cannot be written.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    planner_cls, writer_cls = _classes()
    state = {i.name: torch.empty(i.shape, dtype=getattr(torch, i.dtype), device="meta") for i in items}
    carry = group.carry if group is not None else (lambda exc: exc)
    planner = planner_cls({i.name: i for i in items}, progress, carry)
    writer = writer_cls(folder, checkpoint_id, sync=sync, progress=progress)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group: saving in a single process"
            dcp.save(state, storage_writer=writer, planner=planner, no_dist=group is None)
    except CheckpointException as exc:
        failures = exc.failures
        rank = min(failures)
        failure: Any = failures[rank]
        first: BaseException = failure[0] if isinstance(failure, tuple) else failure
        raise (group.uncarry(first) if group is not None else first) from None


def dcp_items(ckpt: Checkpoint) -> tuple[list[DcpItem], list[str]]:
    """Every name of ``ckpt`` as a DCP state dict item, in natural order: DCP has no
    aliases, so an alias is written as its value (a tensor of its own), as
    ``dcp.save(model.state_dict())`` writes tied weights. Returns ``(items, aliases)``."""
    items: list[DcpItem] = []
    for name in ckpt.names():
        e = ckpt.stored.get(name)
        if e is not None:
            items.append(DcpItem(name, e.dtype, tuple(e.shape), e.nbytes, functools.partial(e.tensor, "cpu")))
        else:
            a = ckpt.aliases[name]
            items.append(DcpItem(name, a.dtype, tuple(a.shape), a.nbytes, functools.partial(_alias_value, a)))
    return items, [n for n in ckpt.names() if n in ckpt.aliases]


def _alias_value(a: Any) -> Any:
    return a.transform.apply(a.base.tensor("cpu"))


def write(
    ckpt: Checkpoint, folder: str, options: WriteOptions, group: Collective | None, final: str
) -> tuple[list[str], list[str]]:
    """A DCP checkpoint of ``ckpt`` in the (temporary) ``folder``, recorded as ``final``;
    under a process group each rank writes its share (balanced by bytes). Returns
    ``(metadata keys not kept, aliases written as values)``."""
    items, as_values = dcp_items(ckpt)
    if group is not None:
        owner = group.owners([i.nbytes for i in items])
        items = [i for i, o in zip(items, owner, strict=True) if o == group.rank]
        group.exchange("dcp")  # every rank is ready: DCP's own collectives follow
    write_dcp(folder, items, checkpoint_id=final, sync=options.sync, progress=options.progress, group=group)
    return sorted(k for k in ckpt.metadata if k != "format"), as_values
