"""What a checkpoint holds, as data: the library's side of the command line's inspect.

:func:`inspect` reads headers only (safetensors is never decoded, torch is not imported)
and returns an :class:`Inspection`, whose ``to_dict()`` is the inspect command's JSON
document, so the command line and Python agree by construction. The command line only
renders it (a table, a tree, totals, warnings).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .io.hf_config import TieReport
    from .model import Checkpoint


@dataclass(frozen=True)
class TensorInfo:
    """One name of the checkpoint: a stored tensor, or an alias (``alias_of`` set).

    Attributes:
        name, dtype, shape, numel, nbytes: as stored (an alias's as its view makes them).
        alias_of: ``{"source": name, "transform": [step, ...]}`` for an alias, else None.
        alias_text: the alias as one expression (``transpose(embed.weight)``), else "".
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    alias_of: dict[str, Any] | None = None
    alias_text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "alias_of": self.alias_of,
        }


@dataclass(frozen=True)
class DtypeTotal:
    """The stored tensors of one dtype: how many, their parameters and bytes."""

    tensors: int
    params: int
    nbytes: int


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect` found.

    Attributes:
        path: the checkpoint's path as given.
        format: the format read (``safetensors``, ``torch``, ``dcp``, ``nemo``, ...).
        tensors: the names shown (all, or those ``filter`` selects), in order.
        names: how many names the checkpoint holds in all.
        filter: the selector asked for, or None.
        total_params, total_bytes: of the stored tensors shown (aliases add nothing).
        dtypes: per dtype, the stored tensors shown.
        metadata: the file's string metadata.
        skipped: entries of a torch file that are not tensors.
        container: the entry of a training checkpoint that held the state dict, or None.
        files: a model folder's other files (carried by a folder output), or None.
        config: a Hugging Face folder's ``model_type``, ``architectures`` and what its
            ``tie_word_embeddings`` says against the weights, or None.
        ties: the :class:`~wsurgery.hf.TieReport` behind ``config``, or None.
        warnings: each disagreement between the config and the weights.
        ranks: for a model-parallel ``.nemo`` archive, ``[{rank, member}]`` (then
            ``tensors`` is empty: it is read one rank at a time); else None.
    """

    path: str
    format: str
    tensors: list[TensorInfo]
    names: int
    filter: str | None = None
    total_params: int = 0
    total_bytes: int = 0
    dtypes: dict[str, DtypeTotal] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    container: str | None = None
    files: list[str] | None = None
    config: dict[str, Any] | None = None
    ties: TieReport | None = None
    warnings: list[str] = field(default_factory=list)
    ranks: list[dict[str, str]] | None = None

    @property
    def aliases(self) -> int:
        """How many of the names shown are aliases."""
        return sum(1 for t in self.tensors if t.alias_of is not None)

    def to_dict(self) -> dict[str, Any]:
        """The inspect command's JSON document (without its ``schema``)."""
        out: dict[str, Any] = {
            "path": self.path,
            "format": self.format,
            "tensors": [t.to_dict() for t in self.tensors],
            "total_params": self.total_params,
            "total_bytes": self.total_bytes,
            "metadata": dict(sorted(self.metadata.items())),
            "skipped": list(self.skipped),
        }
        if self.ranks is not None:
            out["ranks"] = [dict(r) for r in self.ranks]
            return out
        out["container"] = self.container
        if self.files is not None:
            out["files"] = list(self.files)
            if self.config is not None:
                out["config"] = dict(self.config)
                out["warnings"] = list(self.warnings)
        return out


def inspect(source: str | os.PathLike[str] | Checkpoint, *, filter: str | None = None) -> Inspection:  # noqa: A002
    """Describe a checkpoint: its names, dtypes, shapes, aliases, totals and metadata.

    Reads headers only for safetensors; nothing is decoded. A model-parallel ``.nemo``
    archive is described by its ranks (each is read as a checkpoint of its own).

    Args:
        source: a path (any format :func:`wsurgery.open` reads) or an opened checkpoint
            (left open).
        filter: a selector (exact name, module prefix or glob); only the names it
            selects are shown, and the totals are of those.

    Returns:
        An :class:`Inspection`; ``to_dict()`` is the inspect command's JSON document.

    Raises:
        InputError: the checkpoint cannot be read.
        UnknownNameError: ``filter`` selects nothing (with close matches).

    Example:
        >>> wsurgery.inspection.inspect("model.safetensors").total_params  # doctest: +SKIP
        1608
    """
    from .model import Checkpoint

    if isinstance(source, Checkpoint):
        return _describe(source, str(source.path), filter)
    from .io.layouts import ModelParallelArchiveError
    from .io.registry import open as open_checkpoint

    try:
        ckpt = open_checkpoint(source)
    except ModelParallelArchiveError as exc:  # a .nemo of several ranks: list them
        return _ranks(exc, os.fspath(source))
    with ckpt:
        return _describe(ckpt, os.fspath(source), filter)


def _ranks(exc: Any, path: str) -> Inspection:
    metadata = {"nemo.ranks": ", ".join(exc.ranks)}
    if exc.config is not None:
        metadata["nemo.model_config"] = exc.config
    ranks = [{"rank": r, "member": m} for r, m in zip(exc.ranks, exc.members, strict=True)]
    return Inspection(path=path, format="nemo", tensors=[], names=0, metadata=metadata, ranks=ranks)


def _describe(c: Checkpoint, path: str, selector: str | None) -> Inspection:
    from .dtypes import BY_NAME

    names = c.names()
    if selector is not None:
        from .selectors import select

        names = select(names, selector, path=path)
    stored, aliases = c.stored, c.aliases
    itemsize = {d: t.itemsize for d, t in BY_NAME.items()}
    tensors = []
    dtypes: dict[str, list[int]] = {}
    params = nbytes = 0
    for name in names:  # a few dict lookups each: a million names are fine
        e = stored.get(name)
        if e is not None:
            numel, size = e.numel, e.nbytes
            tensors.append(TensorInfo(name, e.dtype, tuple(e.shape), numel, size))
            params += numel
            nbytes += size
            acc = dtypes.setdefault(e.dtype, [0, 0, 0])
            acc[0] += 1
            acc[1] += numel
            acc[2] += size
            continue
        a = aliases[name]
        numel = math.prod(a.shape)
        text = f"{a.transform}({a.source})"
        tensors.append(TensorInfo(name, a.dtype, tuple(a.shape), numel, numel * itemsize[a.dtype], a.record(), text))
    files = config = ties = None
    warnings: list[str] = []
    folder = c.model_folder
    if folder is not None:
        files = list(folder.files)
        if folder.config is not None:
            from .io.hf_config import check_ties
            from .io.hf_contract import unrestored_warning

            ties = check_ties(c, folder.config)
            config = {
                "model_type": folder.config.get("model_type"),
                "architectures": folder.config.get("architectures"),
                **{k: v for k, v in ties.to_dict().items() if k != "warnings"},
            }
            warnings = [*ties.warnings, *unrestored_warning(c, folder.config)]
    return Inspection(
        path=path,
        format=c.format,
        tensors=tensors,
        names=len(c),
        filter=selector,
        total_params=params,
        total_bytes=nbytes,
        dtypes={d: DtypeTotal(*acc) for d, acc in sorted(dtypes.items())},
        metadata=dict(c.metadata),
        skipped=list(c.skipped),
        container=c.container,
        files=files,
        config=config,
        ties=ties,
        warnings=warnings,
    )


def plan_summary(ckpt: Checkpoint) -> dict[str, Any]:
    """What a planned checkpoint holds and how it came to be (its ``changes``), as the
    JSON-ready keys the writing commands print: ``stored`` (count), ``aliases``,
    ``copied``, ``untied``, ``plan`` (every step) and ``skipped``."""
    from .model import natural_key

    ops = ckpt.changes
    return {
        "stored": len(ckpt.stored),
        "aliases": [{"name": n, **ckpt.aliases[n].record()} for n in sorted(ckpt.aliases, key=natural_key)],
        "copied": [
            {"src": op.src, "dst": op.dst, "source": op.base, "from": op.origin, "transform": _specs(op)}
            for op in ops
            if op.kind == "copy"
        ],
        "untied": [{"name": op.dst, "source": op.base, "transform": _specs(op)} for op in ops if op.kind == "untie"],
        "plan": [op.describe() for op in ops],
        "skipped": list(ckpt.skipped),
    }


def _specs(op: Any) -> list[str]:
    return list(op.value.specs) if op.value is not None else []
