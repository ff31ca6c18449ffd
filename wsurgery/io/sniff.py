"""Find a checkpoint's format from its first bytes, never from its name."""

from __future__ import annotations

import os
import stat
import struct

from ..errors import InputError
from .layouts import (  # noqa: F401  (the new kinds)
    DCP,
    DCP_SAFETENSORS,
    MEGATRON,
    NEMO,
    NEMO2,
    folder_format,
    is_archive,
    split_archive_path,
)

SAFETENSORS = "safetensors"
SHARDED = "safetensors-sharded"
TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"
TORCH_SHARDED = "torch-sharded"

INDEX_SUFFIX = ".index.json"


def find_index(folder: str) -> str:
    """The one ``*.safetensors.index.json`` (or ``*.index.json``) in ``folder``."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise InputError(f"{folder}: cannot list folder: {exc.strerror or exc}") from None
    found = [n for n in names if n.endswith(".safetensors.index.json")] or [
        n for n in names if n.endswith(INDEX_SUFFIX)
    ]
    if not found:
        single = [n for n in names if n.endswith(".safetensors")]
        if len(single) == 1:
            return os.path.join(folder, single[0])
        raise InputError(f"{folder}: folder holds no *.safetensors.index.json", hint="pass the checkpoint file itself")
    if len(found) > 1:
        raise InputError(f"{folder}: folder holds several index files: {', '.join(found)}", hint="pass one of them")
    return os.path.join(folder, found[0])


_CONFIG_BYTES = 16 << 20  # a JSON file larger than this is left to the index parser


def _refuse_model_config(path: str) -> None:
    """A JSON file that is a model's config (``config.json``: no ``weight_map``, but
    ``model_type``, ``architectures`` or the file's name) is not weights: say so and name
    its folder, rather than "not a sharded index"."""
    import json

    name = os.path.basename(path)
    if name.endswith(INDEX_SUFFIX):
        return
    try:
        with open(path, "rb") as f:
            data = f.read(_CONFIG_BYTES + 1)
        obj = json.loads(data) if len(data) <= _CONFIG_BYTES else None
    except (OSError, ValueError, RecursionError):
        return
    if not isinstance(obj, dict) or "weight_map" in obj:
        return
    if name == "config.json" or "model_type" in obj or "architectures" in obj:
        folder = os.path.dirname(path) or "."
        raise InputError(
            f"{path}: a model config, not weights", hint=f"pass its folder ({folder}) to read the model as a whole"
        )


def sniff(path: str) -> tuple[str, str]:
    """Return ``(format, path)``; a folder resolves to its index file."""
    if not os.path.exists(path):
        if split_archive_path(path) is not None:  # one rank of a .nemo: model.nemo/mp_rank_01
            return NEMO, path
        raise InputError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        layout = folder_format(path)  # DCP, Megatron / NeMo 2, DCP's safetensors shards
        if layout is not None:
            return layout, path
        path = find_index(path)
        if not path.endswith(INDEX_SUFFIX):
            return SAFETENSORS, path
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InputError(
                f"{path}: not a regular file", hint="pass the checkpoint file itself, not a pipe or a device"
            )
        with open(path, "rb") as f:
            head = f.read(16)
            block = head + f.read(496)  # a tar header's magic lies at byte 257
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return TORCH_ZIP, path
    # Safetensors before pickles: a header of 128 + 256k bytes starts with byte 0x80 too.
    # A legacy torch file never has "{" at byte 8 (there lies its fixed magic number).
    if head[8:9] == b"{":
        return SAFETENSORS, path
    if head[:1] == b"\x80":  # a pickle PROTO opcode: the legacy torch.save format
        return TORCH_LEGACY, path
    if is_archive(block):  # a NeMo 1 .nemo: tar or tar.gz (neither has "{" at byte 8 nor 0x80 at 0)
        return NEMO, path
    stripped = head.lstrip()
    if stripped.startswith(b"{"):  # an index: its name says whose shards it lists
        _refuse_model_config(path)
        return (TORCH_SHARDED if path.endswith(".bin" + INDEX_SUFFIX) else SHARDED), path
    if len(head) >= 8:
        # A safetensors prefix whose header is broken: let the strict parser say why.
        (n,) = struct.unpack("<Q", head[:8])
        if n > 0 and (len(head) < 9 or head[8:9] == b" "):
            return SAFETENSORS, path
    if path.endswith(".safetensors"):
        return SAFETENSORS, path
    raise InputError(
        f"{path}: not a checkpoint wsurgery can read (first bytes {head[:8].hex()})",
        hint="expected safetensors, a sharded index, a torch.save file, or a .nemo archive",
    )
