"""Recipes, schema ``wsurgery.recipe/1``: named inputs, ordered surgery steps and
expectations in one YAML (or JSON) file, run as one plan and written in one pass.

A recipe goes through three stages; each reports every problem it finds at once:

1. :func:`load` reads and validates the whole recipe before any checkpoint is opened: YAML
   that does not parse is an ``InputError``; unknown keys, wrong types, bad regexes,
   dtypes, transforms, templates and sizes are one ``SurgeryError`` listing them all, each
   with its step number and the recipe's line (from the YAML nodes' marks).
2. :func:`plan` runs the steps in order on the lazy first input. Each step is the
   ``Checkpoint`` method of the same name, so nothing is read. The first step that is
   refused stops the plan (the steps after it depend on it); its problems carry the step
   number and line. Then the expectations are checked (names, shapes, dtypes and aliases:
   no data), then ties with ``verify`` compare their values, the only data read before
   the write.
3. The caller writes the result once (``Checkpoint.save``).

YAML is read with PyYAML's safe loader only (``yaml`` is imported when a recipe is read).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from .. import dtypes
from ..checkpoint import Checkpoint, SaveResult
from ..errors import InputError, Problem, SurgeryError, TransformError, UnknownNameError, UsageError
from ..transforms import parse as parse_transform
from .merge_steps import register as _register_merges
from .ops import matches

SCHEMA = "wsurgery.recipe/1"
MAX_BYTES = 16 << 20  # a recipe is text a person writes; past this it is not one
_MAX_NODES = 200_000  # YAML aliases can expand a small file into a huge tree
_MAX_DEPTH = 64
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")

PathLike = str | os.PathLike


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


# --- reading YAML with line numbers -----------------------------------------------------


def _compose(text: str, label: str) -> tuple[Any, dict[tuple, int], list[tuple[tuple, str]]]:
    """The YAML document as plain values, the line of every mapping key and list item
    (by path), and the duplicate keys found. Syntax errors are an ``InputError``."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[tuple, int] = {}
        dups: list[tuple[tuple, str]] = []
        count = [0]

        def build(n, path: tuple, depth: int):
            count[0] += 1
            if count[0] > _MAX_NODES or depth > _MAX_DEPTH:
                raise InputError("the recipe is nested too deeply or expands to too many values", path=label)
            if not isinstance(n, yaml.ScalarNode) and n.tag not in _PLAIN_TAGS:  # scalars: the constructor checks
                raise InputError(f"the tag {n.tag!r} is not allowed in a recipe", path=label)
            if isinstance(n, yaml.MappingNode):
                loader.flatten_mapping(n)  # merge keys (<<)
                out: dict = {}
                for key_node, value_node in n.value:
                    key = loader.construct_object(key_node, deep=True)
                    if not isinstance(key, (str, int, float, bool)) and key is not None:
                        key = str(key)
                    if key in out:
                        dups.append((path + (key,), key))
                    lines[path + (key,)] = key_node.start_mark.line + 1
                    out[key] = build(value_node, path + (key,), depth + 1)
                return out
            if isinstance(n, yaml.SequenceNode):
                items = []
                for i, item in enumerate(n.value):
                    lines[path + (i,)] = item.start_mark.line + 1
                    items.append(build(item, path + (i,), depth + 1))
                return items
            return loader.construct_object(n, deep=True)

        data = None if node is None else build(node, (), 0)
        return data, lines, dups
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(exc.problem or "malformed").split())
        if exc.context:
            what += f" ({' '.join(str(exc.context).split())})"
        raise InputError(f"not valid YAML: {what}{at}", path=label) from None
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML: {' '.join(str(exc).split())}", path=label) from None
    except RecursionError:
        raise InputError("the recipe is nested too deeply", path=label) from None
    finally:
        loader.dispose()


