"""Sharded safetensors output in the Hugging Face layout, written atomically as a folder.

``OUT/model-00001-of-0000N.safetensors`` ... and ``OUT/model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: shard}}``). The whole folder is
built under a temporary name beside ``OUT`` and renamed into place at the end, so an
error or a kill leaves nothing at ``OUT`` (and an existing ``OUT`` that is replaced
stays whole until the new one is complete). Every shard and the index are
fsynced, and so are the folders, unless ``sync=False`` (see :mod:`.writer`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from decimal import Decimal, localcontext

from ..errors import OutputError, SurgeryError, UsageError
from ..show import short
from .writer import (
    TMP_SUFFIX,
    WriteItem,
    atomic_file,
    fsync_dir,
    mode_for,
    os_error,
    safetensors_prefix,
    write_all,
    write_safetensors,
)

INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_SIZE = 100_000_000  # bytes: the largest index wsurgery's reader accepts
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


MAX_SIZE = 2**63 - 1  # bytes: a file larger than this cannot exist, nor can its shards


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5 * 10**9, ``"500MiB"`` -> 500 * 2**20, ``"1024"`` -> 1024 bytes.

    Computed exactly (no float: ``1`` followed by 310 zeros is a number, not infinity);
    a size past ``MAX_SIZE`` is refused like any other invalid size."""
    m = re.fullmatch(r"\s*([0-9]+)(?:\.([0-9]+))?\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(3).lower() not in _UNITS:
        raise UsageError(
            f"invalid size {short(str(text), 40)}",
            param="max_shard_size",
            hint="write it like 5GB, 500MB, 2GiB or a byte count",
        )
    whole, frac, unit = m.group(1).lstrip("0"), (m.group(2) or "")[:40], _UNITS[m.group(3).lower()]
    if len(whole) > 40:  # past any size, and past what int() reads (4300 digits)
        raise UsageError(f"size {short(str(text), 40)} is too large (at most {MAX_SIZE} bytes)", param="max_shard_size")
    with localcontext() as ctx:
        ctx.prec = 100
        value = int(Decimal(f"{whole or 0}.{frac or 0}") * unit)
    if value <= 0:
        raise UsageError(f"size must be positive, got {short(str(text), 40)}", param="max_shard_size")
    if value > MAX_SIZE:
        raise UsageError(f"size {short(str(text), 40)} is too large (at most {MAX_SIZE} bytes)", param="max_shard_size")
    return value


def plan_shards(items: list[WriteItem], max_size: int) -> list[list[WriteItem]]:
    """Greedy, in order: a new shard starts when the next tensor would pass ``max_size``.

    A tensor larger than ``max_size`` gets a shard of its own (tensors are never split).
    """
    shards: list[list[WriteItem]] = []
    current: list[WriteItem] = []
    size = 0
    for item in items:
        if current and size + item.nbytes > max_size:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_shards_into(
    folder: str,
    names: list[str],
    shards: list[list[WriteItem]],
    shard_metadata: list[dict[str, str]],
    index_metadata: dict,
    *,
    progress=None,
    sync: bool = True,
    only: set[int] | None = None,
    index: bool = True,
) -> None:
    """The shards and the index, written into an existing (temporary) folder (the folder's
    commit gives each file the mode of the one it replaces).

    ``only``: the indices of the shards to write (a rank's share), all by default;
    ``index``: whether to write the index (it needs no shard's data)."""

    for name, items, meta in zip(names, shards, shard_metadata, strict=True):
        safetensors_prefix(os.path.join(folder, name), items, meta)  # every shard readable, before any is written
    weight_map = {item.name: name for name, items in zip(names, shards, strict=True) for item in items}
    record = {
        "metadata": {"total_size": sum(item.nbytes for items in shards for item in items), **index_metadata},
        "weight_map": dict(sorted(weight_map.items())),
    }
    data = (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    if index and len(data) > MAX_INDEX_SIZE:
        raise SurgeryError(
            f"{os.path.join(folder, INDEX_NAME)}: the index would take {len(data)} bytes, past the {MAX_INDEX_SIZE} "
            "bytes that index readers accept",
            hint="use shorter tensor names",
        )
    for i, (name, items, meta) in enumerate(zip(names, shards, shard_metadata, strict=True)):
        if only is None or i in only:
            write_safetensors(os.path.join(folder, name), items, meta, progress=progress, sync=sync)
    if not index:
        return
    with atomic_file(os.path.join(folder, INDEX_NAME), sync=sync) as f:
        write_all(f, data)


@contextlib.contextmanager
def atomic_folder(folder, *, replace: bool = False, sync: bool = True):
    """Yield a temporary folder beside ``folder``; on success it is renamed into place (an
    existing ``folder``, allowed by ``replace``, is swapped out whole). On any error the
    temporary is removed and ``folder`` is left as it was. With ``sync`` the parent folder
    is fsynced after the rename."""
    tmp = make_temporary_folder(folder, replace=replace)
    done = False
    try:
        try:
            yield tmp
        except OSError as exc:
            raise os_error(os.path.abspath(os.fspath(folder)), exc) from None
        commit_temporary_folder(tmp, folder, sync=sync)
        done = True
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)


def make_temporary_folder(folder, *, replace: bool = False) -> str:
    """A new hidden temporary folder beside ``folder`` (see :func:`atomic_folder`), after
    checking that ``folder`` may be written."""
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    if os.path.exists(folder) and not replace:
        raise OutputError(f"{folder} exists", reason="exists", hint="pass overwrite=True to replace it")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"{folder} is a file; the output is a folder", reason="is_file")
    try:
        return tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", suffix=TMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise os_error(folder, exc) from None


def commit_temporary_folder(tmp: str, folder, *, sync: bool = True) -> None:
    """Rename the finished temporary folder ``tmp`` into place as ``folder`` (swapping an
    existing one out whole); with ``sync``, fsync the parent folder after. The folder and
    each file in it that replaces one of the same name keep the replaced one's mode."""
    folder = os.path.abspath(os.fspath(folder))
    try:
        os.chmod(tmp, mode_for(folder, folder=True))
        if os.path.isdir(folder):
            for name in os.listdir(tmp):
                new, old = os.path.join(tmp, name), os.path.join(folder, name)
                if os.path.isfile(new) and not os.path.islink(new) and os.path.lexists(old):
                    os.chmod(new, mode_for(old))
        _swap_in(tmp, folder)
    except OSError as exc:
        raise os_error(folder, exc) from None
    if sync:
        fsync_dir(os.path.dirname(folder))


def _swap_in(tmp: str, folder: str) -> None:
    if not os.path.exists(folder):
        os.rename(tmp, folder)
        return
    old = folder + f".old{TMP_SUFFIX}"
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(old)
    os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except OSError:
        os.rename(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
