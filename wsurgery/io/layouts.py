"""Which distributed layout a folder or archive holds, from its structure and first bytes.

Cheap on purpose (``io.sniff`` calls it for every folder it is given): it lists one
folder, reads at most a small ``metadata.json`` and one safetensors header prefix, and
imports nothing beyond the standard library (and ``errors``). The readers validate
everything again.
"""

from __future__ import annotations

import json
import os
import struct

from ..errors import InputError

DCP = "dcp"  # torch.distributed.checkpoint: .metadata + __R_S.distcp
DCP_SAFETENSORS = "dcp-safetensors"  # torch's Hugging Face storage writer: DCP_SHARDING_INFO shards
MEGATRON = "megatron-torch-dist"  # Megatron-Core torch_dist: metadata.json + common.pt + DCP
NEMO2 = "nemo2"  # NeMo 2 checkpoint folder: weights/ (torch_dist) + context/
NEMO = "nemo"  # NeMo 1 .nemo archive (tar or tar.gz)

_PROBE = 1 << 16


class ModelParallelArchiveError(InputError):
    """A model-parallel ``.nemo`` opened whole: wsurgery reads one rank at a time.

    Attributes:
        archive: the archive's path.
        ranks: the rank folders it holds (``mp_rank_00``, ...).
        members: the weight files, one per rank.
        config: ``model_config.yaml``'s text, or None.
    """

    def __init__(self, archive: str, ranks: list[str], members: list[str], config: str | None):
        shown = ", ".join(members[:8]) + (f" and {len(members) - 8} more" if len(members) > 8 else "")
        super().__init__(
            f"{archive}: a model-parallel archive of {len(ranks)} ranks ({shown}); wsurgery reads one rank at a time",
            hint=f"name one rank in the path, as {os.path.join(archive, ranks[0])}",
        )
        self.archive, self.ranks, self.members, self.config = archive, ranks, members, config


def _is_megatron(path: str) -> bool:
    try:
        with open(os.path.join(path, "metadata.json"), "rb") as f:
            obj = json.loads(f.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and "sharded_backend" in obj


def _has_sharding_info(path: str) -> bool:
    """Whether a safetensors file's header names DCP_SHARDING_INFO (a prefix probe only)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return False
            (n,) = struct.unpack("<Q", prefix)
            return b'"DCP_SHARDING_INFO"' in f.read(min(n, _PROBE))
    except OSError:
        return False


def folder_format(path: str) -> str | None:
    """The distributed layout of a folder, or None for any other folder.

    Args:
        path: an existing folder.

    Returns:
        :data:`MEGATRON` (``metadata.json`` naming a ``sharded_backend``), :data:`DCP`
        (``.metadata``), :data:`NEMO2` (``weights/`` beside ``context/``),
        :data:`DCP_SAFETENSORS` (safetensors shards carrying ``DCP_SHARDING_INFO`` and no
        index), or None.

    Example:
        >>> folder_format("checkpoints/step_100")  # doctest: +SKIP
        'dcp'
    """
    try:
        names = set(os.listdir(path))
    except OSError:
        return None
    if "metadata.json" in names and _is_megatron(path):
        return MEGATRON
    if ".metadata" in names:
        return DCP
    if {"weights", "context"} <= names and os.path.isdir(os.path.join(path, "weights")):
        return NEMO2
    if any(n.endswith(".index.json") for n in names):
        return None
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if shards and _has_sharding_info(os.path.join(path, shards[0])):
        return DCP_SAFETENSORS
    return None


def is_archive(head: bytes) -> bool:
    """Whether a file's first 512 bytes start a tar archive (POSIX or GNU magic) or a gzip stream.

    Args:
        head: the file's first bytes (512 or fewer).

    Returns:
        True for a tar header or the gzip magic.

    Example:
        >>> is_archive(b"\\x1f\\x8b\\x08" + bytes(509))
        True
    """
    return head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar"


def split_archive_path(path: str) -> tuple[str, str] | None:
    """``model.nemo/mp_rank_01`` -> ``("model.nemo", "mp_rank_01")`` when the path does not
    exist but one of its parents is a regular file that starts an archive; else None.

    Args:
        path: a path that does not exist on disk.

    Returns:
        ``(archive, folder inside it)``, or None.

    Example:
        >>> split_archive_path("model.nemo/mp_rank_01")  # doctest: +SKIP
        ('model.nemo', 'mp_rank_01')
    """
    head, tail = os.path.split(os.path.normpath(path))
    inner = [tail]
    while head and head != os.path.dirname(head):
        if os.path.exists(head):
            if not os.path.isfile(head):
                return None
            try:
                with open(head, "rb") as f:
                    start = f.read(512)
            except OSError:
                return None
            return (head, "/".join(reversed(inner))) if is_archive(start) else None
        head, tail = os.path.split(head)
        inner.append(tail)
    return None
