"""wsurgery: weight surgery on PyTorch checkpoints.

Importing the package is cheap and never imports torch; the functions below import
it only when the work needs tensors.
"""

from __future__ import annotations

__version__ = "0.1.0"

# wsurgery.distributed.session() (scale-out) and wsurgery.testing.assert_checkpoint_equal; neither imports torch
from . import distributed, testing  # noqa: E402, F401
from .api import apply, check, convert, diff, load, load_state_dict, merge, open, save_state_dict  # noqa: E402
from .checkpoint import Checkpoint, Derived, SaveResult  # noqa: E402
from .errors import (  # noqa: E402
    InputError,
    OutputError,
    Problem,
    SurgeryError,
    TransformError,
    UnknownNameError,
    UsageError,
    WsurgeryError,
)

__all__ = [
    "Checkpoint",
    "Derived",
    "InputError",
    "OutputError",
    "Problem",
    "SaveResult",
    "SurgeryError",
    "TransformError",
    "UnknownNameError",
    "UsageError",
    "WsurgeryError",
    "apply",
    "check",
    "convert",
    "diff",
    "load",
    "load_state_dict",
    "merge",
    "open",
    "save_state_dict",
    "testing",
]
