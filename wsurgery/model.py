"""The model at the bottom: ``Checkpoint`` (ordered names -> lazy tensor entries, aliases,
metadata, source format), the abstract :class:`Stored` and :class:`Derived`.

Immutable data with no file format, no verb and no writer: the readers of
``wsurgery.io`` build one in a single constructor call, ``wsurgery.surgery`` makes new
ones with :meth:`Checkpoint.evolve`, and the public facade (``wsurgery.api``) adds the
verb methods and ``save``.

A checkpoint holds *stored* tensors (each with its own bytes) and *aliases* (a name
whose value is a view transform of one stored tensor). Nothing here reads tensor data
until asked; importing this module and loading a safetensors checkpoint never imports
torch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .dtypes import BY_NAME, name_of_torch_dtype
from .errors import InputError, UnknownNameError, close_matches

if TYPE_CHECKING:
    from .transforms import Transform

# The transforms sit above the model (annotations only here); looking a name up
# (entry, value, shape and dtype) is ``wsurgery.lookup``.


_DIGITS = re.compile(r"[0-9]+")


def _number(m) -> str:
    digits = m.group().lstrip("0")
    return f"\x00{min(len(digits), 999):03d}{digits}"  # shorter numbers first, then by value


def natural_key(name: str) -> tuple[str, str]:
    """Sort ``layers.2`` before ``layers.10`` (and a number before text at the same place).

    One string per name, compared in C: each run of digits becomes its length and value
    (never an ``int``, so a hostile 5,000-digit run costs nothing). The name itself breaks
    ties (``layers.02`` and ``layers.2``)."""
    return _DIGITS.sub(_number, name), name


# --- stored tensors -------------------------------------------------------------------


class _Sized:
    """``numel`` and ``nbytes`` from ``shape`` and ``dtype``."""

    __slots__ = ()

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * BY_NAME[self.dtype].itemsize


class ByteSink(Protocol):
    """Where a stored tensor writes its bytes (the io layer gives one over an open file)."""

    def write_bytes(self, data: Any) -> None:
        """Write every byte of ``data`` (a buffer)."""

    def copy_range(self, path: str, offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` bytes of the file ``path`` from ``offset``, unread by Python."""


class Stored(_Sized):
    """A tensor with bytes of its own. Subclasses say where the bytes come from."""

    __slots__ = ()

    name: str
    dtype: str
    shape: tuple[int, ...]

    def raw_location(self) -> tuple[str, int, int] | None:
        """``(path, offset, nbytes)`` when the bytes lie verbatim in a file."""
        return None

    def raw(self) -> memoryview | None:
        """The bytes, mapped from a file without a copy, when they can be; else None."""
        return None

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Let go of the pages :meth:`raw` mapped (nothing by default)."""

    def tensor(self, device: Any = "cpu") -> Any:
        raise NotImplementedError

    def write(self, f: ByteSink) -> None:
        """Write the tensor's raw little-endian bytes to ``f``."""
        loc = self.raw_location()
        if loc is not None:
            f.copy_range(*loc)
            return
        f.write_bytes(tensor_bytes(self.tensor("cpu")))

    def renamed(self, name: str) -> Stored:
        clone = copy.copy(self)
        setattr(clone, "name", name)  # noqa: B010 - every concrete class has the slot
        return clone


def tensor_bytes(t: Any) -> Any:
    """A zero-copy (where possible) byte view of a CPU tensor's contiguous data."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().data


class TensorStored(Stored):
    """A torch tensor in memory (or memory-mapped by ``torch.load(mmap=True)``)."""

    def __init__(self, name: str, t):
        self.name = name
        self.t = t
        self.dtype = name_of_torch_dtype(t.dtype)
        self.shape = tuple(t.shape)

    def tensor(self, device="cpu"):
        return self.t if self.t.device == _device(device) else self.t.to(device)


def _device(device: Any) -> Any:
    import torch

    return torch.device(device)


# --- derived values -------------------------------------------------------------------


@dataclass(frozen=True)
class Derived(_Sized):
    """``transform(base)``: a stored tensor seen through a transform, with the shape and
    dtype the transform gives (inferred without data when it is made, by :meth:`of`).

    It is an alias's value (``Checkpoint.aliases``), the value of a computed copy
    (``ComputedStored.value``), a planned step's value (``surgery.Op.value``) and one
    side of a compare.
    """

    base: Stored
    transform: Transform
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, base: Stored, transform: Transform) -> Derived:
        """``transform(base)`` (``transforms.IDENTITY`` for the base itself); raises
        ``TransformError`` when the transform does not fit."""
        shape, dtype = transform.infer(base.shape, base.dtype)
        return cls(base, transform, tuple(shape), dtype)

    def then(self, extra: Transform) -> Derived:
        """This value, then ``extra``."""
        return self if extra.is_identity else Derived.of(self.base, self.transform.then(extra))

    @property
    def source(self) -> str:
        """The stored tensor's name."""
        return self.base.name

    @property
    def specs(self) -> list[str]:
        return self.transform.specs()

    def record(self) -> dict:
        """The alias record: ``{"source": name, "transform": [step, ...]}``."""
        return {"source": self.source, "transform": self.specs}


