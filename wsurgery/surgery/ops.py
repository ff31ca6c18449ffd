"""What every verb shares: the planned step (``Op``), building the new checkpoint, choosing
names (and non-tensor entries) with the one selector, and refusing new names that look
like typos.

Invariants every verb keeps (``Checkpoint`` checks them on the result when it is made):
a name is stored or an alias, never both; every alias's base is the stored tensor of its
source name. A verb never reads tensor data: it only builds lazy entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import Problem, SurgeryError
from ..limits import MAX_NAME_LENGTH, MAX_NAMES_BYTES, MAX_TENSORS
from ..model import Checkpoint, Derived, Stored, natural_key
from ..selectors import matches as selectors_matches
from ..selectors import select as selectors_select
from ..selectors import unknown


@dataclass(frozen=True)
class Op:
    """One planned step: ``dst`` becomes ``value`` (a :class:`Derived` over one stored tensor,
    a stored entry such as a concatenation, or None for a drop)."""

    kind: str  # tie | copy | untie | rename | drop | cast | concat | split | stack | unstack
    src: str  # what the step was asked about (the name the user addressed)
    dst: str
    value: Derived | Stored | None
    replaces: bool = False  # dst existed before
    origin: str | None = None  # the other checkpoint's path when the source comes from it
    note: str = ""

    @property
    def sources(self) -> tuple[str, ...]:
        """The stored tensors the value comes from (after following aliases)."""
        v = self.value
        if v is None:
            return ()
        if isinstance(v, Derived):
            return (v.source,)
        return tuple(getattr(v, "sources", (v.name,)))

    @property
    def base(self) -> str:
        """The stored source's name (several joined by commas)."""
        return ", ".join(self.sources)

    @property
    def how(self) -> str:
        """The transform (or join) that makes the value, as text."""
        v = self.value
        if isinstance(v, Derived):
            return str(v.transform)
        return getattr(v, "label", "same") if v is not None else "-"

    def describe(self) -> dict:
        v = self.value
        return {
            "op": self.kind,
            "src": self.src,
            "dst": self.dst,
            "source": self.base,
            "checkpoint": self.origin,
            "transform": v.specs if isinstance(v, Derived) else ([] if v is None else [self.how]),
            "shape": None if v is None else list(v.shape),
            "dtype": None if v is None else v.dtype,
            "replaces": self.replaces,
            "note": self.note,
        }


def refuse(problems: Sequence[Problem | str]) -> None:
    """Raise every problem at once (each distinct one once), if there is one."""
    if problems:
        distinct = list({str(p): p for p in problems}.values())
        raise SurgeryError(problems=distinct, hint="nothing was written")


def derive(
    ckpt: Checkpoint,
    stored: dict[str, Stored],
    aliases: dict[str, Derived],
    ops: Sequence[Op],
    *,
    other: Checkpoint | None = None,
    skipped: Sequence[str] | None = None,
) -> Checkpoint:
    """A new checkpoint: ``ckpt``'s metadata and provenance, these entries, ``ops`` appended
    to its changes (``skipped``: its non-tensor entries, by default ``ckpt``'s). Checks the
    invariants."""
    NameBudget(ckpt, other).check_result(stored, aliases, ops[0].kind if ops else "surgery")
    files = list(ckpt.input_files)
    if other is not None:
        files += [f for f in other.input_files if f not in files]
    return ckpt.evolve(
        stored=stored,
        aliases=aliases,
        metadata=dict(ckpt.metadata),
        skipped=list(ckpt.skipped if skipped is None else skipped),
        input_files=files,
        changes=[*ckpt.changes, *ops],
    )


