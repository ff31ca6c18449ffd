"""wsurgery: weight surgery on PyTorch checkpoints.

Importing the package is cheap: it imports nothing until a name is used (the command
line's ``--version`` needs none of it), and never imports torch; the functions below
import it only when the work needs tensors. ``dir(wsurgery)`` is the public face: the
functions, :class:`Checkpoint`, the options and results, and the errors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

# public name -> the submodule that defines it (a name that is a submodule maps to itself)
_WHERE = {
    "ApplyResult": "surgery.recipe",
    "CheckReport": "compare",
    "Checkpoint": "api",
    "Derived": "model",
    "DiffReport": "compare",
    "DistributedError": "errors",
    "InputError": "errors",
    "OutputError": "errors",
    "Problem": "errors",
    "SaveResult": "io.options",
    "SurgeryError": "errors",
    "TransformError": "errors",
    "Tuning": "compare",
    "UnknownNameError": "errors",
    "UsageError": "errors",
    "WriteOptions": "io.options",
    "WsurgeryError": "errors",
    "apply": "api",
    "check": "api",
    "convert": "api",
    "diff": "api",
    "distributed": "distributed",  # wsurgery.distributed.session() (scale-out)
    "load": "api",
    "load_state_dict": "api",
    "merge": "api",
    "open": "api",
    "save_state_dict": "api",
    "testing": "testing",  # wsurgery.testing.assert_checkpoint_equal
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
    "merge",
    "open",
    "save_state_dict",
    "testing",
]  # the keys of _WHERE (a test holds them equal)


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
    return sorted([*__all__, "__version__"])


if TYPE_CHECKING:
    from . import distributed, testing
    from .api import Checkpoint, apply, check, convert, diff, load, load_state_dict, merge, open, save_state_dict
    from .compare import CheckReport, DiffReport, Tuning
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
    from .surgery.recipe import ApplyResult
