"""The recipe steps ``merge`` and ``merge_lora`` (registered into the recipe's step table
by :func:`register`), checked whole when the recipe is loaded:

    - merge: {inputs: [a, b, c], method: ties, base: base, density: 0.5, weights: [1, 1, 2]}
    - merge_lora: {adapter: lora, weight: 1.0}

``inputs``, ``base`` and ``adapter`` name inputs of the recipe. The recipe's first input
stands for the checkpoint the steps so far made (so a ``rename`` before a merge applies
to it); ``inputs`` defaults to every input but the base. An adapter input is the adapter
folder (or its weights file, with ``adapter_config.json`` beside it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ..errors import UsageError
from ..model import Checkpoint


def _number(c, v):
    from .recipe_fields import _BAD

    if isinstance(v, bool) or not isinstance(v, (int, float)):
        c.bad("a number", v)
        return _BAD
    return float(v)


def _numbers(c, v):
    from .recipe_fields import _BAD

    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [float(v)]
    if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
        c.bad("a number or a list of numbers", v)
        return _BAD
    return [float(x) for x in v]


def _inputs_list(c, v):
    from .recipe_fields import _BAD, _input

    names = [v] if isinstance(v, str) else v
    if not isinstance(names, list) or not names:
        c.bad("a list of input names", v)
        return _BAD
    out = [_input(replace(c, path=c.path + (i,)), n) for i, n in enumerate(names)]
    return _BAD if any(o is _BAD for o in out) else out


def _merge_check(c, value):
    from .merge import merge_spec
    from .recipe_fields import _BAD, _Field, _float_dtype, _input, _mapping, _names, _text

    fields = {
        "inputs": _Field(_inputs_list),
        "method": _Field(_text, default="mean"),
        "weights": _Field(_numbers),
        "base": _Field(_input),
        "density": _Field(_number),
        "t": _Field(_number),
        "only": _Field(_names, default=[]),
        "dtype": _Field(_float_dtype),
    }
    args = _mapping(c, value, fields)
    if args is _BAD:
        return _BAD
    if args["inputs"] is None:
        args["inputs"] = [n for n in c.inputs if n != args["base"]]
    try:
        merge_spec(
            len(args["inputs"]),
            method=args["method"],
            weights=args["weights"],
            has_base=args["base"] is not None,
            density=args["density"],
            t=args["t"],
        )
    except UsageError as exc:
        return c.problem(str(exc))
    return args


def _merge_lora_check(c, value):
    from .recipe_fields import _BAD, _Field, _mapping

    args = _mapping(c, value, {"adapter": _Field(_inputs_list, True), "weight": _Field(_numbers)})
    if args is _BAD:
        return _BAD
    if args["weight"] is not None and len(args["weight"]) != len(args["adapter"]):
        return c.problem(f"{len(args['weight'])} weights for {len(args['adapter'])} adapters")
    return args


def _run_merge(ckpt: Checkpoint, a: dict, inputs: Mapping[str, Checkpoint]) -> Checkpoint:
    from .merge import merge

    a = a["names"]
    first = next(iter(inputs))
    ckpts = [ckpt if n == first else inputs[n] for n in a["inputs"]]
    base = None if a["base"] is None else (ckpt if a["base"] == first else inputs[a["base"]])
    return merge(
        ckpts,
        method=a["method"],
        weights=a["weights"],
        base=base,
        density=a["density"],
        t=a["t"],
        only=a["only"] or None,
        dtype=a["dtype"],
    )


def _run_merge_lora(ckpt: Checkpoint, a: dict, inputs: Mapping[str, Checkpoint]) -> Checkpoint:
    from .lora import merge_lora

    a = a["names"]
    return merge_lora(ckpt, [inputs[n] for n in a["adapter"]], a["weight"])


def register(steps: dict[str, Any], run: dict[str, Callable]) -> None:
    """Add ``merge`` and ``merge_lora`` to a recipe's step checks and runners. A step
    whose check is a callable receives its whole value (the recipe stores the checked
    mapping under ``names``)."""
    steps["merge"] = _merge_check
    steps["merge_lora"] = _merge_lora_check
    run["merge"] = _run_merge
    run["merge_lora"] = _run_merge_lora
