"""Ties: find them in shared storage, and encode/decode them as safetensors metadata.

A tie is an *alias* name whose value is ``transform(source)``, where ``source`` is a
stored tensor. In a safetensors file ``__metadata__`` records:

- ``"wsurgery.aliases"``: JSON ``{"<alias>": {"source": "<stored>", "transform": [...]}}``;
- ``"<alias>": "<stored>"`` for every tie without a transform (the convention of
  ``safetensors.torch.save_model``), never for a transformed one, and never over a key
  the metadata already holds: a reserved key (``format``, ``wsurgery.aliases``, any
  ``wsurgery.*``) or the user's own entry (then only the JSON record carries the tie);
- ``"format": "pt"``.

Invariants (enforced on read and on write): an alias is never also a stored name; its
source is a stored name (chains are composed, cycles refused); its transform fits the
source's shape and dtype, and its result is a tensor torch can hold. Reading one
file's aliases costs time linear in its header: a chain is at most ``MAX_CHAIN`` links,
a record or a composed chain at most ``MAX_STEPS`` steps, each record is parsed and
inferred once (a chain is composed from its already resolved source), and the steps
composed over all aliases are at most ``MAX_ALIAS_STEPS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InputError, SurgeryError, TransformError

if TYPE_CHECKING:
    pass

ALIASES_KEY = "wsurgery.aliases"
MAX_CHAIN = 64  # aliases of aliases followed on read; wsurgery itself writes chains of length 1
MAX_STEPS = 1024  # transform steps of one alias record, and of one chain composed
MAX_ALIAS_STEPS = 1_000_000  # transform steps composed over all the aliases of one file
FORMAT_KEY = "format"


def reserved(key: str) -> bool:
    """A metadata key wsurgery or its readers give a meaning: never an ``alias: source`` entry."""
    return key == FORMAT_KEY or key.startswith("wsurgery.")


@dataclass(frozen=True)
class AliasRecord:
    source: str
    specs: tuple[str, ...]  # canonical transform steps, () = same


def encode(
    aliases: dict[str, AliasRecord], metadata: dict[str, str] | None, *, convention: bool = True
) -> dict[str, str]:
    """The ``__metadata__`` dict for a file storing tensors with these aliases.

    ``metadata`` is the user's metadata to keep. An entry of it that is the
    ``alias: source`` entry of an older encoding (an alias's name, its source's name) is
    dropped and rewritten; any other entry is kept as it is, so the convention entry of
    an alias whose name the metadata already holds, or that is reserved (``format``,
    ``wsurgery.*``), is not written: the JSON record carries that tie alone.
    ``convention=False`` writes no convention entry at all (a sharded index's metadata).
    """
    out: dict[str, str] = {}
    for key, value in sorted((metadata or {}).items()):
        if key == ALIASES_KEY:
            continue
        rec = aliases.get(key)
        if rec is not None and value == rec.source:
            continue  # the convention entry of an older encoding, rewritten below if it still holds
        out[key] = value
    out[FORMAT_KEY] = "pt"
    if aliases:
        table = {name: {"source": rec.source, "transform": list(rec.specs)} for name, rec in sorted(aliases.items())}
        out[ALIASES_KEY] = json.dumps(table, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        for name, rec in sorted(aliases.items()):
            if convention and not rec.specs and not reserved(name) and name not in out:
                out[name] = rec.source
    return out


def parse_table(text: str, path) -> dict:
    """The JSON object of a ``wsurgery.aliases`` entry; anything else is an input error."""
    try:
        table = json.loads(text)
    except (ValueError, RecursionError):
        raise InputError(f"{path}: {ALIASES_KEY} metadata is not valid JSON") from None
    if not isinstance(table, dict):
        raise InputError(f"{path}: {ALIASES_KEY} metadata is not a JSON object")
    return table


def decode(
    metadata: dict[str, str] | None, stored: dict[str, tuple[tuple[int, ...], str]], path
) -> tuple[dict[str, AliasRecord], dict[str, str]]:
    """Read alias records back; returns ``(aliases, other metadata)``.

    ``stored`` maps each stored name to ``(shape, dtype)``. Alias metadata is input like
    any other: malformed JSON, a missing source, a cycle, or a transform that does not
    parse or fit is an :class:`InputError`.
    """
    metadata = dict(metadata or {})
    raw: dict[str, AliasRecord] = {}
    text = metadata.pop(ALIASES_KEY, None)
    if text is not None:
        table = parse_table(text, path)
        for name, rec in table.items():
            if (
                not isinstance(rec, dict)
                or not isinstance(rec.get("source"), str)
                or not isinstance(rec.get("transform", []), list)
                or not all(isinstance(s, str) for s in rec.get("transform", []))
            ):
                raise InputError(
                    f'{path}: {ALIASES_KEY} entry {name!r} must be {{"source": str, "transform": [str, ...]}}'
                )
            raw[name] = AliasRecord(rec["source"], tuple(rec.get("transform", [])))
    # The save_model convention: "<alias>": "<stored name>"; a reserved key never is one,
    # and an entry under a name the JSON record already declares is the user's own.
    others: dict[str, str] = {}
    for key, value in metadata.items():
        if reserved(key):
            others[key] = value
            continue
        if key in raw:
            if not raw[key].specs and raw[key].source == value:
                continue  # the plain entry that mirrors a wsurgery record
            others[key] = value
            continue
        if key not in stored and value in stored:
            raw[key] = AliasRecord(value, ())
            continue
        others[key] = value

    for name, rec in raw.items():
        if name in stored:
            raise InputError(f"{path}: {name!r} is both a stored tensor and an alias in the metadata")
        if len(rec.specs) > MAX_STEPS:
            raise InputError(f"{path}: alias {name!r} has a transform of {len(rec.specs)} steps (at most {MAX_STEPS})")
    chains = _Chains(raw, stored, path)
    return {name: chains.resolve(name) for name in raw}, others


@dataclass(frozen=True)
class _Resolved:
    record: AliasRecord  # the stored source and the composed canonical steps
    shape: tuple[int, ...]
    dtype: str


class _Chains:
    """Aliases resolved to stored sources, each once: a chain is composed from its source's
    resolution, so the work is linear in the records (see the module's invariants)."""

    def __init__(self, raw: dict[str, AliasRecord], stored, path):
        self.raw = raw
        self.stored = stored
        self.path = path
        self.done: dict[str, _Resolved] = {}
        self.left = MAX_ALIAS_STEPS

    def resolve(self, name: str) -> AliasRecord:
        """Follow ``name`` to a stored source, composing transforms; refuse cycles and misfits."""
        raw, path = self.raw, self.path
        chain = [name]
        on_chain = {name}
        cur = raw[name]
        while name not in self.done and cur.source not in self.stored and cur.source not in self.done:
            if cur.source not in raw:
                raise InputError(f"{path}: alias {name!r} names a missing source {cur.source!r}")
            if cur.source in on_chain:
                raise InputError(f"{path}: aliases form a cycle: {' -> '.join([*chain, cur.source])}")
            if len(chain) >= MAX_CHAIN:  # bounds the work per alias: a long chain cannot make loading hang
                raise InputError(f"{path}: alias {name!r} is the start of a chain of more than {MAX_CHAIN} aliases")
            chain.append(cur.source)
            on_chain.add(cur.source)
            cur = raw[cur.source]
        for link in reversed(chain):
            if link not in self.done:
                self.done[link] = self._compose(link)
        return self.done[name].record

    def _compose(self, name: str) -> _Resolved:
        """``name``'s own steps after its source's resolution (a stored tensor's is itself)."""
        from .transforms import chain_text, parse

        rec = self.raw[name]
        base = self.done.get(rec.source)
        if base is None:
            shape, dtype = self.stored[rec.source]
            base = _Resolved(AliasRecord(rec.source, ()), tuple(shape), dtype)
        try:
            transform = parse(list(rec.specs))
            shape, dtype = transform.infer(base.shape, base.dtype)
        except (TransformError, SurgeryError) as exc:
            raise InputError(f"{self.path}: alias {name!r} has a bad transform: {exc}") from None
        except (ValueError, OverflowError, RecursionError) as exc:  # e.g. a 5000-digit integer in a step
            raise InputError(f"{self.path}: alias {name!r} has a bad transform: {str(exc)[:120]}") from None
        specs = (*base.record.specs, *transform.specs())
        why_not = transform.tie_problem()
        if why_not is not None:
            raise InputError(f"{self.path}: alias {name!r} ({chain_text(specs)}): {why_not}")
        if len(specs) > MAX_STEPS:
            raise InputError(
                f"{self.path}: alias {name!r} composes a chain of {len(specs)} transform steps (at most {MAX_STEPS})"
            )
        self.left -= len(specs)
        if self.left < 0:
            raise InputError(
                f"{self.path}: resolving its aliases composes more than {MAX_ALIAS_STEPS} transform steps "
                "(long chains of transformed aliases, a metadata bomb)"
            )
        return _Resolved(AliasRecord(base.record.source, specs), shape, dtype)


# --- shared storage in torch state dicts -------------------------------------------------


def _span(t) -> tuple[int, int]:
    """Byte interval ``[lo, hi)`` a tensor covers in its storage."""
    isz = t.element_size()
    if t.numel() == 0:
        return (t.storage_offset() * isz, t.storage_offset() * isz)
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=False))
    lo = t.storage_offset()
    return lo * isz, (lo + extent) * isz


