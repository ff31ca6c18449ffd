"""``tie`` / ``copy`` / ``untie`` as functions of a checkpoint, as the other verbs are: the
one entry the public ``Checkpoint`` methods and the recipe steps both call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..model import Checkpoint
from .ties import plan, requests, untie_requests, verify_ties


def tie(
    ckpt: Checkpoint,
    src: str | Sequence[str],
    dst: str | Sequence[str],
    transform: Any = None,
    *,
    new: bool = False,
    verify: bool = False,
    atol: float = 0.0,
    rtol: float = 0.0,
) -> Checkpoint:
    """``dst`` becomes an alias of ``transform(src)``; see ``wsurgery.Checkpoint.tie``."""
    result = plan(ckpt, requests("tie", src, dst, transform), new=new).apply()
    if verify:
        verify_ties(ckpt, src, dst, transform, atol=atol, rtol=rtol)
    return result


def copy(
    ckpt: Checkpoint,
    src: str | Sequence[str],
    dst: str | Sequence[str],
    transform: Any = None,
    *,
    other: Checkpoint | None = None,
    device: Any = "cpu",
    new: bool = False,
) -> Checkpoint:
    """``dst`` holds an independent ``transform(src)``; see ``wsurgery.Checkpoint.copy``."""
    return plan(ckpt, requests("copy", src, dst, transform), other=other, device=device, new=new).apply()


def untie(ckpt: Checkpoint, names: str | Sequence[str] | None = None, *, device: Any = "cpu") -> Checkpoint:
    """The named aliases (all by default) become stored tensors; see ``wsurgery.Checkpoint.untie``."""
    if isinstance(names, str):
        names = [names]
    return plan(ckpt, untie_requests(ckpt, names), device=device).apply()
