"""A well-formed command line, run without typer: ``wsurgery inspect m.safetensors --json``.

typer (and click under it) costs ~40 ms of imports, more than the interpreter's own
start-up. For a command line this module is sure of, :func:`parse` gives the keyword
arguments typer would pass the command, from the command's own declarations
(:mod:`wsurgery.cli.params`), and the console script calls the command with them. On
anything it is not sure of it declines (returns ``None``) and typer runs as always: help
(``-h``/``--help`` anywhere), an unknown, abbreviated or repeated option, combined short
flags, ``--``, any value or positional starting with ``-``, a missing or extra argument,
a value that does not convert or is out of range, a path click would refuse, a
declaration it does not know. So every help screen and every usage error (its message,
its exit code) stays click's.

The grammar: positional arguments; ``--opt value``, ``--opt=value``, ``-o value``;
flags (``--tree``, ``--no-tree``); a repeated option for a list. Values convert as typer
converts them: ``Path`` for paths, ``int``/``float`` (within ``min``/``max``), lists for
repeated options and variadic arguments, ``None`` for an empty optional list, defaults
filled in. ``tests/cli/test_fastpath.py`` holds it to click's answers for every command.
"""

from __future__ import annotations

import os
import stat
import types
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

from .params import Arg, Opt, declaration

# Keyword arguments of a declaration that do not change what a command line parses to.
_INERT = frozenset({"help", "metavar", "show_default", "rich_help_panel", "hidden", "show_choices", "show_envvar"})
_RANGE = frozenset({"min", "max"})
_PATH = frozenset({"exists", "file_okay", "dir_okay", "readable", "writable"})
_SCALARS = (str, int, float, bool, Path)


class Decline(Exception):
    """The command line is not one the fast path is sure of: typer takes it."""


class Param:
    """One parameter of a command as its command line parses it."""

    __slots__ = ("name", "option", "kind", "many", "required", "default", "checks")

    def __init__(self, name, option, kind, many, required, default, checks):
        self.name = name
        self.option = option  # an option (else a positional argument)
        self.kind = kind  # str, int, float, bool (a flag) or Path
        self.many = many  # a list: a repeatable option, or an argument that takes the rest
        self.required = required
        self.default = default
        self.checks = checks  # min/max of a number; exists/file_okay/... of a path


def _union_args(annotation: Any) -> tuple | None:
    origin = get_origin(annotation)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(annotation, types.UnionType)):
        return get_args(annotation)
    return None


def _param(p) -> tuple[Param, list[tuple[str, Any]]]:
    """The parameter ``p`` of a signature, and its option strings with what each gives (a
    flag's constant, or ``None`` for an option that takes a value): typer's reading of it."""
    import inspect

    if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        raise Decline
    annotation, decl = declaration(p.annotation)
    required = p.default is inspect.Parameter.empty
    if decl is None:  # typer: an argument without a default, an option with one
        decl = Arg() if required else Opt()
    option = isinstance(decl, Opt)
    if annotation is inspect.Parameter.empty:
        annotation = str
    union = _union_args(annotation)
    if union is not None:
        kept = [a for a in union if a is not type(None)]
        if len(kept) != 1:
            raise Decline
        annotation = kept[0]
    many = get_origin(annotation) is list
    if many:
        (annotation,) = get_args(annotation)
    if annotation not in _SCALARS:
        raise Decline
    kind = annotation
    checks = {k: v for k, v in decl.kwargs.items() if k not in _INERT}
    allowed = _RANGE if kind in (int, float) else _PATH if kind is Path else frozenset()
    if set(checks) - allowed or (kind is bool and (many or not option)):
        raise Decline
    if kind is int:
        checks = {k: None if v is None else int(v) for k, v in checks.items()}
    default = None if required else p.default
    param = Param(p.name, option, kind, many, required, default, checks)
    if not option:
        return param, []
    if any(d.isidentifier() or not d.startswith("-") or d.startswith("-/") for d in decl.decls):
        raise Decline
    decls = decl.decls or (
        (f"--{p.name.replace('_', '-')}/--no-{p.name.replace('_', '-')}",) if kind is bool else (f"--{p.name}",)
    )
    names: list[tuple[str, Any]] = []
    for d in decls:
        first, slash, second = d.partition("/")
        if slash and kind is not bool:
            raise Decline
        names.append((first.rstrip(), True if kind is bool else None))
        if slash and second.strip():
            names.append((second.strip(), False))
    return param, names


