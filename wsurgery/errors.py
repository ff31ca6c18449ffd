"""Domain errors. Each carries the process exit code the CLI maps it to.

The library raises these; only the CLI turns them into exit codes and one-line
messages (see ``wsurgery.cli.app.EXIT_CODES``).
"""

from __future__ import annotations


class WsurgeryError(Exception):
    """Base of every error wsurgery raises on purpose.

    ``hint`` is a short suggestion on how to fix the problem; the CLI prints it
    after the message.
    """

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = path

    def __str__(self) -> str:  # one line, always
        text = self.message
        if self.path and self.path not in text:
            text = f"{self.path}: {text}"
        return " ".join(text.split("\n"))

    def one_line(self) -> str:
        line = str(self)
        if self.hint:
            line += f" (hint: {self.hint})"
        return line


class UsageError(WsurgeryError):
    """The command line itself is wrong (exit 2)."""

    exit_code = 2
    kind = "usage"


class InputError(WsurgeryError):
    """A missing, unreadable, malformed or unsafe input, or an unknown name (exit 3)."""

    exit_code = 3
    kind = "input"


class HeaderError(InputError):
    """A safetensors header or sharded index that breaks a validation rule."""


class UnsafePickleError(InputError):
    """A pickle that asks for code to run."""


class UnknownNameError(InputError):
    """A tensor or module name that the checkpoint does not hold."""


class SurgeryError(WsurgeryError):
    """A plan that cannot be carried out: misfit shapes or dtypes, bad transforms,
    conflicting or cyclic ties (exit 4)."""

    exit_code = 4
    kind = "surgery"


class TransformError(SurgeryError):
    """A transform spec that does not parse, or a step that does not fit its input."""


class OutputError(WsurgeryError):
    """The output cannot be written: exists without --force, would overwrite an
    input, disk full, permission denied (exit 5)."""

    exit_code = 5
    kind = "output"
