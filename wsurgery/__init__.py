"""wsurgery: weight surgery on PyTorch checkpoints.

Importing the package is cheap and never imports torch; the functions below import
it only when the work needs tensors. ``dir(wsurgery)`` is the public face: the
functions, :class:`Checkpoint`, the options and results, and the errors; the report
types are imported when first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# wsurgery.distributed.session() (scale-out) and wsurgery.testing.assert_checkpoint_equal; neither imports torch
from . import distributed, testing
from .api import Checkpoint, apply, check, convert, diff, load, load_state_dict, open, save_state_dict
from .errors import (
    DistributedError,
    InputError,
    OutputError,
    Problem,
    SurgeryError,
    TransformError,
    UnknownNameError,
    UsageError,
    WsurgeryError,
)
from .io.options import SaveResult, WriteOptions
from .model import Derived

if TYPE_CHECKING:
    from .compare import CheckReport, DiffReport, Tuning
    from .surgery.recipe import ApplyResult

_LAZY = {
    "ApplyResult": "wsurgery.surgery.recipe",
    "CheckReport": "wsurgery.compare",
    "DiffReport": "wsurgery.compare",
    "Tuning": "wsurgery.compare",
}

__all__ = [
    "ApplyResult",
    "CheckReport",
    "Checkpoint",
    "Derived",
    "DiffReport",
    "DistributedError",
    "InputError",
    "OutputError",
    "Problem",
    "SaveResult",
    "SurgeryError",
    "TransformError",
    "Tuning",
    "UnknownNameError",
    "UsageError",
    "WriteOptions",
    "WsurgeryError",
    "apply",
    "check",
    "convert",
    "diff",
    "distributed",
    "load",
    "load_state_dict",
    "open",
    "save_state_dict",
    "testing",
]


def __getattr__(name: str) -> Any:
    """The report types, imported when first asked for (they import numpy)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wsurgery' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
