"""The errors wsurgery raises on purpose.

Library errors carry data (the path, the names, the shapes, what would fix it) and speak
the library's language: parameters, never command-line flags or exit codes. The command
line (``wsurgery.cli._errors``) turns them into its one-line messages, flag-naming hints
and exit codes, in one place.

Every error's ``str()`` is one line: the message, no hint. ``hint`` is a short suggestion
for a library user (data: the command line replaces it with its own words where it has
them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_CANDIDATES = 3


def close_matches(names: Iterable[str], name: str) -> list[str]:
    """Up to three names close to ``name``: the one did-you-mean rule for names (the
    ``candidates`` of :class:`UnknownNameError`)."""
    import difflib  # only when a name is unknown: start-up stays lean

    return difflib.get_close_matches(name, list(names), n=MAX_CANDIDATES, cutoff=0.6)


class WsurgeryError(Exception):
    """Base of every error wsurgery raises on purpose.

    Args:
        message: what went wrong, naming the file, tensor or step.
        hint: how to fix it, for a library user (None when there is nothing to say).
        path: the file the error is about, when there is one; it prefixes the message
            unless the message already names it.
    """

    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = None if path is None else str(path)

    def __str__(self) -> str:  # one line, always
        text = self.message
        if self.path and self.path not in text:
            text = f"{self.path}: {text}"
        return " ".join(text.split("\n"))


class UsageError(WsurgeryError):
    """An argument that is wrong in itself: a tolerance, a device, a size, a filter.

    ``param`` names the library parameter at fault (``"atol"``, ``"device"``,
    ``"max_shard_size"``, ``"filter"``), so a front end can point at its own spelling.
    """

    kind = "usage"

    def __init__(self, message: str, *, param: str | None = None, hint: str | None = None, path: str | None = None):
        super().__init__(message, hint=hint, path=path)
        self.param = param


class InputError(WsurgeryError):
    """A missing, unreadable, malformed or unsafe input, or an unknown name."""

    kind = "input"


class HeaderError(InputError):
    """A safetensors header or sharded index that breaks a validation rule."""


class UnsafePickleError(InputError):
    """A pickle that asks for code to run."""


class UnknownNameError(InputError):
    """A tensor or module name that the checkpoint does not hold.

    Args:
        name: the name asked for.
        path: the checkpoint's path, when it has one.
        candidates: close matches among the names it does hold (may be empty).
        what: what was looked for (``"tensor or module"``, ``"tensor"``, ...).
        message: a message of its own instead of ``no <what> named <name>``.
    """

    def __init__(
        self,
        name: str,
        *,
        path: str | None = None,
        candidates: Sequence[str] = (),
        what: str = "tensor or module",
        message: str | None = None,
        hint: str | None = None,
    ):
        where = f" in {path}" if path else ""
        if hint is None and candidates:
            hint = f"did you mean {', '.join(candidates)}?"
        super().__init__(message or f"no {what} named {name!r}{where}", hint=hint)
        self.name = name
        self.checkpoint = path
        self.candidates = list(candidates)


@dataclass(frozen=True)
class Problem:
    """One reason a plan cannot be carried out, with what would fix it.

    Attributes:
        message: one line naming the step, the tensors and their shapes/dtypes.
        suggest: transform steps that would make it fit (``("transpose",)``).
        use: another verb that does what was asked (``"copy"`` for a tie that needs
            data, ``"untie"`` for a tensor other aliases point at).
        new_name: a new name that looks like a typo; saying it is new creates it.
        names: the tensors the problem is about.
        candidates: close matches of a name that does not exist (``names`` holds it).
        step: the recipe step (from 1) the problem belongs to, when it comes from a recipe.
    """

    message: str
    suggest: tuple[str, ...] = ()
    use: str | None = None
    new_name: bool = False
    names: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()
    step: int | None = None

    def __str__(self) -> str:
        return self.message


def _as_problems(problems: Iterable[Problem | str]) -> list[Problem]:
    return [p if isinstance(p, Problem) else Problem(str(p)) for p in problems]


class SurgeryError(WsurgeryError):
    """A plan that cannot be carried out: misfit shapes or dtypes, bad transforms,
    conflicting or cyclic ties. ``problems`` lists every problem found (all of them are
    collected before anything is raised).

    Args:
        message: the error's message; by default built from ``problems``.
        problems: the problems, as :class:`Problem` or plain strings.
    """

    kind = "surgery"

    def __init__(
        self,
        message: str | None = None,
        *,
        problems: Iterable[Problem | str] = (),
        hint: str | None = None,
        path: str | None = None,
    ):
        self.problems = _as_problems(problems)
        if message is None:
            message = summarize([p.message for p in self.problems])
        super().__init__(message, hint=hint, path=path)


def summarize(lines: Sequence[str], limit: int | None = None) -> str:
    """``lines`` as one text: ``"N problems: a; b; ..."``, the first ``limit`` then a count."""
    if len(lines) == 1:
        return lines[0]
    shown = list(lines if limit is None else lines[:limit])
    text = f"{len(lines)} problems: " + "; ".join(shown)
    if len(shown) < len(lines):
        text += f"; ... and {len(lines) - len(shown)} more"
    return text


class TransformError(SurgeryError):
    """A transform spec that does not parse, or a step that does not fit its input."""

    def __init__(self, message: str, *, hint: str | None = None, path: str | None = None):
        super().__init__(message, hint=hint, path=path)


class OutputError(WsurgeryError):
    """The output cannot be written.

    ``reason`` says why, for front ends that phrase their own advice: ``"exists"`` (and
    overwriting was not asked for), ``"is_input"`` (the output would replace an input),
    ``"not_a_folder"`` (its folder is missing), ``"is_folder"`` / ``"is_file"`` (a file
    where a folder was wanted or the other way round), ``"not_regular"`` (a device, pipe
    or socket), ``"no_space"``, ``"too_large"`` (a file-size limit), ``"permission"``,
    ``"stdout"`` (standard output could not be written), ``"stdout_closed"`` (its reader
    went away, as ``| head`` does), or None.
    """

    kind = "output"

    def __init__(self, message: str, *, reason: str | None = None, hint: str | None = None, path: str | None = None):
        super().__init__(message, hint=hint, path=path)
        self.reason = reason


class DistributedError(WsurgeryError):
    """The ranks of a distributed run could not work together: the process group did not
    form, or a rank stopped answering (it died, or a collective outlasted the timeout).
    An error that one rank met in its own work is not this: every rank raises that error
    itself (see :mod:`wsurgery.distributed`)."""

    kind = "distributed"