class NameBudget:
    """How many names, and how many characters of names, a verb's result may hold.

    At most :data:`~wsurgery.limits.MAX_TENSORS` names and
    :data:`~wsurgery.limits.MAX_NAMES_BYTES` characters, or as many as the inputs
    (``given``) already hold when they hold more; every name a verb makes at most
    :data:`~wsurgery.limits.MAX_NAME_LENGTH` characters, or as long as the longest input name.
    A shape is only a claim (a
    ``(10**9, 0)`` tensor holds no byte), so a verb that makes one name per slice or per
    tensor under a prefix checks the count with :meth:`made` *before* building anything;
    :meth:`check_result` (run by :func:`derive` on every result) is the backstop.
    """

    def __init__(self, *given: Checkpoint | None):
        inputs = [c for c in given if c is not None]
        self.held = sum(len(c) for c in inputs)
        self.chars = sum(len(n) for c in inputs for n in (*c.stored, *c.aliases))
        self.max_count = max(MAX_TENSORS, self.held)
        self.max_chars = max(MAX_NAMES_BYTES, self.chars)
        self.max_length = max([MAX_NAME_LENGTH, *(len(n) for c in inputs for n in (*c.stored, *c.aliases))])

    def made(self, verb: str, what: str, count: int, chars: int, longest: int, names: Sequence[str] = ()) -> None:
        """Refuse (``SurgeryError``) ``what``, which would leave ``count`` names of ``chars``
        characters in all in the result and make a name of ``longest`` characters, when
        that passes the bounds."""
        if count > self.max_count:
            why = f"would make a result of {count:,} names; a result holds at most {self.max_count:,}"
        elif chars > self.max_chars:
            why = f"would make names of {chars:,} characters in all; names hold at most {self.max_chars:,}"
        elif longest > self.max_length:
            why = f"would make a name of {longest:,} characters; a name holds at most {self.max_length:,}"
        else:
            return
        refuse([Problem(f"{verb}: {what} {why} (the input holds {self.held:,} names)", names=tuple(names))])

    def check_result(self, stored: dict[str, Stored], aliases: dict[str, Derived], verb: str) -> None:
        """Refuse a result past the bounds (the names it holds, all of them)."""
        count = len(stored) + len(aliases)
        chars = sum(len(n) for n in stored) + sum(len(n) for n in aliases)
        self.made(verb, "the result", count, chars, 0)


def dependents(ckpt: Checkpoint, name: str) -> list[str]:
    """The aliases whose stored source is ``name``, in natural order."""
    return sorted((n for n, a in ckpt.aliases.items() if a.source == name), key=natural_key)


def check_orphans(ckpt: Checkpoint, leaving: Iterable[str], verb: str, problems: list) -> None:
    """A stored tensor that leaves (dropped, moved, replaced) while aliases that stay use
    it is a problem naming them."""
    leaving = dict.fromkeys(leaving)
    for name in leaving:
        users = [a for a in dependents(ckpt, name) if a not in leaving]
        if users:
            them = "them" if len(users) > 1 else "it"
            problems.append(
                Problem(
                    f"{verb}: {name} is the stored source of {', '.join(users)}, which would be left without it; "
                    f"untie or drop {them} too",
                    use="untie",
                    names=(name, *users),
                )
            )


def skipped_name(entry: str) -> str:
    """The name of a non-tensor entry (``ckpt.skipped`` holds ``"name: what"``)."""
    return entry.split(": ", 1)[0]


def select_entries(ckpt: Checkpoint, selectors: Iterable[str]) -> tuple[list[str], set[str]]:
    """The tensor names ``selectors`` select (in the checkpoint's order) and the non-tensor
    entries (``ckpt.skipped`` items) they select, by the one rule of
    :mod:`wsurgery.selectors`.

    Raises:
        UnknownNameError: for the first selector that selects neither (close matches
            among the tensor names).
    """
    names = ckpt.names()
    known = set(names)
    skipped = {skipped_name(s): s for s in ckpt.skipped}
    skipped_names = list(skipped)
    chosen: set[str] = set()
    left_out: set[str] = set()
    for selector in selectors:
        found = selectors_matches(names, selector, known=known)
        extra = selectors_matches(skipped_names, selector) if skipped_names else []
        if not found and not extra:
            raise unknown(names, selector, path=ckpt.path)
        chosen.update(found)
        left_out.update(skipped[n] for n in extra)
    return [n for n in names if n in chosen], left_out


def select_under(ckpt: Checkpoint, selector: str) -> list[tuple[str, str]]:
    """``[(name, suffix)]`` for what ``selector`` selects: an exact name (suffix ``""``),
    every tensor under a module prefix (the part after it), or a glob's one tensor.

    Raises:
        UnknownNameError: it selects nothing (with close matches).
        SurgeryError: a glob that selects several tensors (nothing to map them by).
    """
    names = ckpt.names()
    found = selectors_select(names, selector, path=ckpt.path)
    if found == [selector]:
        return [(selector, "")]
    prefix = selector.rstrip(".") + "."
    if all(n.startswith(prefix) for n in found):
        return [(n, n[len(prefix) :]) for n in found]
    if len(found) == 1:
        return [(found[0], "")]
    raise SurgeryError(
        f"{selector!r} is a glob that selects {len(found)} tensors; it can pair with one destination only",
        hint="name a module prefix to map several tensors",
    )


