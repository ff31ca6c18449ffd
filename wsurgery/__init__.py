"""wsurgery: weight surgery on PyTorch checkpoints.

Importing the package is cheap: it imports nothing until a name is used (the command
line's ``--version`` needs none of it), and never imports torch; the functions below
import it only when the work needs tensors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it (a name that is a submodule maps to itself)
_WHERE = {
    "Checkpoint": "checkpoint",
    "Derived": "checkpoint",
    "SaveResult": "checkpoint",
    "InputError": "errors",
    "OutputError": "errors",
    "Problem": "errors",
    "SurgeryError": "errors",
    "TransformError": "errors",
    "UnknownNameError": "errors",
    "UsageError": "errors",
    "WsurgeryError": "errors",
    "apply": "api",
    "check": "api",
    "convert": "api",
    "diff": "api",
    "load": "api",
    "load_state_dict": "api",
    "open": "api",
    "save_state_dict": "api",
    "distributed": "distributed",  # wsurgery.distributed.session() (scale-out)
    "testing": "testing",  # wsurgery.testing.assert_checkpoint_equal
}

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
    "open",
    "save_state_dict",
    "testing",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562), then keep the name."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'wsurgery' has no attribute {name!r}")
    module = importlib.import_module(f".{where}", __name__)
    value = module if where == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]


if TYPE_CHECKING:
    from . import distributed, testing  # noqa: F401 - distributed is public, not in __all__ (as before)
    from .api import apply, check, convert, diff, load, load_state_dict, open, save_state_dict
    from .checkpoint import Checkpoint, Derived, SaveResult
    from .errors import (
        InputError,
        OutputError,
        Problem,
        SurgeryError,
        TransformError,
        UnknownNameError,
        UsageError,
        WsurgeryError,
    )
