"""Recipes, schema ``wsurgery.recipe/1``: reading and validating one (:func:`load`).

The whole recipe is checked before any checkpoint is opened: YAML that does not parse
is an ``InputError`` (see :mod:`.recipe_yaml` for the bounds on size, depth and
integers); unknown keys, wrong types, bad regexes, dtypes, transforms, templates and
sizes are one ``SurgeryError`` listing them all, each with its step number and the
recipe's line. A recipe's ``output.path`` is relative and stays inside the recipe's
folder. Running it is :mod:`.recipe`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from .. import lookup
from ..errors import SurgeryError, UsageError
from ..model import Checkpoint
from ..selectors import matches
from . import fuse, values, verbs
from . import names as name_verbs
from .merge_steps import register as register_merge_steps
from .patterns import PatternError, compile_pattern, compile_template
from .recipe_fields import (
    _BAD,
    _bool,
    _Checker,
    _count,
    _Ctx,
    _dtype,
    _expected,
    _few,
    _Field,
    _float_dtype,
    _input,
    _int,
    _mapping,
    _name,
    _name_or_names,
    _names,
    _optional_names,
    _output_path,
    _output_size,
    _regex,
    _shape,
    _show,
    _sizes,
    _template,
    _text,
    _transform,
    _unknown,
    _verify,
    _where,
)
from .recipe_yaml import PathLike, parse_text, read

SCHEMA = "wsurgery.recipe/1"


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


def _listed(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


# kind -> how the step runs: the surgery function of the same name (the one that the
# Checkpoint method of that name calls), nothing else
_RUN: dict[str, Callable[[Checkpoint, dict, Mapping[str, Checkpoint]], Checkpoint]] = {
    "rename": lambda c, a, i: name_verbs.rename(c, a["pattern"], a["to"]),
    "drop": lambda c, a, i: name_verbs.drop(c, _listed(a["names"])),
    "keep": lambda c, a, i: name_verbs.keep(c, _listed(a["names"])),
    "cast": lambda c, a, i: values.cast(c, a["dtype"], only=list(a["only"]), exclude=list(a["except"])),
    "copy": lambda c, a, i: verbs.copy(c, a["src"], a["dst"], a["transform"], other=_other(i, a["from"]), new=a["new"]),
    "tie": lambda c, a, i: verbs.tie(c, a["src"], a["dst"], a["transform"], new=a["new"]),
    "untie": lambda c, a, i: verbs.untie(c, a["names"]),
    "concat": lambda c, a, i: fuse.concat(c, a["srcs"], a["dst"], a["dim"], new=a["new"]),
    "split": lambda c, a, i: fuse.split(c, a["src"], a["dsts"], a["dim"], a["sizes"], new=a["new"]),
    "stack": lambda c, a, i: fuse.stack(c, a["src"], a["dst"], a["dim"], new=a["new"]),
    "unstack": lambda c, a, i: fuse.unstack(c, a["src"], a["dst"], a["dim"], new=a["new"]),
}
register_merge_steps(_STEPS, _RUN)  # merge, merge_lora: checked whole, in their own module
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
    if kind == "rename":
        try:
            compile_template(a["to"], compile_pattern(a["pattern"]))
        except PatternError as exc:
            c.problem(f"to: {exc}")
            ok = False
    if kind in ("copy", "tie"):
        src, dst = a["src"], a["dst"]
        n_src, n_dst = (1 if isinstance(x, str) else len(x) for x in (src, dst))
        if isinstance(src, str) != isinstance(dst, str) or n_src != n_dst:
            c.problem(f"src and dst pair by position: {n_src} source(s) but {n_dst} destination(s)")
            ok = False
    why_not = a["transform"].tie_problem() if kind == "tie" and a["transform"] is not None else None
    if why_not is not None:
        c.problem(f"{why_not} (use a copy step)")
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
        found = matches(ckpt.names(), name)
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
    dtype = lookup.entry(ckpt, n).dtype
    return None if dtype == c["dtype"] else f"{n} is {dtype}, expected {c['dtype']}"


def _shape_is(ckpt: Checkpoint, n: str, c: dict) -> str | None:
    shape = list(lookup.entry(ckpt, n).shape)
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
        output: the output path, or None. Reading it raises ``SurgeryError`` when the
            recipe's path leaves the recipe's folder (see :attr:`output_refused`): only
            a caller's explicit output may go there.
        max_shard_size: the output's shard size (``"5GB"``), or None for one file.
        steps: the steps, in order.
        expect: the expectations.
        path: the recipe file, when it came from one.
        description: the recipe's own words about itself.
    """

    inputs: dict[str, str | None]
    declared_output: str | None
    max_shard_size: str | None
    steps: tuple[Step, ...]
    expect: tuple[Expectation, ...]
    path: str | None = None
    description: str | None = None
    output_refused: str | None = None  # why the recipe's own output path is not used

    @property
    def output(self) -> str | None:
        if self.output_refused is not None:
            raise SurgeryError(
                f"output: {self.output_refused}",
                hint="give the output explicitly to write elsewhere",
                path=self.path,
            )
        return self.declared_output


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


