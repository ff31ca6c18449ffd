"""How a checkpoint is written (:class:`WriteOptions`), what was written
(:class:`SaveResult`), and the process group a write may be part of (:class:`Collective`).

The io layer knows no process group of its own: a caller under ``torchrun`` passes one
that implements :class:`Collective` (``wsurgery.api`` adapts ``wsurgery.distributed``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class Collective(Protocol):
    """The ranks of a process group writing one output together.

    Every rank calls the same methods in the same order; ``exchange`` is the barrier.
    """

    rank: int
    world_size: int

    @property
    def is_first(self) -> bool:
        """Rank 0: the rank that writes single files, indexes and carried files."""

    def exchange(self, phase: str, payload: Any = None) -> list[Any]:
        """Every rank's ``payload``, in rank order, once every rank has reached ``phase``;
        an error on any rank is raised on every rank."""

    def shared_folder(
        self, folder: str, *, replace: bool = False, sync: bool = True
    ) -> contextlib.AbstractContextManager[str]:
        """One temporary folder every rank fills, renamed into place at ``folder`` by rank
        0 once every rank is done (nothing left behind on an error)."""

    def first_writes(self, write: Callable[[], Any]) -> Any:
        """``write()`` on rank 0 only; its result (or its error) on every rank."""

    def owners(self, sizes: Sequence[int]) -> list[int]:
        """The rank that writes each item of these byte sizes (balanced by bytes)."""

    def carry(self, exc: BaseException) -> BaseException:
        """``exc`` as an error that crosses the group's collectives as plain data."""

    def uncarry(self, exc: BaseException) -> BaseException:
        """The error :meth:`carry` wrapped (``exc`` itself otherwise)."""


class Note(str):
    """A line of :attr:`SaveResult.notes` that carries data besides its words.

    It reads as its text (``str``, JSON); a caller that names things its own way renders
    it with :meth:`render`.

    Attributes:
        template: the text, with ``{option}`` where the :class:`WriteOptions` field
            ``option`` is named.
        option: that field's name (None: the text names none).
        kind: what the note tells, for a caller that acts on it (``"structure"``: a torch
            file kept its input's structure; ``"as_values"``: ties written as values).
        entries: the entries the note is about (for ``"structure"``: what the structure
            could not carry, as ``"where: what"``).
    """

    template: str
    option: str | None
    kind: str | None
    entries: tuple[str, ...]

    def __new__(
        cls, template: str, *, option: str | None = None, kind: str | None = None, entries: Sequence[str] = ()
    ) -> Note:
        self = super().__new__(cls, template.replace("{option}", option) if option else template)
        self.template, self.option, self.kind, self.entries = template, option, kind, tuple(entries)
        return self

    def render(self, name: Callable[[str], str]) -> str:
        """The text with the option named by ``name(option)`` (a CLI gives its flag)."""
        return self.template.replace("{option}", name(self.option)) if self.option else str(self)


@dataclass(frozen=True)
class WriteOptions:
    """How to write a checkpoint.

    Attributes:
        format: ``"safetensors"``, ``"torch"``, ``"dcp"``, or None (from the target's name).
        max_shard_size: bytes per shard (an int, or ``"5GB"``): a folder of shards.
        overwrite: replace an existing output.
        in_place: an input of the checkpoint may be replaced (the write stays atomic).
        sync: fsync before the rename (durable after a power loss).
        keep_aliases: a model-folder output keeps every alias as an alias record; by
            default those ``from_pretrained`` would not restore (all but the head tie)
            are written as values.
        flat: a torch file written from a torch file is a flat state dict; by default it
            keeps the input's structure (containers, keys, non-tensor values).
        progress: called with the byte count of each piece written.
        collective: the process group writing together (None: this process alone).
    """

    format: str | None = None
    max_shard_size: int | str | None = None
    overwrite: bool = False
    in_place: bool = False
    sync: bool = True
    keep_aliases: bool = False
    flat: bool = False
    progress: Callable[[int], None] | None = None
    collective: Collective | None = None


@dataclass(frozen=True)
class SaveResult:
    """What a write wrote.

    Attributes:
        path: the file, or the folder of shards.
        stored: how many tensors were stored.
        nbytes: their bytes.
        aliases: ``{alias: {"source": name, "transform": [step, ...]}}`` recorded.
        shards: the shard file names, for sharded output; else None.
        format: the format written (``"safetensors"``, ``"torch"``, ``"dcp"``).
        files: for a folder output from a folder input, the other files carried over.
        config: for a Hugging Face folder output, what changed in ``config.json``
            (``{"tie_word_embeddings": {"from": x, "to": y}}``; empty when nothing did).
        dropped_metadata: metadata keys the format could not keep (a torch file and a
            DCP checkpoint hold tensors only).
        aliases_as_values: aliases written as tensors of their own, for a format that
            has no aliases (DCP), or that ``from_pretrained`` would not restore (a model
            folder without ``keep_aliases``); they are not in ``aliases``.
        notes: what the write did that the caller should be told, one line each (in
            place: what was replaced; ties written as values; config fields updated).
    """

    path: str
    stored: int
    nbytes: int
    aliases: dict[str, dict[str, Any]]
    shards: list[str] | None = None
    format: str = "safetensors"
    files: list[str] | None = None
    config: dict[str, Any] | None = None
    dropped_metadata: list[str] = field(default_factory=list)
    aliases_as_values: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The writers' JSON summary, as the CLI prints it: ``output``, ``format``,
        ``stored``, ``bytes``, ``aliases`` (``[{"name", "source", "transform"}]``), then
        ``shards``, ``files`` and ``config``, ``notes``, ``dropped_metadata`` and
        ``aliases_as_values`` where they apply."""
        out: dict[str, Any] = {
            "output": self.path,
            "format": self.format,
            "stored": self.stored,
            "bytes": self.nbytes,
            "aliases": [{"name": n, **r} for n, r in self.aliases.items()],
        }
        if self.shards is not None:
            out["shards"] = self.shards
        if self.files is not None:
            out["files"] = self.files
            out["config"] = self.config or {}
        if self.notes:
            out["notes"] = self.notes
        if self.dropped_metadata:
            out["dropped_metadata"] = self.dropped_metadata
        if self.aliases_as_values:
            out["aliases_as_values"] = self.aliases_as_values
        return out
