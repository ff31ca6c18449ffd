"""``rename``'s regular expressions, matched in linear time, and the names they make, bounded.

Patterns run on RE2 (the ``google-re2`` package): matching takes time linear in the name,
whatever the pattern, so ``^(a+)+$`` over ``aaaa...!`` cannot hang. RE2 refuses what
needs backtracking: backreferences in the pattern (``\\1``, ``(?P=name)``), lookaround
(``(?=``, ``(?!``, ``(?<=``, ``(?<!``), atomic groups and possessive repeats (``(?>``,
``a++``), conditionals, ``\\Z`` (write ``\\z`` or ``$``) and verbose mode ``(?x)``; such a
pattern is refused with an error saying so. Everything a rename needs works as in Python:
classes, groups, named groups ``(?P<n>...)``, ``(?i)``, anchors.

The replacement follows Python's ``re.sub`` rules (``\\1``, ``\\g<1>``, ``\\g<name>``,
``\\n``-style escapes), expanded here. Every name a rename makes is bounded
(:data:`~wsurgery.limits.MAX_NAME_LENGTH` characters) and so is the total of all names
(:data:`~wsurgery.limits.MAX_NAMES_BYTES`), checked while substituting, so a rename that
doubles names refuses at once rather than building them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from ..limits import MAX_NAME_LENGTH, MAX_NAMES_BYTES

_UNSUPPORTED = (
    "RE2, the linear-time engine rename uses, has no backreferences, lookaround, atomic groups, "
    "possessive repeats, conditionals, \\Z or (?x)"
)
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_TEMPLATE = re.compile(r"\\(g<([^>]*)>|[0-9]{1,2}|.)", re.DOTALL)


def shown(text: str) -> str:
    """A pattern or replacement quoted as typed (``'(a)\\1'``, one backslash), not as a
    Python literal (which doubles each backslash); ``repr`` where a quote or a control
    character would make it ambiguous."""
    if "'" in text or not text.isprintable():
        return repr(text)
    return f"'{text}'"


class PatternError(ValueError):
    """A pattern or replacement that cannot be used; ``str()`` says why in one line."""


class NameTooLong(ValueError):
    """A rename would make a name, or all names together, longer than the bounds."""


def compile_pattern(pattern: str) -> Any:
    """``pattern`` compiled by RE2 (linear-time matching).

    Raises:
        PatternError: it does not compile, or needs a feature RE2 does not have.
    """
    import re2  # type: ignore[import-untyped]

    options = re2.Options()
    options.log_errors = False  # RE2 would print its own message on standard error
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        why = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        try:
            re.compile(pattern)
        except re.error as py_exc:
            raise PatternError(f"{shown(pattern)} is not a valid regular expression: {py_exc}") from None
        raise PatternError(f"{shown(pattern)} is not supported ({why}): {_UNSUPPORTED}") from None


Piece = str | int  # a literal, or a group (its number; a name is looked up when compiled)


def compile_template(to: str, regex: Any) -> list[str | int]:
    """``to`` as literals and group numbers, by Python's ``re.sub`` rules.

    Raises:
        PatternError: a bad escape, or a group the pattern does not have.
    """
    pieces: list[str | int] = []
    pos = 0
    groups, names = regex.groups, dict(regex.groupindex)
    for m in _TEMPLATE.finditer(to):
        pieces.append(to[pos : m.start()])
        pos = m.end()
        body, named = m.group(1), m.group(2)
        if named is not None:
            group = int(named) if named.isdigit() else names.get(named)
            if group is None or group > groups:
                raise PatternError(
                    f"the replacement {shown(to)} refers to the group {named!r}, which the pattern lacks"
                )
            pieces.append(group)
        elif body.isdigit():
            if int(body) > groups:
                raise PatternError(f"the replacement {shown(to)} refers to group {body}, which the pattern lacks")
            pieces.append(int(body))
        elif body in _ESCAPES:
            pieces.append(_ESCAPES[body])
        elif body.isascii() and body.isalpha():
            raise PatternError(f"the replacement {shown(to)} holds the bad escape \\{body}")
        else:
            pieces.append("\\" + body)
    pieces.append(to[pos:])
    return [p for p in pieces if p != ""]


def renamer(pattern: str, to: str) -> Callable[[str], tuple[str, int]]:
    """A function ``name -> (new name, matches)`` applying ``re.sub(pattern, to, name)``
    on RE2, that raises :class:`NameTooLong` as soon as the new name passes the bound.

    Raises:
        PatternError: see :func:`compile_pattern` and :func:`compile_template`.
    """
    regex = compile_pattern(pattern)
    pieces = compile_template(to, regex)

    def one(name: str) -> tuple[str, int]:
        made = [len(name)]

        def expand(m: Any) -> str:
            out = "".join(p if isinstance(p, str) else (m.group(p) or "") for p in pieces)
            made[0] += len(out) - (m.end() - m.start())
            if made[0] > MAX_NAME_LENGTH:
                raise NameTooLong(name)
            return out

        return regex.subn(expand, name)

    return one


def rename_all(names: Iterable[str], pattern: str, to: str) -> tuple[dict[str, str], bool]:
    """``{old: new}`` for every name, and whether the pattern matched any.

    Raises:
        PatternError: the pattern or the replacement cannot be used.
        NameTooLong: a new name longer than ``MAX_NAME_LENGTH`` characters, or all new
            names together past ``MAX_NAMES_BYTES`` (its message names the first).
    """
    one = renamer(pattern, to)
    out: dict[str, str] = {}
    matched = False
    total = 0
    for name in names:
        try:
            new, count = one(name)
        except NameTooLong:
            raise NameTooLong(
                f"{_short(name)} would become longer than {MAX_NAME_LENGTH:,} characters (the longest name allowed)"
            ) from None
        total += len(new)
        if total > MAX_NAMES_BYTES:
            raise NameTooLong(f"the new names would pass {MAX_NAMES_BYTES:,} characters in all (the bound on names)")
        matched = matched or count > 0
        out[name] = new
    return out, matched


def _short(name: str) -> str:
    return repr(name if len(name) <= 60 else name[:40] + "..." + name[-10:])