def _output_refused(p: str | None, base: str | None) -> str | None:
    """Why a recipe's output path may not be used, or None: it must be relative, without
    ``~``, and stay inside the recipe's folder (the working folder for a recipe given as
    text or a mapping), so a recipe from someone else cannot pick where files go."""
    if p is None:
        return None
    if p.startswith("~") or os.path.isabs(p):
        return f"the path {p!r} is not relative; a recipe writes inside its own folder"
    root = os.path.abspath(base if base is not None else os.curdir)
    full = os.path.abspath(os.path.join(root, p))
    if os.path.commonpath([root, full]) != root or full == root:
        return f"the path {p!r} leaves the recipe's folder {root}; a recipe writes inside its own folder"
    return None


def _top(
    chk: _Checker, data: Any, base: str | None
) -> tuple[dict[str, str | None], str | None, str | None, str | None]:
    """version, inputs and output; -> (inputs, output path, shard size, why the output
    path is refused)."""
    if not isinstance(data, dict):
        chk.add("recipe", (), f"expected a mapping of {', '.join(_TOP)}, got {_show(data)}")
        return {}, None, None, None
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
    output = max_shard = refused = None
    if data.get("output") is not None:
        fields = {"path": _Field(_output_path), "max_shard_size": _Field(_output_size)}
        got = _mapping(_Ctx(chk, "output", None, ("output",), ""), data["output"], fields)
        if got is not _BAD:
            refused = _output_refused(got["path"], base)
            output = None if got["path"] is None else os.path.normpath(os.path.join(base or "", got["path"]))
            max_shard = got["max_shard_size"]
    return inputs, output, max_shard, refused


def _validate(data: Any, lines: Mapping[tuple, int], dups, path: str | None) -> Recipe:
    chk = _Checker(lines)
    for key_path, key in dups:
        head = "step" if key_path[0] == "steps" else str(key_path[0])
        chk.add(head if head != "step" else f"step {key_path[1] + 1}", key_path, f"{_show(key)} is given twice")
    if data is None:
        chk.add("recipe", (), f"empty (a recipe begins with 'version: 1', schema {SCHEMA})")
        raise SurgeryError(problems=chk.problems, hint="nothing was read or written", path=path)
    base = None if path is None else os.path.dirname(os.path.abspath(path))
    inputs, output, max_shard, refused = _top(chk, data, base)
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
        refused,
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
        data, lines, dups = parse_text(recipe, "recipe")
        return _validate(data, lines, dups, None)
    if not isinstance(recipe, (str, os.PathLike)):
        raise UsageError(f"a recipe is a path, YAML text or a dict, not {type(recipe).__name__}", param="recipe")
    path = os.fspath(recipe)
    data, lines, dups = parse_text(read(path), path)
    return _validate(data, lines, dups, path)
