"""``Checkpoint``: ordered names -> lazy tensor entries, aliases, metadata, source format
(built by ``wsurgery.readers`` from files, or from tensors in memory).

A checkpoint holds *stored* tensors (each with its own bytes) and *aliases* (a name
whose value is a view transform of one stored tensor). Nothing here reads tensor data
until asked; importing this module and loading a safetensors checkpoint never imports
torch.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import aliases as alias_codec
from .dtypes import BY_NAME, name_of_torch_dtype
from .errors import InputError, UnknownNameError
from .formats.safetensors import SafetensorsFile, TensorRecord

if TYPE_CHECKING:
    from .transforms import Transform

# The writer and the transforms are imported where they are used: `inspect` of a file
# without aliases needs neither, and it must stay well under 0.2 s as a whole process.


def parse(specs):
    from .transforms import parse as _parse

    return _parse(specs)


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


class Stored(_Sized):
    """A tensor with bytes of its own. Subclasses say where the bytes come from."""

    __slots__ = ()

    name: str
    dtype: str
    shape: tuple[int, ...]

    def raw_location(self) -> tuple[str, int, int] | None:
        """``(path, offset, nbytes)`` when the bytes lie verbatim in a file."""
        return None

    def tensor(self, device="cpu"):
        raise NotImplementedError

    def write(self, f) -> None:
        """Write the tensor's raw little-endian bytes at ``f``'s position."""
        from .formats.writer import copy_range, write_all

        loc = self.raw_location()
        if loc is not None:
            copy_range(loc[0], loc[1], loc[2], f)
            return
        write_all(f, tensor_bytes(self.tensor("cpu")))

    def renamed(self, name: str) -> Stored:
        clone = copy.copy(self)
        clone.name = name
        return clone


def tensor_bytes(t):
    """A zero-copy (where possible) byte view of a CPU tensor's contiguous data."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().data