def table(fn) -> tuple[list[Param], dict[str, tuple[Param, Any]]]:
    """The parameters of command ``fn`` in order, and its option strings (``--src``, ``-t``,
    ``--no-tree``) with their parameter and what each gives."""
    import inspect

    params, options = [], {}
    for p in inspect.signature(fn, eval_str=True).parameters.values():
        param, names = _param(p)
        params.append(param)
        for opt, const in names:
            if not opt or opt in options:
                raise Decline
            options[opt] = (param, const)
    return params, options


def _is_short(opt: str) -> bool:
    """click's short option: one prefix character and one letter (``-o``)."""
    return len(opt) == 2 and opt[0] != opt[1]


def _convert(param: Param, text: str) -> Any:
    """One value as click's type and typer's convertor make it (``Decline`` where click
    would refuse it)."""
    kind = param.kind
    if kind is str:
        return text
    if kind is Path:
        _check_path(param.checks, text)
        return Path(text)
    try:
        value = kind(text)
    except ValueError:
        raise Decline from None
    return _in_range(param, value)


def _in_range(param: Param, value: Any) -> Any:
    low, high = param.checks.get("min"), param.checks.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise Decline
    return value


def _check_path(checks: dict[str, Any], text: str) -> None:
    """What click's path type checks of a path that exists (it accepts a missing one
    unless ``exists``)."""
    exists = checks.get("exists", False)
    file_okay, dir_okay = checks.get("file_okay", True), checks.get("dir_okay", True)
    readable, writable = checks.get("readable", True), checks.get("writable", False)
    if not (exists or readable or writable or not file_okay or not dir_okay):
        return
    try:
        st = os.stat(text)
    except OSError:
        if exists:
            raise Decline from None
        return
    if (not file_okay and stat.S_ISREG(st.st_mode)) or (not dir_okay and stat.S_ISDIR(st.st_mode)):
        raise Decline
    if (readable and not os.access(text, os.R_OK)) or (writable and not os.access(text, os.W_OK)):
        raise Decline


def _default(param: Param) -> Any:
    """The value of a parameter not given: its default as click casts it, as typer passes it."""
    value, kind = param.default, param.kind
    if value is None:
        return None
    if param.many or kind is Path or type(value) is not kind:
        raise Decline  # a default click would convert, in ways not worth copying
    return _in_range(param, value) if kind in (int, float) else value


def parse(fn, args: list[str]) -> Optional[dict[str, Any]]:
    """The keyword arguments typer would call command ``fn`` with for ``args`` (what
    follows the command's name), or ``None`` where the fast path declines."""
    try:
        return _parse(fn, args)
    except Decline:
        return None


def _parse(fn, args: list[str]) -> dict[str, Any]:
    params, options = table(fn)
    given: dict[str, list[Any]] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if "\0" in arg:
            raise Decline
        if not arg.startswith("-"):
            positional.append(arg)
            continue
        value: Any
        if arg in options:
            param, const = options[arg]
            if param.kind is bool:
                value = const
            else:
                if i >= len(args) or args[i].startswith("-") or "\0" in args[i]:
                    raise Decline
                value = args[i]
                i += 1
        else:
            opt, eq, value = arg.partition("=")
            if not eq or opt not in options or _is_short(opt) or value.startswith("-"):
                raise Decline
            param, _ = options[opt]
            if param.kind is bool:
                raise Decline  # a flag given a value: click's error
        if param.name in given and not param.many:
            raise Decline  # click keeps the last; say so only when asked
        given.setdefault(param.name, []).append(value)

    arguments = [p for p in params if not p.option]
    rest = [j for j, p in enumerate(arguments) if p.many]
    if len(rest) > 1 or (rest and rest[0] != len(arguments) - 1):
        raise Decline
    fixed = len(arguments) - len(rest)
    if len(positional) < fixed or (len(positional) > fixed and not rest):
        raise Decline
    for p, text in zip(arguments, positional, strict=False):
        given[p.name] = positional[fixed:] if p.many else [text]

    kwargs: dict[str, Any] = {}
    for p in params:
        raw = given.get(p.name)
        if raw is None:
            if p.required:
                raise Decline
            kwargs[p.name] = _default(p)
        elif p.kind is bool:
            kwargs[p.name] = raw[0]
        elif p.many:
            kwargs[p.name] = [_convert(p, v) for v in raw]
        else:
            kwargs[p.name] = _convert(p, raw[0])
    return kwargs