# --- new names that look like typos ----------------------------------------------------

def _component(text: str, i: int) -> str:
    """The dot-separated part of ``text`` that holds position ``i``."""
    start = text.rfind(".", 0, i) + 1
    end = text.find(".", i)
    return text[start : len(text) if end < 0 else end]


def _one_edit(a: str, b: str) -> bool:
    """``a`` and ``b`` differ by one insertion, deletion, substitution or swap of two
    neighbouring characters inside a word of at least four characters, and not only in
    digits: ``layers.12`` beside ``layers.1`` is a new layer and ``attn.k`` beside
    ``attn.q`` another projection, but ``lm_head.wieght`` is a typo."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    ja, jb = len(a), len(b)
    while ja > i and jb > i and a[ja - 1] == b[jb - 1]:
        ja, jb = ja - 1, jb - 1
    da, db = a[i:ja], b[i:jb]
    swapped = len(da) == len(db) == 2 and da == db[::-1]
    if not (max(len(da), len(db)) == 1 or swapped):
        return False
    if (da + db).isdigit() or "." in da + db:
        return False
    return min(len(_component(a, i)), len(_component(b, i))) >= 4


_HASH_MOD = (1 << 61) - 1
_HASH_BASE = 1_000_003


def _masked(name: str) -> list[tuple[int, int, int, int]]:
    """Keys of ``name`` with each dot-separated component of four characters or more in
    turn masked out: two names one edit apart (``_one_edit``: the edit never touches a dot,
    and stays in a component of at least four characters) share the key that masks the
    component the edit is in. A key is the number of components, the masked position and
    hashes of the components before and after it, computed in one pass each way: linear
    in the name, however many components it has. Two names that share a key by a hash
    collision only cost one more exact comparison."""
    parts = name.split(".")
    n = len(parts)
    hashes = [hash(p) for p in parts]
    before = [0] * (n + 1)
    for i, h in enumerate(hashes):
        before[i + 1] = (before[i] * _HASH_BASE + h) % _HASH_MOD
    after = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        after[i] = (after[i + 1] * _HASH_BASE + hashes[i]) % _HASH_MOD
    return [(n, k, before[k], after[k + 1]) for k in range(n) if len(parts[k]) >= 4]


def close_names(existing: Iterable[str], fresh: Iterable[str]) -> dict[str, list[str]]:
    """For each name of ``fresh``, the ``existing`` names one edit (``_one_edit``) or a
    change of case away from it, in natural order.

    Only ``fresh`` is indexed (by its masked keys, ``_masked``); ``existing`` is streamed
    once: memory grows with the new names, never with the checkpoint, and time with the
    characters of its names times their components (the typo check of a 100,000-name
    checkpoint holds no index of its names).
    """
    found: dict[str, dict[str, None]] = {}
    by_case: dict[str, list[str]] = {}
    by_key: dict[tuple[int, int, int, int], list[str]] = {}
    for n in fresh:
        if n in found:
            continue
        found[n] = {}
        by_case.setdefault(n.lower(), []).append(n)
        for key in _masked(n):
            by_key.setdefault(key, []).append(n)
    for e in existing:
        for n in by_case.get(e.lower(), ()):
            if n != e:
                found[n][e] = None
        for key in _masked(e):
            for n in by_key.get(key, ()):
                if _one_edit(n, e):
                    found[n][e] = None
    return {n: sorted(close, key=natural_key) for n, close in found.items()}


def check_new_names(ckpt: Checkpoint, names: Iterable[str], verb: str, problems: list) -> None:
    """A new name one edit (or a change of case) away from an existing one is probably a
    typo: a problem with the close names, unless the caller said the names are new."""
    fresh = [n for n in names if n not in ckpt]
    if not fresh:
        return
    near = close_names(ckpt.names(), fresh)
    for n in fresh:
        close = near[n]
        if close:
            problems.append(
                Problem(
                    f"{verb}: {n!r} is a new name, one edit away from {', '.join(map(repr, close[:3]))} (a typo?)",
                    new_name=True,
                    names=(n, *close[:3]),
                )
            )