class FileStored(Stored):
    """Bytes in a safetensors file, reached lazily."""

    __slots__ = ("file", "record", "name", "dtype", "shape")

    def __init__(self, file: SafetensorsFile, record: TensorRecord, name: str | None = None):
        self.file = file
        self.record = record
        self.name = name or record.name
        self.dtype = record.dtype
        self.shape = record.shape

    def raw_location(self):
        offset, nbytes = self.file.absolute_range(self.record.name)
        return self.file.path, offset, nbytes

    def raw(self) -> memoryview:
        return self.file.raw(self.record.name)

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Unmap the pages of bytes ``[start, stop)`` of this tensor (``MADV_DONTNEED`` on
        the file's read-only shared map): the data stays in the page cache and is mapped
        again on the next access. Keeps a streaming read's resident set bounded."""
        import mmap

        m = self.file._mmap
        if m is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        offset, nbytes = self.file.absolute_range(self.record.name)
        stop = nbytes if stop is None else min(stop, nbytes)
        lo = (offset + max(0, start)) // mmap.PAGESIZE * mmap.PAGESIZE
        if offset + stop > lo:
            m.madvise(mmap.MADV_DONTNEED, lo, offset + stop - lo)

    def tensor(self, device="cpu"):
        import torch

        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        if self.nbytes:
            self.file.read_into(self.record.name, buf.numpy())
        t = buf.view(getattr(torch, self.dtype)).reshape(self.shape)
        return t if str(device) == "cpu" else t.to(device)


class TensorStored(Stored):
    """A torch tensor in memory (or memory-mapped by ``torch.load(mmap=True)``)."""

    def __init__(self, name: str, t):
        self.name = name
        self.t = t
        self.dtype = name_of_torch_dtype(t.dtype)
        self.shape = tuple(t.shape)

    def tensor(self, device="cpu"):
        return self.t if self.t.device == _device(device) else self.t.to(device)


class ComputedStored(Stored):
    """A tensor of its own whose value is ``transform(base)`` (a :class:`Derived`), computed
    when written or read: one tensor in flight at a time.

    Written on the CPU from a safetensors file, it is computed with numpy when every step
    allows (``_use_numpy``), with the bytes torch would give; otherwise with torch."""

    def __init__(self, name: str, base: Stored, transform: Transform, device="cpu"):
        if isinstance(base, ComputedStored) and str(base.device) == str(device):
            base, transform = base.base, base.transform.then(transform)  # one chain, computed once
        self.name = name
        self.value = Derived.of(base, transform)
        self.device = device
        self.shape, self.dtype = self.value.shape, self.value.dtype

    @property
    def base(self) -> Stored:
        return self.value.base

    @property
    def transform(self) -> Transform:
        return self.value.transform

    def raw_location(self):
        """The identity of bytes that lie in a file is those bytes: copied, never decoded."""
        return self.base.raw_location() if self.transform.is_identity else None

    def _compute(self, own: bool = False):
        base = self.base.tensor(self.device)
        out = self.transform.apply(base, allow_copy=True).contiguous()
        if own and out.numel() and out.untyped_storage().data_ptr() == base.untyped_storage().data_ptr():
            out = out.clone()  # a view of an in-memory base: give it bytes of its own
        return out

    def tensor(self, device="cpu"):
        """The value as a tensor of its own: never a view of the base's memory."""
        out = self._compute(own=True)
        return out if out.device == _device(device) else out.to(device)

    def _use_numpy(self) -> bool:
        """Whether :meth:`write` computes with numpy rather than torch: on the CPU, over the
        bytes of a safetensors file, with steps that numpy computes bit for bit as torch
        does (``wsurgery.numpy_apply.supports``). Then writing never imports torch."""
        if str(self.device) != "cpu" or not isinstance(self.base, FileStored):
            return False
        from .numpy_apply import supports

        return supports(self.transform, self.base.dtype)

    def _write_numpy(self, f) -> bool:
        """Compute and write with numpy; False (nothing written) when the result holds a NaN
        whose bits torch may set otherwise: the caller then computes with torch."""
        import numpy as np

        from .formats.writer import write_all
        from .numpy_apply import apply, has_nan, needs_nan_check, numpy_view

        base = self.base
        try:
            out = apply(self.transform, numpy_view(base.raw(), base.dtype, base.shape), base.dtype)
            out = np.ascontiguousarray(out)
            if needs_nan_check(self.transform, base.dtype) and has_nan(out):
                return False
            write_all(f, out.reshape(-1).view(np.uint8))
            return True
        finally:
            base.release()  # the pages read stay in the page cache, out of this process

    def write(self, f) -> None:
        from .formats.writer import copy_range, write_all

        loc = self.raw_location()
        if loc is not None:
            copy_range(loc[0], loc[1], loc[2], f)
            return
        if self._use_numpy() and self._write_numpy(f):
            return
        write_all(f, tensor_bytes(self._compute()))


class Joined(Stored):
    """Parts concatenated along ``dim`` (``new_axis=False``) or stacked on a new axis
    ``dim``, computed when written or read. Along the first axis the bytes of the result
    are those of the parts one after another, so it is written part by part: memory
    holds one part, and a part that lies verbatim in a file is copied, not decoded."""

    def __init__(self, name: str, parts: Sequence[Derived], dim: int, *, new_axis: bool = False, device="cpu"):
        first = parts[0]
        rank = len(first.shape) + (1 if new_axis else 0)
        self.name = name
        self.parts = tuple(parts)
        self.dim = dim % rank if rank else 0
        self.new_axis = new_axis
        self.device = device
        self.dtype = first.dtype
        if new_axis:
            self.shape = (*first.shape[: self.dim], len(parts), *first.shape[self.dim :])
        else:
            total = sum(p.shape[self.dim] for p in parts)
            self.shape = (*first.shape[: self.dim], total, *first.shape[self.dim + 1 :])

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(p.source for p in self.parts)

    @property
    def label(self) -> str:
        return f"{'stack' if self.new_axis else 'concat'}(dim={self.dim})"

    def _part(self, p: Derived) -> Stored:
        return p.base if p.transform.is_identity else ComputedStored(p.source, p.base, p.transform, self.device)

    def tensor(self, device="cpu"):
        import torch

        pieces = [self._part(p).tensor(device) for p in self.parts]
        return torch.stack(pieces, self.dim) if self.new_axis else torch.cat(pieces, self.dim)

    def write(self, f) -> None:
        from .formats.writer import write_all

        if self.dim == 0:
            for p in self.parts:
                self._part(p).write(f)
            return
        write_all(f, tensor_bytes(self.tensor("cpu")))


def _device(device):
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
    def of(cls, base: Stored, transform: Transform | None = None) -> Derived:
        """``transform(base)``; raises ``TransformError`` when the transform does not fit."""
        if transform is None:
            from .transforms import IDENTITY

            transform = IDENTITY
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


@dataclass(frozen=True)
class SaveResult:
    """What :meth:`Checkpoint.save` wrote.

    Attributes:
        path: the file, or the folder of shards.
        stored: how many tensors were stored.
        nbytes: their bytes.
        aliases: ``{alias: {"source": name, "transform": [step, ...]}}`` recorded.
        shards: the shard file names, for sharded output; else None.
        format: the format written (``"safetensors"``, ``"torch"``).
        files: for a folder output from a folder input, the other files carried over.
        config: for a Hugging Face folder output, what changed in ``config.json``
            (``{"tie_word_embeddings": {"from": x, "to": y}}``; empty when nothing did).
        dropped_metadata: metadata keys the format could not keep (a torch file and a
            DCP checkpoint hold tensors only).
        aliases_as_values: aliases written as tensors of their own, for a format that
            has no aliases (DCP); ``aliases`` is then empty.
    """

    path: str
    stored: int
    nbytes: int
    aliases: dict[str, dict]
    shards: list[str] | None = None
    format: str = "safetensors"
    files: list[str] | None = None
    config: dict | None = None
    dropped_metadata: list[str] = field(default_factory=list)
    aliases_as_values: list[str] = field(default_factory=list)


@dataclass
class Checkpoint:
    """A checkpoint: ordered names -> lazy tensors, aliases, metadata, the source format.

    Nothing is read until asked: opening reads headers (or, for torch files, maps the
    file), and :meth:`save` streams one tensor at a time, copying untouched tensors as
    raw bytes. Use it as a context manager (or call :meth:`close`) to release the files.

    Invariants (checked by :meth:`check_invariants` before every write): a name is
    stored or an alias, never both; every alias's base is the stored tensor of its
    source name.

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
            over (``wsurgery.formats.hf.ModelFolder``); None for a file.

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

    # -- context -------------------------------------------------------------------
    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the files this checkpoint reads from (also those of derived checkpoints
        that share them). Safe to call twice."""
        seen = set()
        todo = list(self.stored.values())
        while todo:
            s = todo.pop()
            if isinstance(s, ComputedStored):
                todo.append(s.base)
            elif isinstance(s, Joined):
                todo.extend(p.base for p in s.parts)
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

    def entry(self, name: str) -> Stored | Derived:
        """The stored tensor or the alias under ``name``; ``UnknownNameError`` if none."""
        if name in self.stored:
            return self.stored[name]
        if name in self.aliases:
            return self.aliases[name]
        raise self.unknown(name)

    def value(self, name: str, extra: Transform | None = None) -> Derived:
        """``extra(name)`` as a :class:`Derived` over a stored tensor (aliases followed)."""
        e = self.entry(name)
        d = e if isinstance(e, Derived) else Derived.of(e)
        return d if extra is None else d.then(extra)

    def unknown(self, name: str, what: str = "tensor or module") -> UnknownNameError:
        """The error for a name this checkpoint does not hold, with close matches."""
        import difflib

        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)
        return UnknownNameError(name, path=self.path, candidates=close, what=what)

    def resolve(self, name: str) -> list[tuple[str, str]]:
        """``[(full name, suffix)]`` for a tensor name or a module prefix.

        A name that is a tensor resolves to that tensor (suffix ``""``), even if it is
        also a module prefix. Otherwise every tensor under ``name.`` is returned, with
        the part after the prefix as suffix (``""`` prefix means every tensor).
        """
        if name in self:
            return [(name, "")]
        prefix = name.rstrip(".") + "." if name else ""
        found = [(n, n[len(prefix) :]) for n in self.names() if n.startswith(prefix)]
        if not found:
            raise self.unknown(name)
        return found

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        e = self.entry(name)
        return e.shape, e.dtype

    # -- data ----------------------------------------------------------------------
    def get_tensor(self, name: str, device="cpu"):
        """One tensor, read now, as a ``torch.Tensor`` on ``device``.

        An alias comes back as a view of its source tensor.

        Example:
            >>> with wsurgery.open("model.safetensors") as ckpt:   # doctest: +SKIP
            ...     w = ckpt.get_tensor("embedding.weight", device="cuda")
        """
        e = self.entry(name)
        if isinstance(e, Derived):
            return e.transform.apply(e.base.tensor(device))
        return e.tensor(device)

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

    def alias_records(self) -> dict[str, alias_codec.AliasRecord]:
        return {n: alias_codec.AliasRecord(a.source, tuple(a.specs)) for n, a in self.aliases.items()}

    def check_invariants(self) -> None:
        """Every alias points at a stored tensor and no name is both stored and aliased."""
        for name, a in self.aliases.items():
            if name in self.stored:
                raise InputError(f"{name!r} is both stored and an alias")
            if self.stored.get(a.source) is not a.base:
                raise InputError(f"alias {name!r} points at {a.source!r}, which is not stored")

    # -- surgery -------------------------------------------------------------------
    # Every verb returns a new lazy checkpoint and leaves this one as it is; nothing is
    # read until the result is saved or read. Each refuses with every problem at once
    # (SurgeryError, nothing applied); an unknown source is an UnknownNameError.

    def tie(
        self,
        src: str | Sequence[str],
        dst: str | Sequence[str],
        transform=None,
        *,
        new: bool = False,
        verify: bool = False,
        atol: float = 0.0,
        rtol: float = 0.0,
    ) -> Checkpoint:
        """``dst`` becomes an alias of ``transform(src)``, stored once.

        Args:
            src: a stored or alias name, or a module prefix (every tensor under it); a
                list ties several pairs at once.
            dst: the alias name (new, or an existing tensor of the same shape and dtype
                after the transform); a prefix for a prefix; a list for a list.
            transform: view steps only (``"transpose"``, ``["slice(0,0,8)"]``...).
            new: ``dst`` is meant to be a new name, even one edit away from another.
            verify: refuse unless ``dst`` already holds ``transform(src)`` within
                ``atol``/``rtol`` (reads both): the safe way to dedupe a head stored twice.

        Returns:
            A new lazy :class:`Checkpoint`.

        Example:
            >>> tied = ckpt.tie("embedding.weight", "lm_head.weight", verify=True)  # doctest: +SKIP
        """
        from . import surgery

        result = surgery.plan(self, surgery.requests("tie", src, dst, transform), new=new).apply()
        if verify:
            surgery.verify_ties(self, src, dst, transform, atol=atol, rtol=rtol)
        return result

    def copy(
        self,
        src: str | Sequence[str],
        dst: str | Sequence[str],
        transform=None,
        *,
        other: Checkpoint | None = None,
        device="cpu",
        new: bool = False,
    ) -> Checkpoint:
        """``dst`` holds an independent ``transform(src)``.

        Args:
            src: a tensor or module prefix (a list for several pairs, all read from this
                checkpoint as it is, so two copies can swap two tensors).
            dst: the destination: new, or existing (replaced, whatever its shape or
                dtype; aliases of a replaced tensor keep their values).
            transform: any steps, ``cast`` and ``scale`` included.
            other: take ``src`` from this checkpoint instead.
            device: where the copies are computed when written or read (``"cuda"``).
            new: ``dst`` is meant to be a new name, even one edit away from another.

        Example:
            >>> grown = ckpt.copy("layers.0", "layers.12")  # doctest: +SKIP
        """
        from . import surgery

        reqs = surgery.requests("copy", src, dst, transform)
        return surgery.plan(self, reqs, other=other, device=device, new=new).apply()

    def untie(self, names: str | Sequence[str] | None = None, *, device="cpu") -> Checkpoint:
        """The named aliases (every alias by default) become stored tensors of their own,
        for loaders that know no alias metadata.

        Args:
            names: aliases, stored tensors (every alias of them) or module prefixes.
            device: where the untied values are computed when written.

        Example:
            >>> plain = ckpt.untie()  # doctest: +SKIP
        """
        from . import surgery

        if isinstance(names, str):
            names = [names]
        return surgery.plan(self, surgery.untie_requests(self, names), device=device).apply()

    def rename(self, pattern: str, to: str) -> Checkpoint:
        """Every name ``n`` becomes ``re.sub(pattern, to, n)``; aliases follow their sources.

        Example:
            >>> ckpt.rename(r"^module\\.", "")  # doctest: +SKIP
        """
        from .surgery import rename

        return rename(self, pattern, to)

    def drop(self, names: str | Sequence[str]) -> Checkpoint:
        """Without the tensors ``names`` select (a name, module prefix or glob each); a
        source an alias still uses cannot go.

        Example:
            >>> ckpt.drop(["optimizer.*", "*._extra_state"])  # doctest: +SKIP
        """
        from .surgery import drop

        return drop(self, [names] if isinstance(names, str) else list(names))

    def keep(self, names: str | Sequence[str]) -> Checkpoint:
        """Only the tensors ``names`` select (a name, module prefix or glob each).

        Example:
            >>> ckpt.keep(["layers.*", "embed.weight"])  # doctest: +SKIP
        """
        from .surgery import keep

        return keep(self, [names] if isinstance(names, str) else list(names))

    def cast(self, dtype: str, *, only: Sequence[str] = (), exclude: Sequence[str] = (), device="cpu") -> Checkpoint:
        """Floating tensors (never integers or bool) cast to ``dtype``; ``only``/``exclude``
        choose by glob or module prefix; a tied source is cast once, its aliases follow.

        Example:
            >>> ckpt.cast("bfloat16", exclude=["*norm*"])  # doctest: +SKIP
        """
        from .surgery import cast

        return cast(self, dtype, only=list(only), exclude=list(exclude), device=device)

    def concat(self, srcs: Sequence[str], dst: str, dim: int = 0, *, new: bool = False) -> Checkpoint:
        """``dst`` = ``srcs`` concatenated along ``dim`` (the sources are gone).

        Example:
            >>> ckpt.concat(["q.weight", "k.weight", "v.weight"], "qkv.weight")  # doctest: +SKIP
        """
        from .surgery import concat

        return concat(self, srcs, dst, dim, new=new)

    def split(self, src: str, dsts: Sequence[str], dim: int, sizes: Sequence[int], *, new: bool = False) -> Checkpoint:
        """``dsts`` = pieces of ``src`` along ``dim`` of the given ``sizes`` (``src`` is gone).

        Example:
            >>> ckpt.split("qkv.weight", ["q.weight", "k.weight", "v.weight"], 0, [64, 64, 64])  # doctest: +SKIP
        """
        from .surgery import split

        return split(self, src, dsts, dim, sizes, new=new)

    def stack(self, template: str, dst: str, dim: int = 0, *, new: bool = False) -> Checkpoint:
        """``dst`` = the tensors ``template`` names (``"layers.{i}.w"``) on a new axis ``dim``;
        a template of module prefixes stacks every tensor under them.

        Example:
            >>> ckpt.stack("layers.{i}.fc1.weight", "layers.fc1.weight")  # doctest: +SKIP
        """
        from .surgery import stack

        return stack(self, template, dst, dim, new=new)

    def unstack(self, src: str, template: str, dim: int = 0, *, new: bool = False) -> Checkpoint:
        """The slices of ``src`` along ``dim`` become ``template`` with i = 0, 1, ...

        Example:
            >>> ckpt.unstack("layers.fc1.weight", "layers.{i}.fc1.weight")  # doctest: +SKIP
        """
        from .surgery import unstack

        return unstack(self, src, template, dim, new=new)

    def merge_lora(self, adapter, weight=None, *, device="cpu") -> Checkpoint:
        """PEFT LoRA adapters (folders, in order; ``weight`` one multiplier each) folded in,
        as ``merge_and_unload`` does: see :func:`wsurgery.surgery.lora.merge_lora`.

        Example:
            >>> merged = base.merge_lora("my-lora/")  # doctest: +SKIP
        """
        from .surgery.lora import merge_lora

        return merge_lora(self, adapter, weight, device=device)

    # -- writing -------------------------------------------------------------------
    def _write_items(self):
        from .formats.writer import WriteItem

        self.check_invariants()
        # Largest itemsize first, then by name: every tensor aligned, the same bytes every time.
        order = sorted(self.stored.values(), key=lambda s: (-BY_NAME[s.dtype].itemsize, s.name))
        return [WriteItem(s.name, s.dtype, s.shape, s.nbytes, s.write) for s in order]

    def save(
        self,
        path,
        *,
        overwrite: bool = False,
        max_shard_size: int | str | None = None,
        sync: bool = True,
        progress: Callable[[int], None] | None = None,
        replace_input: bool | None = None,
        format: str | None = None,  # noqa: A002 - safetensors' and torch's word
    ) -> SaveResult:
        """Write the checkpoint atomically: safetensors (aliases recorded in the metadata),
        a torch file (aliases as views of shared storage), or a folder.

        Args:
            path: the output file; a folder with ``max_shard_size`` (Hugging Face-style
                shards and ``model.safetensors.index.json``), when it is an existing
                folder or ends with a separator, or when this checkpoint was read from a
                folder and ``path`` has no weights file's suffix. A folder output holds
                ``model.safetensors`` (or ``pytorch_model.bin``) or the shards, and the
                input folder's other files (``config.json`` with ``tie_word_embeddings``
                true to the ties written, tokenizer files, ...).
            overwrite: replace an existing file or folder; without it, an existing
                output is an ``OutputError``, and so is one of this checkpoint's own inputs.
            max_shard_size: bytes per shard (an int, or ``"5GB"``, ``"500MiB"``).
            sync: fsync the output before renaming it into place (durable after a power
                loss); ``False`` is faster and still atomic against the process dying.
            progress: called with the byte count of each piece written.
            replace_input: whether an input may be replaced; by default as ``overwrite``.
            format: ``"safetensors"``, ``"torch"`` (a ``torch.save`` zip file that
                ``torch.load(weights_only=True)`` reads) or ``"dcp"`` (a folder that
                ``torch.distributed.checkpoint.load`` reads; aliases written as values);
                by default from ``path``'s suffix (``.pt``, ``.pth``, ``.bin``, ``.ckpt``:
                torch).

        Returns:
            A :class:`SaveResult`.

        Under a :func:`wsurgery.distributed.session` of several ranks, every rank calls
        it: a folder is written by all of them (its shards or DCP files split by bytes)
        and renamed into place by rank 0; a single file is written by rank 0.

        Raises:
            OutputError: the output exists, is an input, or cannot be written (nothing
                is left behind at ``path``).
            UsageError: ``format`` is unknown, contradicts ``path``'s suffix, or is
                torch with ``max_shard_size``.

        Example:
            >>> ckpt.save("out.safetensors", overwrite=True)  # doctest: +SKIP
            >>> ckpt.save("out.pt", overwrite=True)  # doctest: +SKIP
        """
        from .outputs import plan_output
        from .outputs import save as _save

        if replace_input is None:
            replace_input = overwrite
        plan = plan_output(
            path, format=format, max_shard_size=max_shard_size, folder_input=self.model_folder is not None
        )
        return _save(self, plan, overwrite=overwrite, replace_input=replace_input, progress=progress, sync=sync)

    def _save_file(self, path, progress=None, *, sync: bool = True) -> None:
        from .formats.writer import write_safetensors

        items = self._write_items()
        meta = alias_codec.encode(self.alias_records(), self.metadata)
        write_safetensors(path, items, meta, progress=progress, sync=sync)

    def _save_sharded(
        self, folder, max_shard_size: int | str, *, replace: bool = False, progress=None, sync: bool = True
    ) -> list[str]:
        """Shards (see :meth:`_shard_plan`) and their index, as a folder; returns the
        shard file names."""
        from .formats.sharded_writer import write_sharded

        shards, shard_meta, index_meta = self._shard_plan(max_shard_size)
        return write_sharded(folder, shards, shard_meta, index_meta, replace=replace, progress=progress, sync=sync)

    def _shard_plan(self, max_shard_size: int | str):
        """Shards in the order of one file; each records the aliases whose source it
        stores, the index's ``metadata`` records them all, ``weight_map`` lists stored
        tensors only. Returns ``(shards, shard metadata, index metadata)``."""
        from .formats.sharded_writer import parse_size, plan_shards

        if isinstance(max_shard_size, str):
            max_shard_size = parse_size(max_shard_size)
        shards = plan_shards(self._write_items(), max_shard_size)
        records = self.alias_records()
        shard_meta = []
        for shard in shards:
            here = {i.name for i in shard}
            mine = {n: r for n, r in records.items() if r.source in here}
            shard_meta.append(alias_codec.encode(mine, self.metadata))
        # The index keeps the JSON record of every alias, not the per-name save_model entries.
        index_meta = alias_codec.encode(records, self.metadata, convention=False)  # the JSON record only
        return shards, shard_meta, index_meta