def _same_view(a, b) -> bool:
    return (
        a.dtype == b.dtype
        and a.storage_offset() == b.storage_offset()
        and tuple(a.shape) == tuple(b.shape)
        and tuple(a.stride()) == tuple(b.stride())
    )


def _transposed_view(base, t) -> bool:
    return (
        base.dim() == 2
        and t.dim() == 2
        and base.dtype == t.dtype
        and base.storage_offset() == t.storage_offset()
        and tuple(t.shape) == tuple(base.shape)[::-1]
        and tuple(t.stride()) == tuple(base.stride())[::-1]
    )


def find_shared(tensors: dict, path="<state dict>") -> dict[str, AliasRecord]:
    """Ties implied by shared storage in a torch state dict.

    Tensors whose bytes overlap in one storage are read as ties: the same view is a tie
    without a transform, a transposed 2-D view a ``transpose`` tie, any other view of the
    source (slice, reshape, permute, ...) a tie with the steps that make it
    (``wsurgery.views.view_steps``, in its canonical order). The source is the widest
    contiguous member (see :func:`_base_of`), or the first by name if none is
    contiguous. Any other overlap is an :class:`InputError` that names the tensors. Tensors that share a storage without
    overlapping (slices of one buffer) stay independent.
    """
    groups: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        storage = t.untyped_storage()
        key = (t.device.type, t.device.index, storage.data_ptr())
        groups.setdefault(key, []).append(name)

    aliases: dict[str, AliasRecord] = {}
    order = {name: i for i, name in enumerate(tensors)}
    for names in groups.values():
        if len(names) < 2:
            continue
        spans = sorted((_span(tensors[n]), n) for n in names)
        clusters: list[list[str]] = []
        hi_max = -1
        for (lo, hi), n in spans:
            if clusters and lo < hi_max:
                clusters[-1].append(n)
                hi_max = max(hi_max, hi)
            else:
                clusters.append([n])
                hi_max = hi
        for cluster in clusters:
            if len(cluster) < 2:
                continue
            members = sorted(cluster)
            base = _base_of(tensors, members, order)
            for n in members:
                if n == base:
                    continue
                if _same_view(tensors[base], tensors[n]):
                    aliases[n] = AliasRecord(base, ())
                elif _transposed_view(tensors[base], tensors[n]):
                    aliases[n] = AliasRecord(base, ("transpose",))
                elif (specs := _view_of(tensors[base], tensors[n])) is not None:
                    aliases[n] = AliasRecord(base, tuple(specs))
                else:
                    a, b = tensors[base], tensors[n]
                    raise InputError(
                        f"{path}: tensors {base!r} {tuple(a.shape)} and {n!r} {tuple(b.shape)} overlap in storage "
                        "but neither is a view of the other",
                        hint="save them as separate tensors (clone one) and retry",
                    )
    return aliases


def _base_of(tensors: dict, members: list[str], order: dict[str, int]) -> str:
    """The member the others are views of: the widest contiguous one. Among equals of one
    shape, the first by name (the same whatever the dict's order); of several shapes (a
    reshape), the first in the dict, as it was written."""
    contiguous = [n for n in members if tensors[n].is_contiguous()]
    if not contiguous:
        return members[0]
    widest = max(tensors[n].numel() for n in contiguous)
    equals = [n for n in contiguous if tensors[n].numel() == widest]
    if len({tuple(tensors[n].shape) for n in equals}) > 1:
        return min(equals, key=order.__getitem__)
    return equals[0]


def _view_of(base, t) -> list[str] | None:
    """View steps (slice, reshape, permute, ...) that make ``t`` from ``base``, or None."""
    from .views import Strided, view_steps

    return view_steps(Strided.of(base), Strided.of(t))
