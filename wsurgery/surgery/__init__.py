"""The surgery verbs, as operations on a lazy ``Checkpoint`` that return a new one.

- :mod:`.ties`: ``tie`` / ``copy`` / ``untie``, planned whole and validated first;
- :mod:`.names`: ``rename`` / ``drop`` / ``keep``;
- :mod:`.values`: ``cast``;
- :mod:`.fuse`: ``concat`` / ``split`` / ``stack`` / ``unstack``;
- :mod:`.ops`: what they share (the planned step ``Op``, choosing names, typo checks).

``Checkpoint``'s methods of the same names are the front door; the command line and
recipes call them.
"""

from __future__ import annotations

from .fuse import concat, split, stack, unstack
from .names import drop, keep, rename
from .ops import Op, dependents
from .ties import KINDS, Plan, Request, check_device, pair_names, plan, requests, untie_requests, verify_ties
from .values import cast
from .verbs import copy, tie, untie

__all__ = [
    "KINDS",
    "Op",
    "Plan",
    "Request",
    "cast",
    "check_device",
    "concat",
    "copy",
    "dependents",
    "drop",
    "keep",
    "pair_names",
    "plan",
    "rename",
    "requests",
    "split",
    "stack",
    "tie",
    "unstack",
    "untie",
    "untie_requests",
    "verify_ties",
]
