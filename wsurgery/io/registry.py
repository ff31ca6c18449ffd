"""The one table of formats: what each reads (the kinds :mod:`.sniff` tells apart), how
it is opened, and how it is written. :func:`open` and the writer
(:func:`wsurgery.io.targets.save`) both look formats up here; adding a format is adding
a module and an entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..model import Checkpoint
from . import layouts, safetensors_format, sniff, torch_format


@dataclass(frozen=True)
class Format:
    """One format.

    Attributes:
        name: its name (the ``format`` a write is asked for).
        kinds: the kinds :func:`wsurgery.io.sniff.sniff` gives that it reads.
        open: ``open(path, kind, **fields)`` -> a lazy :class:`~wsurgery.model.Checkpoint`.
        write: writes one file, ``write(ckpt, path, options)`` -> metadata keys not
            kept; for a folder format ``write(ckpt, folder, options, group, final)`` ->
            ``(metadata keys not kept, aliases written as values)``. None: read only.
        write_shards: ``write_shards(ckpt, folder, max_shard_size, options, group)`` ->
            shard names; None: never sharded.
        suffixes: output names that mean it.
        suffix: the suffix of an output named after its input.
        model_file: its weights file inside a model folder (None: a folder format).
        folder_format: the format is a folder of its own (DCP): always a folder output.
    """

    name: str
    kinds: tuple[str, ...]
    open: Callable[..., Checkpoint]
    write: Callable[..., Any] | None = None
    write_shards: Callable[..., list[str]] | None = None
    suffixes: tuple[str, ...] = ()
    suffix: str = ""
    model_file: str | None = None
    folder_format: bool = False

    @property
    def shards(self) -> bool:
        """Whether it can be split into shards of a maximum size."""
        return self.write_shards is not None


# The distributed formats' modules (numpy, the DCP metadata reader) are imported when one
# is read or written, so that a command on a safetensors or torch file never loads them.
def _distributed(path: str, kind: str, **fields: Any) -> Checkpoint:
    from . import dcp_reader

    ckpt = dcp_reader.load_distributed(path, kind)
    return ckpt.evolve(**fields) if fields else ckpt


def _write_dcp(*args: Any, **kwargs: Any) -> tuple[list[str], list[str]]:
    from . import dcp_writer

    return dcp_writer.write(*args, **kwargs)


TABLE: tuple[Format, ...] = (
    Format(
        "safetensors",
        safetensors_format.KINDS,
        safetensors_format.open,
        safetensors_format.write,
        safetensors_format.write_shards,
        (".safetensors",),
        ".safetensors",
        "model.safetensors",
    ),
    Format(
        "torch",
        torch_format.KINDS,
        torch_format.open,
        torch_format.write,
        torch_format.write_shards,
        (".pt", ".pth", ".bin", ".ckpt"),
        ".pt",
        "pytorch_model.bin",
    ),
    Format(
        "dcp", (layouts.DCP, layouts.DCP_SAFETENSORS), _distributed, _write_dcp, suffix="-dcp", folder_format=True
    ),
    Format("megatron", (layouts.MEGATRON, layouts.NEMO2), _distributed),
    Format("nemo", (layouts.NEMO,), _distributed),
)
BY_KIND: dict[str, Format] = {kind: f for f in TABLE for kind in f.kinds}
FORMATS: dict[str, Format] = {f.name: f for f in TABLE if f.write is not None}  # the formats written
DEFAULT = "safetensors"


def open(path: str | os.PathLike[str]) -> Checkpoint:  # noqa: A001 - the safe_open idiom
    """Open any checkpoint lazily; the format comes from the file's first bytes. A folder
    is what its structure says: a distributed layout (DCP, Megatron / NeMo 2, DCP's
    safetensors shards), else a model folder read as a whole (:mod:`.hf`): its weights,
    its ``config.json`` if any, and the other files a folder output carries."""
    path = os.fspath(path)
    if os.path.isdir(path):
        layout = layouts.folder_format(path)
        if layout is None:
            return _open_folder(path)
        return BY_KIND[layout].open(path, layout)
    kind, real = sniff.sniff(path)
    return BY_KIND[kind].open(real, kind)


def _open_folder(folder: str) -> Checkpoint:
    """A model folder: the weights transformers would load (else the folder's one index or
    safetensors file), with the folder kept as ``model_folder``."""
    from .hf import open_folder

    found = open_folder(folder)
    if found.weights is not None:
        kind, real = sniff.sniff(found.weights)
    else:
        kind, real = sniff.sniff(folder)
    return BY_KIND[kind].open(real, kind, model_folder=found)
