"""Reading a recipe's YAML (or JSON) text into plain values, with line numbers, bounded.

A recipe is text a person writes, so what reading it costs is bounded by the text, never
by what it expands to: before any node is built, one pass over the parser's events counts
the values the document holds, aliases counted at the size of what they repeat, and
refuses past :data:`MAX_NODES` values or :data:`MAX_DEPTH` levels. That pass runs on
libyaml's C parser when PyYAML has it (a 1 MiB flow list is refused in well under a
second), so the memory and time of a refused recipe are a small multiple of its size;
the document is then composed by PyYAML's own (Python) safe loader, whose messages and
line marks the errors quote.
Integers of more than :data:`~wsurgery.limits.MAX_INT_DIGITS` digits (decimal, hex,
octal, sexagesimal) are refused where they stand, before Python's int conversion limit
could turn them into a crash. Only PyYAML's safe constructors run; tags other than
plain mappings, lists and scalars are refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import InputError
from ..limits import MAX_INT_DIGITS

MAX_BYTES = 16 << 20  # a recipe is text a person writes; past this it is not one
MAX_NODES = 200_000  # values in the document, aliases expanded
MAX_DEPTH = 64
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
_INT_TAG = "tag:yaml.org,2002:int"

PathLike = str | os.PathLike

Lines = dict[tuple, int]
Dups = list[tuple[tuple, Any]]


def _counting_loader() -> Any:
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _count_events(text: str, label: str) -> None:
    """Refuse a document of more than ``MAX_NODES`` values (aliases expanded) or deeper
    than ``MAX_DEPTH``, from its events alone (nothing is built)."""
    import yaml

    loader = _counting_loader()(text)
    try:
        total = 0
        open_: list[tuple[int, str | None]] = []
        sizes: dict[str, int] = {}
        while True:
            ev = loader.get_event()
            if isinstance(ev, yaml.ScalarEvent):
                total += 1
                if ev.anchor:
                    sizes[ev.anchor] = 1
            elif isinstance(ev, yaml.CollectionStartEvent):
                total += 1
                open_.append((total, ev.anchor))
                if len(open_) > MAX_DEPTH:
                    raise InputError(f"the recipe is nested more than {MAX_DEPTH} levels deep", path=label)
            elif isinstance(ev, yaml.CollectionEndEvent):
                start, anchor = open_.pop()
                if anchor:
                    sizes[anchor] = total - start + 1
            elif isinstance(ev, yaml.AliasEvent):
                total += sizes.get(ev.anchor or "", 1)  # an unknown anchor: the composer says so
            elif isinstance(ev, yaml.StreamEndEvent):
                return
            if total > MAX_NODES:
                raise InputError(
                    f"the recipe expands to too many values: more than {MAX_NODES:,} (aliases expanded)",
                    path=label,
                )
    except yaml.YAMLError:
        return  # malformed: the composer reports it, in its own words, having read no more than this pass
    finally:
        loader.dispose()


def _int_problem(node: Any) -> str | None:
    """Why an integer scalar is too long to read, or None."""
    text = node.value.lower().lstrip("+-")
    digits = sum(c.isalnum() for c in (text[2:] if text[:2] in ("0x", "0o", "0b") else text))
    if digits <= MAX_INT_DIGITS:
        return None
    line = node.start_mark.line + 1
    return f"line {line}: an integer of {digits:,} digits; a recipe's numbers have at most {MAX_INT_DIGITS}"


def compose(text: str, label: str) -> tuple[Any, Lines, Dups]:
    """The YAML document as plain values, the line of every mapping key and list item
    (by path), and the duplicate keys found.

    Raises:
        InputError: not YAML, a disallowed tag, or past the bounds on size, depth or
            integer length.
    """
    import yaml

    _count_events(text, label)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: Lines = {}
        dups: Dups = []

        def scalar(n: Any) -> Any:
            if n.tag == _INT_TAG and (why := _int_problem(n)) is not None:
                raise InputError(why, path=label)
            return loader.construct_object(n, deep=True)

        def build(n: Any, path: tuple) -> Any:
            if isinstance(n, yaml.ScalarNode):
                return scalar(n)
            if n.tag not in _PLAIN_TAGS:
                raise InputError(f"the tag {n.tag!r} is not allowed in a recipe", path=label)
            if isinstance(n, yaml.MappingNode):
                loader.flatten_mapping(n)  # merge keys (<<)
                out: dict = {}
                for key_node, value_node in n.value:
                    key = scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else str(build(key_node, path))
                    if not isinstance(key, (str, int, float, bool)) and key is not None:
                        key = str(key)
                    if key in out:
                        dups.append((path + (key,), key))
                    lines[path + (key,)] = key_node.start_mark.line + 1
                    out[key] = build(value_node, path + (key,))
                return out
            items = []
            for i, item in enumerate(n.value):
                lines[path + (i,)] = item.start_mark.line + 1
                items.append(build(item, path + (i,)))
            return items

        data = None if node is None else build(node, ())
        return data, lines, dups
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, label) from None
    except RecursionError:
        raise InputError("the recipe is nested too deeply", path=label) from None
    finally:
        loader.dispose()


def _yaml_error(exc: Exception, label: str) -> InputError:
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(exc.problem or "malformed").split())
        if exc.context:
            what += f" ({' '.join(str(exc.context).split())})"
        return InputError(f"not valid YAML: {what}{at}", path=label)
    return InputError(f"not valid YAML: {' '.join(str(exc).split())}", path=label)


def parse_text(text: str, label: str) -> tuple[Any, Lines, Dups]:
    """:func:`compose`, taking JSON with tabs too (PyYAML refuses tabs as indentation)."""
    try:
        return compose(text, label)
    except InputError:
        # JSON may hold tabs only between tokens, so spaces in their place change
        # nothing (and keep the lines).
        if "\t" not in text or not _is_json(text):
            raise
    return compose(text.replace("\t", " "), label)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:  # a 5,000-digit integer too
        return False
    return True


def read(source: PathLike) -> str:
    """A recipe file's text (at most ``MAX_BYTES``), as UTF-8.

    Raises:
        InputError: missing, a folder, unreadable, too large or not UTF-8.
    """
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
