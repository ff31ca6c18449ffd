"""``merge_lora``: PEFT LoRA adapters folded into their base checkpoint, as PEFT's
``merge_and_unload`` does, without the model's code and one tensor at a time.

An adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``, read by wsurgery's safe reader). Its tensors are named as
PEFT saves them: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``
(Linear, Conv1D, Conv2d), ``<module>.lora_embedding_A`` / ``_B`` (Embedding), and whole
tensors for ``modules_to_save`` (and embedding layers PEFT saved alongside). The update
of a module is ``s * (B @ A)`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``), ``r`` and ``lora_alpha`` taken from ``rank_pattern`` / ``alpha_pattern``
by PEFT's rule (a pattern key matches a module name that equals it or ends with
``.<key>``, as a regular expression). DoRA adapters of Linear layers (a
``lora_magnitude_vector`` m) merge as PEFT merges them: m / ||W0 + dW|| * (W + dW), the
norm per output row.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .. import lookup
from ..errors import InputError, Problem, SurgeryError, UsageError
from ..expressions import ComputedStored
from ..merging import LoraStored, LoraUpdate
from ..model import Checkpoint, Derived, Stored, natural_key
from .ops import Op, refuse

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIXES = ("base_model.model.", "base_model.")
_LORA = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)$"
)


@dataclass
class Adapter:
    """A PEFT LoRA adapter, read lazily.

    Attributes:
        path: its folder.
        config: ``adapter_config.json``, parsed.
        weights: its tensors, as a lazy checkpoint.
    """

    path: str
    config: dict
    weights: Checkpoint

    def close(self) -> None:
        self.weights.close()


def _find(path: str) -> tuple[str, str]:
    """(the adapter's folder, its weights file) for a folder or a weights file."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.isdir(path):
        weights = next((os.path.join(path, w) for w in WEIGHTS if os.path.isfile(os.path.join(path, w))), None)
        if weights is None:
            raise InputError(f"{path}: no {' or '.join(WEIGHTS)} in the adapter folder", path=path)
    else:
        weights = path
    if not os.path.isfile(os.path.join(folder, CONFIG)):
        raise InputError(f"{folder}: no {CONFIG} (a PEFT adapter folder holds one beside its weights)", path=folder)
    return folder, weights


def open_adapter(adapter: str | os.PathLike | Adapter | Checkpoint) -> Adapter:
    """Read an adapter's config and open its weights (nothing else is read).

    Args:
        adapter: the adapter folder, its weights file, an opened checkpoint of its
            weights file (its config is read beside it), or an :class:`Adapter`.

    Raises:
        InputError: no config or weights, or a config that is not JSON.
        SurgeryError: an adapter type other than LoRA (IA3, LoHa, LoKr, ...), or LoRA
            biases.
    """
    from ..io.registry import open as load

    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, Checkpoint):
        if adapter.path is None:
            raise UsageError("an adapter given as a checkpoint must have been read from a file", param="adapter")
        folder, _ = _find(adapter.path)
        weights = adapter
    else:
        folder, wfile = _find(os.fspath(adapter))
        weights = None
    cpath = os.path.join(folder, CONFIG)
    try:
        with open(cpath, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"{cpath}: not a readable JSON adapter config ({exc})", path=cpath) from None
    if not isinstance(config, dict):
        raise InputError(f"{cpath}: an adapter config is a JSON object", path=cpath)
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise SurgeryError(
            problems=[Problem(f"merge_lora: {folder} is a {kind} adapter; only LoRA adapters can be merged")],
            hint="merge it with PEFT's merge_and_unload",
        )
    if config.get("lora_bias"):
        raise SurgeryError(
            problems=[Problem(f"merge_lora: {folder} trains LoRA biases (lora_bias); they are not merged here")],
            hint="merge it with PEFT's merge_and_unload",
        )
    return Adapter(folder, config, weights if weights is not None else load(wfile))


