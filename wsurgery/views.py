"""Strided views without data: where a tie's view transform puts its elements in the
source's storage, and back again (which view steps make a given strided view).

A torch file keeps a tie as two tensors over one storage: the stored source, contiguous,
and the alias, a view with its own offset, shape and strides. Writing one needs the
view's layout (:func:`layout_of`); reading one back needs the steps (:func:`view_steps`).
Both are pure Python: a :class:`Strided` layout stands in for a tensor, so a safetensors
checkpoint is written as a torch file without importing torch.

Steps found by :func:`view_steps` are spelled in one canonical order: a ``reshape`` of the
source (when the view needs another shape of it), then ``slice`` steps in dim order, then
one ``transpose``/``transpose(d0,d1)``/``permute`` (when the dims are reordered), then a
``reshape`` that only adds or drops dims of size 1 (rare). A tie written in that order
reads back as written (``transpose``, ``permute(2,0,1)``, ``slice(0,0,8)``,
``reshape(4,8)``, ``slice(0,0,8) -> transpose``); another spelling of the same view reads
back in this one (``transpose -> slice(1,0,8)`` as ``slice(0,0,8) -> transpose``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    acc = 1
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


def _view_strides(old: tuple[int, ...], old_strides: tuple[int, ...], new: tuple[int, ...]) -> tuple[int, ...] | None:
    """The strides of ``new`` viewing a layout ``old``/``old_strides`` without a copy, or
    None when no view exists (ATen's ``computeStride``)."""
    if math.prod(old) == 0:
        return contiguous_strides(new)
    if not old:
        return tuple(1 for _ in new)
    out = [0] * len(new)
    view_d = len(new) - 1
    chunk_base = old_strides[-1]
    tensor_numel = 1
    view_numel = 1
    for tensor_d in range(len(old) - 1, -1, -1):
        tensor_numel *= old[tensor_d]
        if tensor_d == 0 or (old[tensor_d - 1] != 1 and old_strides[tensor_d - 1] != tensor_numel * chunk_base):
            while view_d >= 0 and (view_numel < tensor_numel or new[view_d] == 1):
                out[view_d] = view_numel * chunk_base
                view_numel *= new[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if tensor_d > 0:
                chunk_base = old_strides[tensor_d - 1]
                tensor_numel = 1
                view_numel = 1
    if view_d != -1:
        return None
    return tuple(out)


@dataclass(frozen=True)
class Strided:
    """A tensor's place in its storage, in elements: ``shape``, ``strides``, ``offset``.

    It has the few tensor methods the view steps of :mod:`wsurgery.transforms` call
    (``transpose``, ``permute``, ``view``, ``narrow``), so ``transform.apply(layout)``
    gives the layout of the view.
    """

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0
    dtype: str = "float32"

    @classmethod
    def contiguous(cls, shape, dtype: str = "float32", offset: int = 0) -> Strided:
        shape = tuple(shape)
        return cls(shape, contiguous_strides(shape), offset, dtype)

    @classmethod
    def of(cls, t) -> Strided:
        """The layout of a torch tensor."""
        return cls(tuple(t.shape), tuple(t.stride()), t.storage_offset(), str(t.dtype).removeprefix("torch."))

    # -- what the view steps call ----------------------------------------------------
    def stride(self) -> tuple[int, ...]:
        return self.strides

    def size(self) -> tuple[int, ...]:
        return self.shape

    def transpose(self, d0: int, d1: int) -> Strided:
        dims = list(range(len(self.shape)))
        if dims:
            dims[d0], dims[d1] = dims[d1], dims[d0]
        return self.permute(dims)

    def permute(self, dims) -> Strided:
        return Strided(
            tuple(self.shape[d] for d in dims), tuple(self.strides[d] for d in dims), self.offset, self.dtype
        )

    def view(self, shape) -> Strided:
        shape = tuple(shape)
        strides = _view_strides(self.shape, self.strides, shape)
        if strides is None:
            raise RuntimeError(f"view size is not compatible with input tensor's size and stride {self.strides}")
        return Strided(shape, strides, self.offset, self.dtype)

    def narrow(self, dim: int, start: int, length: int) -> Strided:
        shape = list(self.shape)
        shape[dim] = length
        return Strided(tuple(shape), self.strides, self.offset + start * self.strides[dim], self.dtype)

    # -- facts -----------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self) -> bool:
        return all(
            st == c
            for d, st, c in zip(self.shape, self.strides, contiguous_strides(self.shape), strict=False)
            if d != 1
        )

    def same_as(self, other: Strided) -> bool:
        """The same elements in the same places (strides of size-1 dims do not matter)."""
        if self.shape != other.shape or self.dtype != other.dtype:
            return False
        if self.numel == 0:
            return True
        return self.offset == other.offset and all(
            a == b for d, a, b in zip(self.shape, self.strides, other.strides, strict=False) if d != 1
        )


def layout_of(transform, shape, dtype: str = "float32") -> Strided:
    """The layout of ``transform`` (view steps only) over a contiguous tensor of ``shape``:
    where a tie's elements lie in its source's storage. Raises ``TransformError`` when a
    step is no view of it."""
    return transform.apply(Strided.contiguous(tuple(shape), dtype), allow_copy=False)


def view_steps(base: Strided, view: Strided) -> list[str] | None:
    """View steps that turn ``base`` (contiguous) into ``view`` over the same storage, in
    the canonical order of the module doc; None when there are none (or either is empty).
    The steps are checked: applied to ``base`` they give exactly ``view``."""
    if base.dtype != view.dtype or not base.is_contiguous() or base.numel == 0 or view.numel == 0:
        return None
    if base.same_as(view):
        return []
    rel = view.offset - base.offset
    if rel < 0:
        return None
    for squeeze in (False, True):
        specs = _attempt(base, view, rel, squeeze)
        if specs is not None and _gives(base, view, specs):
            return specs
    # A block that no reshape of the whole source holds (a slice, then a reshape of it):
    # the source flattened, sliced to the block, and the block reshaped.
    n = base.numel
    outer = max([st for d, st in zip(view.shape, view.strides, strict=False) if d != 1], default=1)
    extent = 1 + sum((d - 1) * st for d, st in zip(view.shape, view.strides, strict=False))
    length = -(-extent // outer) * outer
    if rel + length > n:
        return None
    flat = [] if base.shape == (n,) else [f"reshape({n})"]
    flat.append(f"slice(0,{rel},{rel + length})")
    block = Strided.contiguous((length,), base.dtype)
    for squeeze in (False, True):
        specs = _attempt(block, view, 0, squeeze)
        if specs is not None and _gives(base, view, flat + specs):
            return flat + specs
    return None


def _gives(base: Strided, view: Strided, specs: list[str]) -> bool:
    from .errors import TransformError
    from .transforms import parse

    try:
        return layout_of(parse(specs), base.shape, base.dtype).same_as(
            Strided(view.shape, view.strides, view.offset - base.offset, view.dtype)
        )
    except TransformError:
        return False


def _attempt(base: Strided, view: Strided, rel: int, squeeze: bool) -> list[str] | None:
    n = base.numel
    dims = [d for d in range(len(view.shape)) if not (squeeze and view.shape[d] == 1)]
    order = sorted(dims, key=lambda d: (-view.strides[d], d))
    strides = [view.strides[d] for d in order]
    if any(s <= 0 for s in strides) or any(a <= b for a, b in zip(strides, strides[1:], strict=False)):
        return None
    # The reshape R of the source whose contiguous strides are the view's (sorted), with
    # one more inner dim when the innermost stride is not 1.
    outer = strides[0] if strides else 1
    if n % outer:
        return None
    sizes = [n // outer] if strides else []
    for a, b in zip(strides, strides[1:], strict=False):
        if a % b:
            return None
        sizes.append(a // b)
    extra = not strides or strides[-1] != 1
    if extra:
        sizes.append(strides[-1] if strides else n)
    r_strides = contiguous_strides(tuple(sizes))
    want = [view.shape[d] for d in order] + ([1] if extra else [])
    specs: list[str] = []
    if tuple(sizes) != base.shape:
        specs.append(f"reshape({','.join(map(str, sizes))})")
    left = rel
    for k, (size, stride, length) in enumerate(zip(sizes, r_strides, want, strict=False)):
        start = left // stride
        left -= start * stride
        if start + length > size:
            return None
        if (start, length) != (0, size):
            specs.append(f"slice({k},{start},{start + length})")
    if left:
        return None
    # Reorder the dims as the view has them (an extra inner dim stays last).
    pos = {d: k for k, d in enumerate(order)}
    perm = [pos[d] for d in dims] + ([len(order)] if extra else [])
    if perm != sorted(perm):
        moved = [k for k, p in enumerate(perm) if p != k]
        if len(moved) == 2:
            specs.append("transpose" if len(perm) == 2 else f"transpose({moved[0]},{moved[1]})")
        else:
            specs.append(f"permute({','.join(map(str, perm))})")
    if squeeze or extra:
        specs.append(f"reshape({','.join(map(str, view.shape))})")
    return specs