def _parse_text(text: str, label: str):
    try:
        return _compose(text, label)
    except InputError:
        # JSON is YAML, but PyYAML refuses tabs as indentation: JSON may hold them only
        # between tokens, so spaces in their place change nothing (and keep the lines).
        if "\t" not in text or not _is_json(text):
            raise
    return _compose(text.replace("\t", " "), label)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _read(source: PathLike) -> str:
    path = os.fspath(source)
    try:
        size = os.stat(path).st_size
        if size > MAX_BYTES:
            raise InputError(f"the recipe is {size:,} bytes; a recipe is at most {MAX_BYTES:,}", path=path)
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise InputError("no such recipe file", path=path) from None
    except IsADirectoryError:
        raise InputError("the recipe is a folder, not a file", path=path) from None
    except OSError as exc:
        raise InputError(f"cannot read the recipe: {exc.strerror or exc}", path=path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("the recipe is not UTF-8 text", path=path) from None


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
    if not isinstance(v, str):
        return c.bad("a regular expression (a string)", v)
    try:
        re.compile(v)
    except re.error as exc:
        return c.problem(f"{v!r} is not a valid regular expression: {exc}")
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
    from ..formats.sharded_writer import parse_size

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
                (f"{c.key}: " if c.key else "") + _unknown("key", key, fields),
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


# --- steps ------------------------------------------------------------------------------

_NEW = _Field(_bool, default=False)
_DIM = _Field(_int, default=0)
_SRC_DST = {"src": _Field(_name_or_names, True), "dst": _Field(_name_or_names, True)}

# kind -> the fields of its mapping, or the check of its value when it is not a mapping
_STEPS: dict[str, dict[str, _Field] | Callable] = {
    "rename": {"pattern": _Field(_regex, True), "to": _Field(_text, True)},
    "drop": _names,
    "keep": _names,
    "cast": {
        "dtype": _Field(_float_dtype, True),
        "only": _Field(_names, default=[]),
        "except": _Field(_names, default=[]),
    },
    "copy": {**_SRC_DST, "transform": _Field(_transform), "from": _Field(_input), "new": _NEW},
    "tie": {**_SRC_DST, "transform": _Field(_transform), "verify": _Field(_verify), "new": _NEW},
    "untie": _optional_names,
    "concat": {"srcs": _Field(_names, True), "dst": _Field(_name, True), "dim": _DIM, "new": _NEW},
    "split": {
        "src": _Field(_name, True),
        "dsts": _Field(_names, True),
        "dim": _DIM,
        "sizes": _Field(_sizes, True),
        "new": _NEW,
    },
    "stack": {"src": _Field(_template, True), "dst": _Field(_name, True), "dim": _DIM, "new": _NEW},
    "unstack": {"src": _Field(_name, True), "dst": _Field(_template, True), "dim": _DIM, "new": _NEW},
}


def _other(inputs: Mapping[str, Checkpoint], name: str | None) -> Checkpoint | None:
    return None if name is None else inputs[name]


# kind -> how the step runs: the Checkpoint method of the same name, nothing else
_RUN: dict[str, Callable[[Checkpoint, dict, Mapping[str, Checkpoint]], Checkpoint]] = {
    "rename": lambda c, a, i: c.rename(a["pattern"], a["to"]),
    "drop": lambda c, a, i: c.drop(a["names"]),
    "keep": lambda c, a, i: c.keep(a["names"]),
    "cast": lambda c, a, i: c.cast(a["dtype"], only=a["only"], exclude=a["except"]),
    "copy": lambda c, a, i: c.copy(a["src"], a["dst"], a["transform"], other=_other(i, a["from"]), new=a["new"]),
    "tie": lambda c, a, i: c.tie(a["src"], a["dst"], a["transform"], new=a["new"]),
    "untie": lambda c, a, i: c.untie(a["names"]),
    "concat": lambda c, a, i: c.concat(a["srcs"], a["dst"], a["dim"], new=a["new"]),
    "split": lambda c, a, i: c.split(a["src"], a["dsts"], a["dim"], a["sizes"], new=a["new"]),
    "stack": lambda c, a, i: c.stack(a["src"], a["dst"], a["dim"], new=a["new"]),
    "unstack": lambda c, a, i: c.unstack(a["src"], a["dst"], a["dim"], new=a["new"]),
}
_register_merges(_STEPS, _RUN)  # merge and merge_lora (surgery/merge_steps.py)
KINDS = tuple(_STEPS)


@dataclass(frozen=True)
class _Located:
    """Something of the recipe with its place: its number (from 1) and its line."""

    number: int
    line: int | None

    head: ClassVar[str] = ""

    @property
    def where(self) -> str:
        return _where(f"{self.head} {self.number}", self.line, getattr(self, "kind", None))


@dataclass(frozen=True)
class Step(_Located):
    """One validated step: its ``kind`` (the ``Checkpoint`` method it calls) and the
    method's arguments, checked.

    Attributes:
        number: its place in the recipe, from 1.
        kind: ``rename``, ``drop``, ``keep``, ``cast``, ``copy``, ``tie``, ``untie``,
            ``concat``, ``split``, ``stack`` or ``unstack``.
        args: the arguments by the recipe's key names (``src``, ``dst``, ``transform``...;
            ``names`` for drop, keep and untie).
        line: the recipe's line, when it came from text.
    """

    kind: str
    args: dict[str, Any]

    head: ClassVar[str] = "step"

    @property
    def verify(self) -> dict | None:
        """``{"atol", "rtol"}`` for a tie that must verify its values, else None."""
        return self.args.get("verify") if self.kind == "tie" else None

    def run(self, ckpt: Checkpoint, inputs: Mapping[str, Checkpoint]) -> Checkpoint:
        """The step applied to ``ckpt`` (lazy); ``inputs`` by name, for ``copy`` ``from``."""
        return _RUN[self.kind](ckpt, self.args, inputs)


def _cross_checks(c: _Ctx, kind: str, a: dict) -> bool:
    """What one field alone cannot tell: pairs that do not pair, a tie that would copy."""
    ok = True
    if kind in ("copy", "tie"):
        src, dst = a["src"], a["dst"]
        n_src, n_dst = (1 if isinstance(x, str) else len(x) for x in (src, dst))
        if isinstance(src, str) != isinstance(dst, str) or n_src != n_dst:
            c.problem(f"src and dst pair by position: {n_src} source(s) but {n_dst} destination(s)")
            ok = False
    if kind == "tie" and a["transform"] is not None and not a["transform"].is_view:
        bad = ", ".join(s.spec() for s in a["transform"].steps if not s.is_view)
        c.problem(f"a tie takes view steps only (same, transpose, permute, reshape, slice): {bad} needs a copy step")
        ok = False
    if kind == "concat" and len(a["srcs"]) < 2:
        c.problem(f"srcs: concat takes at least two sources, got {len(a['srcs'])}")
        ok = False
    if kind == "split" and len(a["sizes"]) != len(a["dsts"]):
        c.problem(f"{len(a['dsts'])} destinations (dsts) but {len(a['sizes'])} sizes")
        ok = False
    return ok


def _step(chk: _Checker, index: int, item: Any, inputs: Sequence[str]) -> Step | None:
    number, path = index + 1, ("steps", index)
    head = f"step {number}"
    if not isinstance(item, dict) or len(item) != 1:
        if isinstance(item, dict) and len(item) > 1:
            kinds = ", ".join(map(str, item))
            text = f"a step has one kind, found {kinds}: start each step with its own '- '"
        else:
            text = f"a step is a mapping of its kind to its arguments ('- drop: [...]'), got {_show(item)}"
        chk.add(head, path, text)
        return None
    ((kind, value),) = item.items()
    if kind not in _STEPS:
        chk.add(head, path, _unknown("step", kind, KINDS))
        return None
    c = _Ctx(chk, head, kind, path + (kind,), "", inputs)
    spec = _STEPS[kind]
    if kind == "cast" and isinstance(value, str):  # '- cast: bfloat16'
        value = {"dtype": value}
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            chk.add(head, path, f"{kind} takes a mapping of {', '.join(spec)}, got {_show(value)}", kind)
            return None
        args = _mapping(c, value, spec)
        if args is _BAD or not _cross_checks(c, kind, args):
            return None
    else:
        names = spec(replace(c, key=kind), value)
        if names is _BAD:
            return None
        args = {"names": names}
    return Step(number, chk.line(path), kind, args)


# --- expectations -----------------------------------------------------------------------

_EXPECT = {
    "name": _Field(_name, True),
    "alias_of": _Field(lambda c, v: v if v is None else _name(c, v)),
    "transform": _Field(_transform),
    "count": _Field(_count),
    "absent": _Field(_bool),
    "dtype": _Field(_dtype),
    "shape": _Field(_shape),
}


@dataclass(frozen=True)
class Expectation(_Located):
    """One ``expect`` entry: what the names ``name`` selects (a name, module prefix or glob)
    must be, checked on the planned result before anything is written.

    Attributes:
        number: its place in the ``expect`` list, from 1.
        name: a tensor name, module prefix or glob.
        checks: the assertions given: ``alias_of`` (a stored name, or None for "stored,
            not an alias"), ``transform`` (the alias's, with ``alias_of``), ``count``,
            ``absent``, ``dtype``, ``shape``.
        line: the recipe's line, when it came from text.
    """

    name: str
    checks: dict[str, Any]

    head: ClassVar[str] = "expect"

    def failures(self, ckpt: Checkpoint) -> list[str]:
        """What does not hold in ``ckpt`` (empty when every check holds). Reads no data."""
        c, name = self.checks, self.name
        found = matches(ckpt, name)
        out: list[str] = []
        if c.get("absent") is True and found:
            out.append(f"{name!r} should be absent but selects {len(found)}: {_few(found)}")
        if c.get("absent") is False and not found:
            out.append(f"{name!r} should be present but selects nothing")
        if "count" in c and len(found) != c["count"]:
            sel = f": {_few(found)}" if found else ""
            out.append(
                f"{name!r} selects {len(found)} name{'s' if len(found) != 1 else ''}, expected {c['count']}{sel}"
            )
        if not found and "absent" not in c and "count" not in c:
            out.append(f"{name!r} selects no tensor name, module prefix or glob")
        for key, test in (("dtype", _dtype_is), ("shape", _shape_is), ("alias_of", _alias_is)):
            if key in c:
                bad = [text for n in found if (text := test(ckpt, n, c)) is not None]
                if bad:
                    out.append(_few(bad, 3))
        return out


def _dtype_is(ckpt: Checkpoint, n: str, c: dict) -> str | None:
    dtype = ckpt.entry(n).dtype
    return None if dtype == c["dtype"] else f"{n} is {dtype}, expected {c['dtype']}"


def _shape_is(ckpt: Checkpoint, n: str, c: dict) -> str | None:
    shape = list(ckpt.entry(n).shape)
    return None if shape == c["shape"] else f"{n} has shape {shape}, expected {c['shape']}"


def _alias_is(ckpt: Checkpoint, n: str, c: dict) -> str | None:
    want, a = c["alias_of"], ckpt.aliases.get(n)
    if want is None:
        return None if a is None else f"{n} is an alias of {a.source}, expected a stored tensor"
    if a is None:
        return f"{n} is stored, not an alias of {want}"
    if a.source != want:
        return f"{n} is an alias of {a.source}, not of {want}"
    t = c.get("transform")
    if t is not None and a.specs != t.specs():
        return f"{n} is {a.transform}({want}), expected {t}({want})"
    return None


def _expectation(chk: _Checker, index: int, item: Any) -> Expectation | None:
    head, path = f"expect {index + 1}", ("expect", index)
    c = _Ctx(chk, head, None, path, "")
    if not isinstance(item, dict):
        chk.add(head, path, f"an expectation is a mapping ({{name: ..., count: ...}}), got {_show(item)}")
        return None
    checks = _mapping(c, item, _EXPECT)
    if checks is _BAD:
        return None
    given = {k: v for k, v in checks.items() if k in item and k != "name"}
    if "transform" in given and given.get("alias_of") is None:
        c.problem("transform: only with alias_of (the alias's transform)")
        return None
    if given.get("absent") is True and given.get("count", 0) != 0:
        c.problem(f"absent: true contradicts count: {given['count']}")
        return None
    return Expectation(index + 1, chk.line(path), checks["name"], given)


# --- the recipe -------------------------------------------------------------------------

_TOP = ("version", "description", "inputs", "output", "steps", "expect")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (:func:`load`).

    Attributes:
        inputs: input name -> path (relative paths resolved against the recipe's folder),
            or None where the recipe leaves it to the caller; in order, the first being
            the checkpoint the steps apply to. Empty when the recipe declares none (it
            then takes one checkpoint from the caller).
        output: the output path, or None.
        max_shard_size: the output's shard size (``"5GB"``), or None for one file.
        steps: the steps, in order.
        expect: the expectations.
        path: the recipe file, when it came from one.
        description: the recipe's own words about itself.
    """

    inputs: dict[str, str | None]
    output: str | None
    max_shard_size: str | None
    steps: tuple[Step, ...]
    expect: tuple[Expectation, ...]
    path: str | None = None
    description: str | None = None


def _resolve(base: str | None, p: str | None) -> str | None:
    if p is None:
        return None
    p = os.path.expanduser(p)
    return p if base is None or os.path.isabs(p) else os.path.join(base, p)


def _list(chk: _Checker, data: dict, key: str) -> list:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        chk.add(key, (key,), f"expected a list, got {_show(value)}")
        return []
    return value


def _top(chk: _Checker, data: Any, base: str | None) -> tuple[dict[str, str | None], str | None, str | None]:
    """version, inputs and output; -> (inputs, output path, shard size)."""
    if not isinstance(data, dict):
        chk.add("recipe", (), f"expected a mapping of {', '.join(_TOP)}, got {_show(data)}")
        return {}, None, None
    for key in data:
        if key not in _TOP:
            chk.add("recipe", (key,), _unknown("key", key, _TOP))
    if "version" not in data:
        chk.add("version", (), f"missing: a recipe begins with 'version: 1' (schema {SCHEMA})")
    elif data["version"] != 1 or isinstance(data["version"], bool):
        chk.add("version", ("version",), f"{_show(data['version'])} is not supported; this is {SCHEMA}: 'version: 1'")
    if "description" in data and not isinstance(data["description"], (str, type(None))):
        chk.add("description", ("description",), f"expected text, got {_show(data['description'])}")
    inputs: dict[str, str | None] = {}
    raw = data.get("inputs")
    if raw is not None and not isinstance(raw, dict):
        chk.add("inputs", ("inputs",), f"expected a mapping of input names to paths, got {_show(raw)}")
    for name, p in (raw or {}).items() if isinstance(raw, dict) else ():
        if not isinstance(name, str) or not name:
            _expected(chk, "inputs", ("inputs", name), "inputs", "names that are strings", name, None)
        elif p is not None and not (isinstance(p, str) and p):
            _expected(chk, "inputs", ("inputs", name), name, "a path (a string) or null", p, None)
        else:
            inputs[name] = _resolve(base, p)
    output = max_shard = None
    if data.get("output") is not None:
        fields = {"path": _Field(_output_path), "max_shard_size": _Field(_output_size)}
        got = _mapping(_Ctx(chk, "output", None, ("output",), ""), data["output"], fields)
        if got is not _BAD:
            output, max_shard = _resolve(base, got["path"]), got["max_shard_size"]
    return inputs, output, max_shard


def _validate(data: Any, lines: Mapping[tuple, int], dups, path: str | None) -> Recipe:
    chk = _Checker(lines)
    for key_path, key in dups:
        head = "step" if key_path[0] == "steps" else str(key_path[0])
        chk.add(head if head != "step" else f"step {key_path[1] + 1}", key_path, f"{_show(key)} is given twice")
    if data is None:
        chk.add("recipe", (), f"empty (a recipe begins with 'version: 1', schema {SCHEMA})")
        raise SurgeryError(problems=chk.problems, hint="nothing was read or written", path=path)
    base = None if path is None else os.path.dirname(os.path.abspath(path))
    inputs, output, max_shard = _top(chk, data, base)
    steps, expect = [], []
    if isinstance(data, dict):
        for i, item in enumerate(_list(chk, data, "steps")):
            steps.append(_step(chk, i, item, list(inputs)))
        for i, item in enumerate(_list(chk, data, "expect")):
            expect.append(_expectation(chk, i, item))
    if chk.problems:
        raise SurgeryError(problems=chk.problems, hint="nothing was read or written", path=path)
    return Recipe(
        inputs,
        output,
        max_shard,
        tuple(s for s in steps if s is not None),
        tuple(e for e in expect if e is not None),
        path,
        data.get("description"),
    )


def load(recipe: Recipe | Mapping | PathLike) -> Recipe:
    """Read and validate a recipe whole, before any checkpoint is opened.

    Args:
        recipe: a path to a YAML or JSON file; YAML text (a string holding a newline, or
            starting with ``{``); a dict as YAML would give; or a :class:`Recipe` (returned
            as is). Relative input and output paths in a file are relative to its folder;
            in text or a dict, to the working directory.

    Returns:
        A :class:`Recipe`.

    Raises:
        InputError: the file is missing or unreadable, or is not valid YAML.
        SurgeryError: every problem of the recipe (unknown keys, wrong types, bad
            patterns, dtypes, transforms...), each with its step number and line.

    Example:
        >>> recipe = load("examples/recipes/grow_layers.yaml")  # doctest: +SKIP
        >>> [s.kind for s in recipe.steps]
        ['copy', 'copy']
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return _validate(dict(recipe), {}, [], None)
    if isinstance(recipe, str) and ("\n" in recipe or recipe.lstrip().startswith("{")):
        data, lines, dups = _parse_text(recipe, "recipe")
        return _validate(data, lines, dups, None)
    if not isinstance(recipe, (str, os.PathLike)):
        raise UsageError(f"a recipe is a path, YAML text or a dict, not {type(recipe).__name__}", param="recipe")
    path = os.fspath(recipe)
    data, lines, dups = _parse_text(_read(path), path)
    return _validate(data, lines, dups, path)


# --- inputs -----------------------------------------------------------------------------

Input = PathLike | Checkpoint


def resolve_inputs(
    recipe: Recipe, given: Sequence[Input] | Mapping[str, Input] | Input | None = None
) -> dict[str, Input]:
    """Input name -> path or checkpoint: the recipe's, with ``given`` in their place.

    ``given`` replaces the recipe's inputs in order (a list), or by name (a mapping). A
    recipe that declares no inputs takes exactly one, named ``input``.

    Raises:
        UsageError: more inputs than the recipe has, an unknown name, or an input left
            without a path.
    """
    names = list(recipe.inputs) or ["input"]
    out: dict[str, Input | None] = {n: recipe.inputs.get(n) for n in names}
    if given is None:
        given = []
    elif isinstance(given, (str, os.PathLike, Checkpoint)):
        given = [given]
    if isinstance(given, Mapping):
        unknown = [k for k in given if k not in out]
        if unknown:
            raise UsageError(
                f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not an input of the recipe "
                f"(its inputs are {', '.join(names)})",
                param="inputs",
            )
        out.update(given)
    else:
        given = list(given)
        if len(given) > len(names):
            raise UsageError(
                f"{len(given)} inputs given, but the recipe has {len(names)} ({', '.join(names)})",
                param="inputs",
                hint="give at most one checkpoint per input of the recipe, in its order",
            )
        out.update(zip(names[: len(given)], given, strict=True))
    missing = [n for n, v in out.items() if v is None]
    if missing and not recipe.inputs:
        raise UsageError("the recipe names no inputs: give it the checkpoint to work on", param="inputs")
    if missing:
        raise UsageError(
            f"no checkpoint for the input{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
            "the recipe gives no path",
            param="inputs",
            hint="give a checkpoint for each, in the order of the recipe's inputs",
        )
    return out  # type: ignore[return-value]


def _label(value: Input) -> str | None:
    return value.path if isinstance(value, Checkpoint) else os.fspath(value)


# --- planning ---------------------------------------------------------------------------


def _recipe_problem(p: Problem, where: str) -> Problem:
    """A verb's problem, located in the recipe, its fix said in recipe words."""
    text = p.message
    if p.new_name:
        text += " (add 'new: true' to the step if the name is meant to be new)"
    elif p.suggest:
        text += f" (try 'transform: {' -> '.join(p.suggest)}')"
    elif p.use == "untie":
        text += " (add an untie step before it)"
    elif p.use:
        text += f" (use a {p.use} step instead)"
    return Problem(f"{where}: {text}", names=p.names)


def _step_error(step: Step, exc: Exception, later: int) -> SurgeryError:
    if isinstance(exc, SurgeryError) and exc.problems:
        problems = [_recipe_problem(p, step.where) for p in exc.problems]
    else:
        text = exc.one_line() if isinstance(exc, (UnknownNameError, UsageError)) else str(exc)
        problems = [Problem(f"{step.where}: {text}")]
    after = "; the step after it was not checked" if later == 1 else f"; the {later} steps after it were not checked"
    return SurgeryError(problems=problems, hint="nothing was written" + (after if later else ""))


def plan(recipe: Recipe, inputs: Mapping[str, Checkpoint]) -> Checkpoint:
    """Run ``recipe``'s steps on the first of ``inputs`` (lazily), check its expectations,
    then verify the ties that ask for it (which reads their values).

    Args:
        recipe: a validated :class:`Recipe`.
        inputs: input name -> opened checkpoint, in the recipe's order.

    Returns:
        The resulting lazy :class:`~wsurgery.Checkpoint`, not yet written.

    Raises:
        SurgeryError: the first step that is refused (its problems, with the step number
            and line), every failed expectation, or every tie whose values differ.
    """
    from .ties import verify_ties

    ckpt = next(iter(inputs.values()))
    to_verify: list[tuple[Step, Checkpoint]] = []
    for step in recipe.steps:
        before = ckpt
        try:
            ckpt = step.run(ckpt, inputs)
        except (SurgeryError, UnknownNameError, UsageError) as exc:
            raise _step_error(step, exc, len(recipe.steps) - step.number) from None
        if step.verify is not None:
            to_verify.append((step, before))
    problems = [Problem(f"{e.where}: {text}") for e in recipe.expect for text in e.failures(ckpt)]
    if problems:
        raise SurgeryError(problems=problems, hint="nothing was written")
    for step, before in to_verify:
        a = step.args
        try:
            verify_ties(before, a["src"], a["dst"], a["transform"], **step.verify)
        except SurgeryError as exc:
            problems += [_recipe_problem(p, step.where) for p in exc.problems or [Problem(str(exc))]]
    if problems:
        raise SurgeryError(problems=problems, hint="nothing was written")
    files = [f for c in inputs.values() for f in c.input_files]
    return replace(ckpt, input_files=list(dict.fromkeys([*ckpt.input_files, *files])))


@dataclass
class Prepared:
    """A recipe planned over its opened inputs: the result, lazy, ready for one write.
    A context manager: closing it closes the inputs it opened.

    Attributes:
        recipe: the validated recipe.
        inputs: input name -> the checkpoint, opened.
        paths: input name -> its path (None for a checkpoint built in memory).
        result: the planned checkpoint (its ``changes`` list every step's operations).
    """

    recipe: Recipe
    inputs: dict[str, Checkpoint]
    paths: dict[str, str | None]
    result: Checkpoint
    owned: list[Checkpoint] = field(default_factory=list)

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for c in self.owned:
            c.close()

    def describe(self) -> dict:
        """The recipe's part of a report: its file, inputs, and what was checked."""
        return {
            "recipe": self.recipe.path,
            "inputs": dict(self.paths),
            "steps": len(self.recipe.steps),
            "expectations": len(self.recipe.expect),
            "verified": sum(1 for s in self.recipe.steps if s.verify is not None),
        }


def prepare(
    recipe: Recipe | Mapping | PathLike, inputs: Sequence[Input] | Mapping[str, Input] | Input | None = None
) -> Prepared:
    """:func:`load` the recipe, open its inputs (``inputs`` in place of the recipe's, see
    :func:`resolve_inputs`) and :func:`plan` it. Inputs given as checkpoints are used as
    they are and left open; those opened here are closed by :meth:`Prepared.close`."""
    from ..readers import load as open_checkpoint

    rec = load(recipe)
    resolved = resolve_inputs(rec, inputs)
    opened: dict[str, Checkpoint] = {}
    owned: list[Checkpoint] = []
    try:
        for name, value in resolved.items():
            if isinstance(value, Checkpoint):
                opened[name] = value
            else:
                opened[name] = open_checkpoint(value)
                owned.append(opened[name])
        result = plan(rec, opened)
    except BaseException:
        for c in owned:
            c.close()
        raise
    paths = {n: _label(v) for n, v in resolved.items()}
    return Prepared(rec, opened, paths, result, owned)


@dataclass(frozen=True)
class ApplyResult:
    """What :func:`wsurgery.apply` did.

    Attributes:
        checkpoint: the resulting lazy checkpoint (its ``changes`` are the plan; reading
            its tensors reopens the input files).
        saved: what was written, or None for a dry run.
        output: where it was (or would be) written; None for a dry run without one.
        inputs: input name -> path.
        steps: how many steps ran.
        expectations: how many expectations were checked (all held).
        verified: how many ties verified their values.
    """

    checkpoint: Checkpoint
    saved: SaveResult | None
    output: str | None
    inputs: dict[str, str | None]
    steps: int
    expectations: int
    verified: int


__all__ = [
    "KINDS",
    "SCHEMA",
    "ApplyResult",
    "Expectation",
    "Prepared",
    "Recipe",
    "Step",
    "load",
    "plan",
    "prepare",
    "resolve_inputs",
]