# --- the checkpoint -------------------------------------------------------------------


_C = TypeVar("_C", bound="Checkpoint")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint: ordered names -> lazy tensors, aliases, metadata, the source format.

    Nothing is read until asked: opening reads headers (or, for torch files, maps the
    file), and :meth:`save` streams one tensor at a time, copying untouched tensors as
    raw bytes. Use it as a context manager (or call :meth:`close`) to release the files.

    Invariants (checked when it is made): a name is stored or an alias, never both;
    every alias's base is the stored tensor of its source name.

    Attributes:
        stored: name -> tensor with bytes of its own.
        aliases: name -> :class:`Derived` over a stored tensor (view steps only).
        metadata: the file's own metadata, alias records removed.
        path: where it was read from (None for one built in memory).
        format: the source format (``"safetensors"``, ``"torch-zip"``, ...).
        skipped: entries of a torch file that are not tensors, as ``"name: what"``.
        container: the key a torch state dict was found under (``state_dict``), if any.
        input_files: every file the tensors come from.
        changes: the surgery steps (``surgery.Op``) that made this checkpoint from what
            was read, in order.
        model_folder: the folder it was read from as a whole (a Hugging Face model
            folder, or a folder of shards), whose other files a folder output carries
            over (``wsurgery.io.hf.ModelFolder``); None for a file.

    Example:
        >>> with wsurgery.open("model.safetensors") as ckpt:          # doctest: +SKIP
        ...     tied = ckpt.tie("embedding.weight", "projection.weight")
        ...     tied.save("tied.safetensors")
    """

    stored: dict[str, Stored]
    aliases: dict[str, Derived] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    format: str = "memory"
    skipped: list[str] = field(default_factory=list)
    container: str | None = None
    input_files: list[str] = field(default_factory=list)
    changes: list = field(default_factory=list)
    model_folder: Any = None

    def __post_init__(self) -> None:
        for name, a in self.aliases.items():
            if name in self.stored:
                raise InputError(f"{name!r} is both stored and an alias")
            if self.stored.get(a.source) is not a.base:
                raise InputError(f"alias {name!r} points at {a.source!r}, which is not stored")

    def evolve(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` (field=value), of the same class: a subclass (the public
        facade) survives surgery. The invariants are checked on the result."""
        return dataclasses.replace(self, **changes)

    # -- context -------------------------------------------------------------------
    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the files this checkpoint reads from (also those of derived checkpoints
        that share them). Safe to call twice."""
        seen = set()
        todo: list[Any] = list(self.stored.values())
        while todo:
            s = todo.pop()
            base = getattr(s, "base", None)  # a value computed from another (expressions)
            if base is not None:
                todo.append(base)
            todo.extend(p.base for p in getattr(s, "parts", ()))
            todo.extend(getattr(s, "stored_inputs", tuple)())  # merged values (wsurgery.merging)
            f = getattr(s, "file", None)
            if f is not None and id(f) not in seen:
                seen.add(id(f))
                f.close()

    # -- names ---------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every name, stored and alias, in natural order (``layers.2`` before ``layers.10``)."""
        return sorted([*self.stored, *self.aliases], key=natural_key)

    def keys(self) -> list[str]:
        """Every name, as :meth:`names` (the ``safe_open`` spelling)."""
        return self.names()

    def __contains__(self, name: object) -> bool:
        return name in self.stored or name in self.aliases

    def __len__(self) -> int:
        return len(self.stored) + len(self.aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    # -- data ----------------------------------------------------------------------
    def get_tensor(self, name: str, device="cpu"):
        """One tensor, read now, as a ``torch.Tensor`` on ``device``.

        An alias comes back as a view of its source tensor.

        Example:
            >>> with wsurgery.open("model.safetensors") as ckpt:   # doctest: +SKIP
            ...     w = ckpt.get_tensor("embedding.weight", device="cuda")
        """
        stored = self.stored.get(name)
        if stored is not None:
            return stored.tensor(device)
        alias = self.aliases.get(name)
        if alias is None:
            raise UnknownNameError(name, path=self.path, candidates=close_matches(self.names(), name))
        return alias.transform.apply(alias.base.tensor(device))

    tensor = get_tensor

    def tensors(self, device="cpu") -> Iterator[tuple[str, Any]]:
        """``(name, tensor)`` for every name, in order, read one at a time: memory holds one
        tensor (and its source, for an alias), never the checkpoint. Each alias is a view
        of a source read for it alone; use :meth:`state_dict` for ties that share memory.

        Example:
            >>> for name, t in ckpt.tensors():  # doctest: +SKIP
            ...     print(name, t.norm())
        """
        for name in self.names():
            yield name, self.get_tensor(name, device)

    def state_dict(self, device="cpu") -> dict:
        """Every tensor read into memory; aliases are views of their sources."""
        out = {name: s.tensor(device) for name, s in self.stored.items()}
        for name, a in self.aliases.items():
            out[name] = a.transform.apply(out[a.source])
        return {n: out[n] for n in self.names()}

    # -- totals --------------------------------------------------------------------
    @property
    def total_params(self) -> int:
        return sum(s.numel for s in self.stored.values())

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.stored.values())
