"""``CompareOptions``: what a compare decides (tolerances, thresholds, ties, rollup, filter,
device) and how it runs (``Tuning``), in one frozen, checked object shared by the library,
the recipe runner and the command line; and the ``Mapper`` a caller may pass to spread
the tensor pairs over ranks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import UsageError
from .criteria import Criteria
from .stats import Tuning

__all__ = ["CompareOptions", "Mapper", "serial_map"]


class Mapper(Protocol):
    """``mapper(items, size, compute, skipped=)``: ``[compute(x) for x in items]``, in order.

    The serial one (``serial_map``) is the default; under ``torchrun`` the caller passes
    ``wsurgery.distributed.map_by_bytes``, which has each rank compute its share (by
    ``size``) and gathers the results on every rank, calling ``skipped(size)`` for the
    items other ranks computed.
    """

    def __call__(
        self,
        items: Sequence[Any],
        size: Callable[[Any], int],
        compute: Callable[[Any], Any],
        *,
        skipped: Callable[[int], None] | None = None,
    ) -> list[Any]: ...


def serial_map(
    items: Sequence[Any],
    size: Callable[[Any], int],
    compute: Callable[[Any], Any],
    *,
    skipped: Callable[[int], None] | None = None,
) -> list[Any]:
    """Every item computed here, in order (the ``Mapper`` of a single process)."""
    return [compute(x) for x in items]


def _depth(by_module: Any) -> int | str | None:
    if by_module is None or by_module == "auto":
        return by_module
    if isinstance(by_module, bool) or not isinstance(by_module, int) or by_module < 1:
        raise UsageError(
            f"by_module must be a depth >= 1 or 'auto', got {by_module!r}",
            param="by_module",
            hint="a depth counts name components: 2 rolls 'layers.0.attn.qkv.weight' into 'layers.0'",
        )
    return by_module


@dataclass(frozen=True)
class CompareOptions:
    """Options of ``diff`` and ``check``, checked when made (``UsageError`` naming the field).

    Attributes:
        atol, rtol: elements agree when ``|a - b| <= atol + rtol * |b|`` (finite, >= 0).
        max_rel_l2: a pair whose ``||a - b|| / ||a||`` is at most this counts as equal.
        min_cosine: a pair whose cosine is at least this (in [-1, 1]) counts as equal.
        ignore_ties: compare values only (``diff``).
        by_module: roll tensors up into modules of this depth, or ``"auto"`` (``diff``).
        by_module_min_changed: roll up only when at least this many names changed.
        filter: a selector (exact name, module prefix or glob; ``wsurgery.selectors``):
            only the names it selects are compared (``diff``).
        device: where to compare: None / ``"cpu"`` (numpy), ``"cuda[:N]"`` (torch).
        tuning: threads (``Tuning``); None: detected when the compare runs. Never changes
            a result.

    Example:

    ```python
    from wsurgery.compare import CompareOptions, diff

    report = diff("a.safetensors", "b.safetensors", CompareOptions(max_rel_l2=1e-3, by_module=2))
    ```
    """

    atol: float = 0.0
    rtol: float = 0.0
    max_rel_l2: float | None = None
    min_cosine: float | None = None
    ignore_ties: bool = False
    by_module: int | str | None = None
    by_module_min_changed: int = 0
    filter: str | None = None
    device: str | None = None
    tuning: Tuning | None = None

    def __post_init__(self) -> None:
        crit = Criteria.of(self.atol, self.rtol, self.max_rel_l2, self.min_cosine)
        for name in ("atol", "rtol", "max_rel_l2", "min_cosine"):
            object.__setattr__(self, name, getattr(crit, name))
        object.__setattr__(self, "by_module", _depth(self.by_module))
        object.__setattr__(self, "ignore_ties", bool(self.ignore_ties))
        if isinstance(self.by_module_min_changed, bool) or not isinstance(self.by_module_min_changed, int):
            raise UsageError(
                f"by_module_min_changed must be an integer, got {self.by_module_min_changed!r}",
                param="by_module_min_changed",
            )
        if self.filter is not None and not isinstance(self.filter, str):
            raise UsageError(f"filter must be a string, got {type(self.filter).__name__}", param="filter")
        if self.tuning is not None and not isinstance(self.tuning, Tuning):
            raise UsageError(f"tuning must be a Tuning, got {type(self.tuning).__name__}", param="tuning")
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device))

    @property
    def criteria(self) -> Criteria:
        """When a compared pair counts as equal."""
        return Criteria(self.atol, self.rtol, self.max_rel_l2, self.min_cosine)

    @classmethod
    def of(cls, options: CompareOptions | None = None, **fields: Any) -> CompareOptions:
        """``options`` (default: all defaults) with ``fields`` replaced; an unknown field
        is a ``UsageError``."""
        base = options if options is not None else cls()
        if not isinstance(base, CompareOptions):
            raise UsageError(f"options must be CompareOptions, got {type(base).__name__}", param="options")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise UsageError(f"unknown compare option {unknown[0]!r}", param=unknown[0])
        return dataclasses.replace(base, **fields) if fields else base
