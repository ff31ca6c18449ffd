"""The click command typer builds for every wsurgery command, as plain data: each
parameter's attributes (name, opts, secondary opts, flag, multiple, nargs, required,
default, type and its settings, metavar, help, ...) in order, and the command's own.

``tests/cli/click_params.json`` holds this as it was while the commands declared their
parameters with typer's own objects; ``test_fastpath.py`` checks that typer still sees
exactly that now that the declarations are typer-free data (``wsurgery.cli.params``).
Regenerate it (only for a deliberate change of a flag) with

    .venv/bin/python -m tests.cli.click_params > tests/cli/click_params.json
"""

from __future__ import annotations

import enum
import inspect
import json
import sys
from pathlib import PurePath
from typing import Any

# Attributes that hold no declaration (click's bookkeeping) or a callable's identity.
_SKIP = {"_custom_shell_complete", "_flag_needs_value"}


def _plain(value: Any) -> Any:
    """``value`` as JSON-able data, stable from one process to the next."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, PurePath):
        return {"path": str(value)}
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, type):
        return f"class {value.__module__}.{value.__qualname__}"
    if inspect.isroutine(value):
        return f"function {value.__qualname__}"
    if hasattr(value, "__dict__"):  # a click type: its class and settings
        return {"class": type(value).__qualname__, **{k: _plain(v) for k, v in sorted(vars(value).items())}}
    return repr(value)


def _param(p) -> dict:
    data = {k: _plain(v) for k, v in sorted(vars(p).items()) if k not in _SKIP}
    data["class"] = type(p).__qualname__
    return data


def snapshot() -> dict:
    """Every command of the registry, and the root group: their click parameters in order."""
    import typer

    from wsurgery.cli.app import COMMANDS, build_app

    group = typer.main.get_command(build_app())
    out: dict[str, Any] = {"": {"params": [_param(p) for p in group.params]}}
    for name in COMMANDS:
        cmd = group.commands[name]  # type: ignore[attr-defined]
        out[name] = {
            "help": cmd.help,
            "short_help": cmd.short_help,
            "epilog": cmd.epilog,
            "no_args_is_help": cmd.no_args_is_help,
            "context_settings": _plain(cmd.context_settings),
            "hidden": cmd.hidden,
            "deprecated": _plain(cmd.deprecated),
            "params": [_param(p) for p in cmd.params],
        }
    return out


if __name__ == "__main__":
    json.dump(snapshot(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
