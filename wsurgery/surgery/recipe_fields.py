"""The pieces a recipe's checks are made of: where a problem is (step, line), and the
checks of one value each (a name, a dtype, a transform, an input...), which every step's
fields (and the merge steps') are built from."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import dtypes
from ..errors import Problem, TransformError, UsageError
from ..transforms import parse as parse_transform
from .patterns import PatternError, compile_pattern

# --- where a problem is -----------------------------------------------------------------


def _where(head: str, line: int | None, kind: str | None = None) -> str:
    inner = ", ".join(x for x in (kind, f"line {line}" if line else None) if x)
    return f"{head} ({inner})" if inner else head


class _Checker:
    """Collects problems, each labelled with where it is (``step 3 (copy, line 12)``)."""

    def __init__(self, lines: Mapping[tuple, int]):
        self.lines = lines
        self.problems: list[Problem] = []

    def line(self, path: tuple) -> int | None:
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return None

    def add(self, head: str, path: tuple, text: str, kind: str | None = None) -> None:
        self.problems.append(Problem(f"{_where(head, self.line(path), kind)}: {text}"))


def _show(value: Any) -> str:
    """A value as the recipe's author wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (list, tuple)):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    return repr(value)


def _close(word: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(what: str, word: Any, choices: Sequence[str]) -> str:
    """``unknown key 'exept' (did you mean 'except'?)``, or the choices when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.7)
    known = f"did you mean {close[0]!r}?" if close else f"one of {', '.join(choices)}"
    return f"unknown {what} {_show(word)} ({known})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- value checks -----------------------------------------------------------------------

_BAD = object()  # a value that failed its check (the problem is recorded)

_QUOTE = " (quote it: YAML reads true/false/yes/no/on/off, numbers and dates as such)"


class _Field:
    """Checks one value of a recipe; ``check(chk, head, path, value, ctx)`` -> value or _BAD."""

    def __init__(self, check: Callable, required: bool = False, default: Any = None):
        self.check, self.required, self.default = check, required, default


def _expected(chk: _Checker, head: str, path: tuple, key: str, what: str, value: Any, kind: str | None) -> object:
    scalar = isinstance(value, (bool, int, float)) or hasattr(value, "isoformat")  # dates too
    hint = _QUOTE if scalar and ("string" in what or "name" in what) else ""
    chk.add(head, path, f"{key + ': ' if key else ''}expected {what}, got {_show(value)}{hint}", kind)
    return _BAD


@dataclass
class _Ctx:
    chk: _Checker
    head: str  # "step 3", "expect 2", "output"
    kind: str | None  # the step's kind, for labels
    path: tuple  # the value's path in the document
    key: str  # the value's name in messages ("copy.src" reads as "src")
    inputs: Sequence[str] = ()

    def bad(self, what: str, value: Any) -> object:
        return _expected(self.chk, self.head, self.path, self.key, what, value, self.kind)

    def problem(self, text: str) -> object:
        self.chk.add(self.head, self.path, f"{self.key + ': ' if self.key else ''}{text}", self.kind)
        return _BAD


def _name(c: _Ctx, v):
    return v if isinstance(v, str) and v else c.bad("a tensor name (a non-empty string)", v)


def _text(c: _Ctx, v):
    return v if isinstance(v, str) else c.bad("a string", v)


def _names(c: _Ctx, v):
    """A name, or a non-empty list of names -> a list."""
    if isinstance(v, str) and v:
        return [v]
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return list(v)
    return c.bad("a name or a non-empty list of names (strings)", v)


def _name_or_names(c: _Ctx, v):
    """A name, or a non-empty list of names (kept as given: pairs are made by position)."""
    return v if isinstance(v, str) and v else _names(c, v)


def _optional_names(c: _Ctx, v):
    return None if v is None or v == [] else _names(c, v)


def _regex(c: _Ctx, v):
    """A rename pattern RE2 compiles (linear-time matching; see :mod:`.patterns`)."""
    if not isinstance(v, str):
        return c.bad("a regular expression (a string)", v)
    try:
        compile_pattern(v)
    except PatternError as exc:
        return c.problem(str(exc))
    return v


def _template(c: _Ctx, v):
    if not isinstance(v, str) or not v:
        return c.bad("a template holding {i} (a string)", v)
    if v.count("{i}") != 1:
        return c.problem(f"the template {v!r} must hold {{i}} exactly once")
    return v


def _int(c: _Ctx, v):
    return v if isinstance(v, int) and not isinstance(v, bool) else c.bad("an integer", v)


def _count(c: _Ctx, v):
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else c.bad("a count (an integer >= 0)", v)


def _ints(c: _Ctx, v, what: str):
    ok = isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    return list(v) if ok else c.bad(what, v)


def _sizes(c: _Ctx, v):
    return _ints(c, v, "a list of sizes (integers >= 0)") if v != [] else c.bad("a non-empty list of sizes", v)


def _shape(c: _Ctx, v):
    return _ints(c, v, "a shape (a list of integers >= 0, [] for a scalar)")


def _bool(c: _Ctx, v):
    return v if isinstance(v, bool) else c.bad("true or false", v)


def _dtype(c: _Ctx, v, *, floating: bool = False):
    if not isinstance(v, str):
        return c.bad("a dtype name (a string)", v)
    entry = dtypes.lookup(v)
    if entry is None or (floating and entry.kind != "float"):
        kinds = [d for d, e in dtypes.BY_NAME.items() if e.kind == "float" or not floating]
        what = "a floating dtype" if floating else "a dtype"
        return c.problem(f"{v!r} is not {what} (one of {', '.join(kinds)})")
    return entry.name


def _float_dtype(c: _Ctx, v):
    return _dtype(c, v, floating=True)


def _transform(c: _Ctx, v):
    if v is None:
        return None
    if not (isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)):
        return c.bad("a transform step or a list of steps (strings)", v)
    try:
        return parse_transform(v)
    except TransformError as exc:
        return c.problem(str(exc))


def _input(c: _Ctx, v):
    if not isinstance(v, str) or not v:
        return c.bad("the name of an input (a string)", v)
    if v not in c.inputs:
        known = f"the inputs are {', '.join(c.inputs)}" if c.inputs else "the recipe declares no inputs"
        return c.problem(f"{v!r} is not an input of the recipe ({known}){_close(v, c.inputs)}")
    return v


def _tolerance(c: _Ctx, v):
    # YAML 1.1 (PyYAML) reads 1e-5 as a string: it needs a dot (1.0e-5) to be a float.
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return c.bad("a number >= 0", v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return c.bad("a number >= 0", v)
    return float(v)


def _verify(c: _Ctx, v):
    """``true``/``false``, or ``{atol, rtol}`` -> None (no verify) or {"atol", "rtol"}."""
    if v is None or v is False:
        return None
    if v is True:
        return {"atol": 0.0, "rtol": 0.0}
    if not isinstance(v, dict):
        return c.bad("true, false or a mapping {atol, rtol}", v)
    return _mapping(c, v, {"atol": _Field(_tolerance, default=0.0), "rtol": _Field(_tolerance, default=0.0)})


def _output_path(c: _Ctx, v):
    return None if v is None else v if isinstance(v, str) and v else c.bad("a path (a string)", v)


def _output_size(c: _Ctx, v):
    from ..io.sharded_writer import parse_size

    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        return c.bad("a size (5GB, 500MiB or a byte count)", v)
    try:
        parse_size(str(v))
    except UsageError as exc:
        return c.problem(str(exc))
    return str(v)


def _mapping(c: _Ctx, value: Any, fields: Mapping[str, _Field]):
    """Check a mapping of ``fields``: unknown keys, missing ones, each value; -> dict or _BAD."""
    if not isinstance(value, dict):
        return c.bad(f"a mapping of {', '.join(fields)}", value)
    ok = True
    out: dict[str, Any] = {}
    for key in value:
        if key not in fields:
            c.chk.add(
                c.head,
                c.path + (key,),
                (f"{c.key}: " if c.key else "") + _unknown("key", key, list(fields)),
                c.kind,
            )
            ok = False
    for key, f in fields.items():
        if key not in value:
            if f.required:
                c.chk.add(c.head, c.path, f"{c.key}: {key} is missing", c.kind)
                ok = False
            out[key] = f.default
            continue
        sub = replace(c, path=c.path + (key,), key=f"{c.key}.{key}" if c.key else key)
        checked = f.check(sub, value[key])
        ok = ok and checked is not _BAD
        out[key] = checked
    return out if ok else _BAD
