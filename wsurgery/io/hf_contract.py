"""A model-folder output is a contract with transformers' ``from_pretrained``.

- Aliases: ``from_pretrained`` reads a safetensors file's tensors, not wsurgery's alias
  records; the only tie it restores itself is the output head to the input embedding
  that ``tie_word_embeddings`` declares. Every other alias would load as a missing key
  (initialized randomly), so a folder output writes it as stored values, with a note,
  unless the caller keeps the aliases (:func:`unrestored_aliases`, :func:`as_values`).
- Config: the fields the written weights decide are made true to them
  (:func:`config_updates`): ``torch_dtype``/``dtype`` (the dtype most floating
  parameters have), the layer count (``num_hidden_layers``, ``n_layer``, ``num_layers``,
  ``n_layers``) where the weights hold another number of layers; ``tie_word_embeddings``
  is kept true by :func:`wsurgery.io.hf_config.config_for_output`.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..model import Checkpoint

DTYPE_KEYS = ("torch_dtype", "dtype")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# ``<prefix>.<layers|layer|h|blocks|block>.<index>.`` : one stack of numbered layers
_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block))\.(\d+)\.")
_FLOATS = {"float16", "bfloat16", "float32", "float64"}
_CONFIG_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64"}


def unrestored_aliases(ckpt: Checkpoint, config: dict) -> list[str]:
    """The aliases of ``ckpt`` that ``from_pretrained`` would not restore: all but the
    head tied to the embedding without a transform (either way round), which a config
    true to the ties (``tie_word_embeddings``) declares."""
    from .hf_config import head_and_embedding

    head, embedding = head_and_embedding(config, ckpt.names())
    out = []
    for name, a in ckpt.aliases.items():
        identity = a.transform.is_identity
        if identity and {name, a.source} == {head, embedding}:
            continue
        out.append(name)
    return sorted(out)


def as_values(ckpt: Checkpoint, names: list[str]) -> Checkpoint:
    """``ckpt`` with the aliases ``names`` stored as tensors of their own (their values)."""
    from ..expressions import ComputedStored

    if not names:
        return ckpt
    stored = dict(ckpt.stored)
    aliases = dict(ckpt.aliases)
    for name in names:
        a = aliases.pop(name)
        stored[name] = ComputedStored(name, a.base, a.transform)
    return dataclasses.replace(ckpt, stored=stored, aliases=aliases)


def _layer_counts(names) -> dict[str, set[int]]:
    stacks: dict[str, set[int]] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            stacks.setdefault(m.group(1), set()).add(int(m.group(2)))
    return stacks


def main_dtype(ckpt: Checkpoint) -> str | None:
    """The dtype most floating parameters (by element count) of ``ckpt`` have."""
    count: Counter = Counter()
    for s in ckpt.stored.values():
        if s.dtype in _FLOATS:
            count[s.dtype] += s.numel
    return count.most_common(1)[0][0] if count else None


def config_updates(ckpt: Checkpoint, config: dict) -> tuple[dict, dict, list[str]]:
    """The config true to ``ckpt``'s weights: ``(config, changes, warnings)``, ``changes``
    as ``{key: {"from": x, "to": y}}`` (the config is a copy; unchanged when no change).

    The layer count changes only where the weights hold one stack of numbered layers; a
    stack whose indices are not ``0..N-1`` is a warning (``from_pretrained`` would load
    some layers randomly), the count left as it is."""
    import json

    out = json.loads(json.dumps(config))
    changes: dict = {}
    warnings: list[str] = []
    dtype = main_dtype(ckpt)
    for key in DTYPE_KEYS:
        if key in out and isinstance(out[key], str) and dtype is not None and out[key] != dtype:
            changes[key] = {"from": out[key], "to": _CONFIG_DTYPES[dtype]}
            out[key] = _CONFIG_DTYPES[dtype]
    stacks = _layer_counts(ckpt.names())
    keys = [k for k in LAYER_KEYS if isinstance(out.get(k), int) and not isinstance(out.get(k), bool)]
    if len(stacks) == 1 and keys:
        (prefix, indices), key = next(iter(stacks.items())), keys[0]
        n = len(indices)
        if indices != set(range(n)):
            warnings.append(
                f"the layers under {prefix} are numbered {_ranges(indices)}, not 0..{n - 1}: from_pretrained "
                f"loads layers 0..{out[key] - 1}; renumber them (rename) so that the config can say {n}"
            )
        elif out[key] != n:
            changes[key] = {"from": out[key], "to": n}
            out[key] = n
            types = out.get("layer_types")
            if isinstance(types, list) and len(types) >= n:
                out["layer_types"] = types[:n]
    return out, changes, warnings


def _ranges(indices: set[int]) -> str:
    shown = sorted(indices)
    return ", ".join(map(str, shown[:8])) + (", ..." if len(shown) > 8 else "")


def notes_for(changes: dict) -> list[str]:
    """One line per config field changed."""
    return [
        f"config.json: {key} {_text(c['from'])} -> {_text(c['to'])} (true to the weights written)"
        for key, c in changes.items()
    ]


def _text(v) -> str:
    return "not set" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@dataclasses.dataclass
class Prepared:
    """What a Hugging Face folder output writes: the checkpoint (aliases transformers
    would not restore stored as values), ``config.json``'s new bytes (None: unchanged),
    the config changes, the aliases written as values, and the notes to show."""

    ckpt: Checkpoint
    config_bytes: bytes | None
    changes: dict
    as_values: list[str]
    notes: list[str]


def for_folder_output(ckpt: Checkpoint, config: dict, *, safetensors: bool, keep_aliases: bool) -> Prepared:
    """Make a folder output from a folder with ``config`` true to transformers.

    Args:
        ckpt: what is written.
        config: the input folder's ``config.json``.
        safetensors: the weights are safetensors (a torch file keeps aliases as shared
            storage, which ``torch.load`` reads as tensors: nothing to do).
        keep_aliases: keep every alias as an alias (a wsurgery record).
    """
    from .hf_config import config_for_output, dump_config
    from .options import Note

    names = [] if keep_aliases or not safetensors else unrestored_aliases(ckpt, config)
    ckpt = as_values(ckpt, names)
    notes: list[str] = []
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        notes.append(
            Note(
                f"ties written as values ({len(names)}: {shown}): "
                "from_pretrained restores no tie but the head's; {option} keeps them as aliases",
                option="keep_aliases",
                kind="as_values",
                entries=names,
            )
        )
    tied, changes = config_for_output(ckpt, config)
    new, more, warnings = config_updates(ckpt, tied if tied is not None else config)
    changes = {**changes, **more}
    notes.extend(notes_for(changes))
    notes.extend(warnings)
    return Prepared(ckpt, dump_config(new) if changes else None, changes, names, notes)


def unrestored_warning(ckpt: Checkpoint, config: dict) -> list[str]:
    """A warning for the aliases of a safetensors folder that ``from_pretrained`` does not
    restore (it reads no alias record: they load as missing keys)."""
    if not ckpt.format.startswith("safetensors"):
        return []
    lost = unrestored_aliases(ckpt, config)
    if not lost:
        return []
    shown = ", ".join(lost[:4]) + (f" and {len(lost) - 4} more" if len(lost) > 4 else "")
    return [
        f"{len(lost)} ties are only alias records that from_pretrained does not read ({shown}): it loads them as "
        "missing keys, initialized randomly; write the folder again without keeping aliases to store their values"
    ]
