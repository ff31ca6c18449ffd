"""Stored values computed from others: a transform chain over one tensor
(:class:`ComputedStored`) and parts concatenated or stacked (:class:`Joined`).

Both are computed when written or read, one tensor in flight at a time; both write
through a :class:`~wsurgery.model.ByteSink`, so nothing here knows a file format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .model import ByteSink, Derived, Stored, _device, tensor_bytes

if TYPE_CHECKING:
    from .transforms import Transform


class ComputedStored(Stored):
    """A tensor of its own whose value is ``transform(base)`` (a :class:`Derived`), computed
    when written or read: one tensor in flight at a time.

    Written on the CPU from a safetensors file, it is computed with numpy when every step
    allows (``_use_numpy``), with the bytes torch would give; otherwise with torch."""

    value: Derived
    device: Any

    def __init__(self, name: str, base: Stored, transform: Transform, device="cpu"):
        if isinstance(base, ComputedStored) and str(base.device) == str(device):
            inner: ComputedStored = base
            base, transform = inner.base, inner.transform.then(transform)  # one chain, computed once
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
        if str(self.device) != "cpu" or self.base.raw_location() is None:
            return False
        from .numpy_apply import supports

        return supports(self.transform, self.base.dtype)

    def _write_numpy(self, f: ByteSink) -> bool:
        """Compute and write with numpy; False (nothing written) when the result holds a NaN
        whose bits torch may set otherwise: the caller then computes with torch."""
        import numpy as np

        from .numpy_apply import apply, has_nan, needs_nan_check, numpy_view

        base = self.base
        raw = base.raw()
        if raw is None:
            return False
        try:
            out = apply(self.transform, numpy_view(raw, base.dtype, base.shape), base.dtype)
            out = np.ascontiguousarray(out)
            if needs_nan_check(self.transform, base.dtype) and has_nan(out):
                return False
            f.write_bytes(out.reshape(-1).view(np.uint8))
            return True
        finally:
            base.release()  # the pages read stay in the page cache, out of this process

    def write(self, f: ByteSink) -> None:
        loc = self.raw_location()
        if loc is not None:
            f.copy_range(*loc)
            return
        if self._use_numpy() and self._write_numpy(f):
            return
        f.write_bytes(tensor_bytes(self._compute()))


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

    def write(self, f: ByteSink) -> None:
        if self.dim == 0:
            for p in self.parts:
                self._part(p).write(f)
            return
        f.write_bytes(tensor_bytes(self.tensor("cpu")))