def pattern_key(patterns, module: str) -> str | None:
    """PEFT's rule: the first pattern key that matches ``(.*\\.)?(key)$`` on the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _strip(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def _base_name(base: Checkpoint, module: str, leaf: str) -> str | None:
    """The base tensor ``<module>.<leaf>``, the module's name possibly carrying fewer
    leading parts (a base saved from the inner model: ``layers.0...`` for
    ``model.layers.0...``) or more (an outer wrapper's prefix)."""
    parts = module.split(".")
    for i in range(len(parts)):
        cand = ".".join([*parts[i:], leaf])
        if cand in base:
            return cand
    ends = [n for n in base.names() if n.endswith(f".{module}.{leaf}")]
    return ends[0] if len(ends) == 1 else None


def _scale(config: dict, module: str, rank: int) -> tuple[int, float]:
    r_key = pattern_key(config.get("rank_pattern") or {}, module)
    a_key = pattern_key(config.get("alpha_pattern") or {}, module)
    r = int((config.get("rank_pattern") or {}).get(r_key, config.get("r", rank)) if r_key else config.get("r", rank))
    alpha = float((config.get("alpha_pattern") or {})[a_key] if a_key else config.get("lora_alpha", r))
    s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, s


def _plan(base: Checkpoint, adapter: Adapter, weight: float, problems: list) -> tuple[dict, dict]:
    """-> ({base name: [LoraUpdate]}, {base name: replacing Stored})."""
    parts: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    for name in adapter.weights.names():
        if name.endswith(".lora_magnitude_vector"):
            parts.setdefault(_strip(name[: -len(".lora_magnitude_vector")]), {})["magnitude"] = name
            continue
        m = _LORA.match(name)
        if m is None:
            if "lora_" in name:
                problems.append(Problem(f"merge_lora: {adapter.path}: {name} is not a LoRA tensor this merge knows"))
            else:
                whole[name] = name
            continue
        module = _strip(m.group("module") or m.group("emodule"))
        part = m.group("part") or m.group("epart")
        parts.setdefault(module, {})[part] = name
    updates: dict[str, list[LoraUpdate]] = {}
    fan = bool(adapter.config.get("fan_in_fan_out"))
    for module, got in sorted(parts.items()):
        emb = "lora_embedding_A" in got or "lora_embedding_B" in got
        ka, kb = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        if ka not in got or kb not in got:
            problems.append(Problem(f"merge_lora: {adapter.path}: {module} has {', '.join(got)} but not both A and B"))
            continue
        target = _base_name(base, module, "weight")
        if target is None:
            problems.append(Problem(f"merge_lora: {adapter.path}: {module}.weight is not in the base", names=(module,)))
            continue
        a, b = lookup.entry(adapter.weights, got[ka]), lookup.entry(adapter.weights, got[kb])
        a_s = a if isinstance(a, Stored) else a.base
        b_s = b if isinstance(b, Stored) else b.base
        shape = tuple(lookup.shape_dtype(base, target)[0])
        rank = a.shape[0]
        r, s = _scale(adapter.config, module, rank)
        kind = "embedding" if emb else ("conv" if len(a.shape) == 4 else "linear")
        if emb:
            want = (shape[1], shape[0])
            ok = (
                len(a.shape) == 2
                and len(b.shape) == 2
                and (b.shape[0], a.shape[1]) == want
                and b.shape[1] == a.shape[0]
            )
        elif kind == "conv":
            ok = len(shape) == 4 and b.shape[0] == shape[0] and a.shape[1] == shape[1] and b.shape[1] == a.shape[0]
        else:
            out_in = (b.shape[0], a.shape[1])
            ok = len(a.shape) == 2 and len(b.shape) == 2 and b.shape[1] == a.shape[0]
            ok = ok and (shape == (out_in[1], out_in[0]) if fan else shape == out_in)
        if ok and r != rank:
            problems.append(
                Problem(
                    f"merge_lora: {adapter.path}: {module} has rank {rank} but the config says r={r}", names=(target,)
                )
            )
            continue
        if not ok:
            problems.append(
                Problem(
                    f"merge_lora: {adapter.path}: {module}'s update (A {list(a.shape)}, B {list(b.shape)}) "
                    f"does not fit {target} {list(shape)}",
                    names=(target,),
                )
            )
            continue
        magnitude = None
        if "magnitude" in got:
            mag = lookup.entry(adapter.weights, got["magnitude"])
            rows = shape[1] if fan else shape[0]
            if kind != "linear" or tuple(mag.shape) != (rows,):
                problems.append(
                    Problem(
                        f"merge_lora: {adapter.path}: {module} is a DoRA {kind} adapter; DoRA is merged for Linear "
                        f"layers only (magnitude {list(mag.shape)}, weight {list(shape)})",
                        names=(target,),
                    )
                )
                continue
            magnitude = mag if isinstance(mag, Stored) else mag.base
        update = LoraUpdate(a_s, b_s, s * weight, kind, fan and kind == "linear", magnitude)
        updates.setdefault(target, []).append(update)
    replaced: dict[str, Stored] = {}
    for name in whole:
        stripped = _strip(name).replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
        module, _, leaf = stripped.rpartition(".")
        target = _base_name(base, module, leaf) if module else (leaf if leaf in base else None)
        if target is None:
            problems.append(Problem(f"merge_lora: {adapter.path}: {stripped} (a module to save) is not in the base"))
            continue
        e = lookup.entry(adapter.weights, name)
        shape, dtype = lookup.shape_dtype(base, target)
        if tuple(e.shape) != tuple(shape):
            problems.append(
                Problem(
                    f"merge_lora: {adapter.path}: {stripped} {list(e.shape)} does not fit {target} {list(shape)}",
                    names=(target,),
                )
            )
            continue
        src = e if isinstance(e, Stored) else e.base
        replaced[target] = src if e.dtype == dtype else ComputedStored(target, src, _cast(dtype))
    return updates, replaced


def _cast(dtype: str):
    from ..transforms import Cast, Transform

    return Transform((Cast(dtype),))


def merge_lora(
    base: Checkpoint,
    adapters: Sequence[str | os.PathLike | Adapter | Checkpoint] | str | os.PathLike | Adapter | Checkpoint,
    weights: Sequence[float] | float | None = None,
    *,
    device="cpu",
) -> Checkpoint:
    """Fold LoRA adapters into ``base``, in order (lazy: nothing is read until written).

    Each targeted weight becomes W + sum_j weight_j * s_j * (B_j @ A_j), computed in
    float64 and rounded once to W's dtype; ``modules_to_save`` tensors replace the base's
    (a later adapter's replacement wins, and updates after it apply on top).

    Args:
        base: the base checkpoint.
        adapters: PEFT adapter folders (or their weights files).
        weights: one multiplier per adapter (default 1 each).
        device: where the updates are computed.

    Returns:
        A lazy :class:`~wsurgery.Checkpoint`.

    Raises:
        SurgeryError: every module the adapters target that the base lacks or that does
            not fit, listed at once; an adapter type other than LoRA.

    Example:
        >>> merged = base.merge_lora("my-lora/")  # doctest: +SKIP
    """
    if isinstance(adapters, (str, os.PathLike, Adapter, Checkpoint)):
        adapters = [adapters]
    if weights is None:
        ws = [1.0] * len(adapters)
    elif isinstance(weights, (int, float)):
        ws = [float(weights)]
    else:
        ws = [float(w) for w in weights]
    if len(ws) != len(adapters):
        raise UsageError(f"{len(ws)} weights for {len(adapters)} adapters: give one weight each", param="weights")
    if not adapters:
        raise UsageError("no adapter to merge", param="adapters")
    opened = [open_adapter(a) for a in adapters]
    problems: list[Problem | str] = []
    values: dict[str, Stored] = {}  # base name -> its current value (replaced or base)
    pending: dict[str, list[LoraUpdate]] = {}
    for ad, w in zip(opened, ws, strict=True):
        updates, replaced = _plan(base, ad, w, problems)
        for n, s in replaced.items():
            values[n] = s
            pending[n] = []
        for n, us in updates.items():
            pending.setdefault(n, []).extend(us)
    refuse(problems)
    stored = dict(base.stored)
    aliases = dict(base.aliases)
    ops: list[Op] = []
    for n in sorted(set(values) | set(pending), key=natural_key):
        start = values.get(n)
        if start is None:
            e = lookup.entry(base, n)
            start = (
                e
                if isinstance(e, Stored)
                else (e.base if e.transform.is_identity else ComputedStored(n, e.base, e.transform, device))
            )
        us = pending.get(n, [])
        value: Stored = (
            LoraStored(n, start, us, device=device) if us else start.renamed(n) if start.name != n else start
        )
        note = ""
        if n in aliases:
            del aliases[n]
            note = "a tied name: written as values of its own"
        stored[n] = value
        what = f"{len(us)} LoRA update{'s' if len(us) != 1 else ''}" if us else "replaced (modules_to_save)"
        ops.append(Op("merge_lora", n, n, value, replaces=True, note=(note or what)))
    # aliases of a changed stored tensor follow its new value
    new_aliases: dict[str, Derived] = {}
    for n, a in aliases.items():
        src = stored[a.source]
        new_aliases[n] = a if src is a.base else Derived.of(src, a.transform)
    files = list(dict.fromkeys([*base.input_files, *(f for ad in opened for f in ad.weights.input_files)]))
    ordered = {n: stored[n] for n in sorted(stored, key=natural_key)}
    return base.evolve(stored=ordered, aliases=new_aliases, input_files=files, changes=[*base.changes, *ops])
