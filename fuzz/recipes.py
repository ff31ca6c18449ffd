"""Fuzz targets for recipes: YAML structure, rename patterns, integers of any length and
renames that grow names, each run as a dry run over a small checkpoint.

The contract is that of ``tests/fuzz/test_formats.py``: a recipe is planned, or refused with one
wsurgery error of one line; any other exception, a hang (the watchdog) or a MemoryError
(the campaign's address-space limit) is a finding. ``tests/fuzz/test_recipes.py`` runs the
targets bounded; ``fuzz/campaign.py`` runs them for minutes.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from safetensors.torch import save_file

import wsurgery
from tests.fuzz.test_formats import TRIED, watchdog, workdir
from wsurgery.errors import WsurgeryError
from wsurgery.surgery import recipe as recipes

_NAMES = ["model.embed.weight", "model.layers.0.w", "model.layers.1.w", "model.layers.0.b", "head.weight"]
_NAMES += ["a" * 40 + "!"]  # backtracking bait for (a+)+$


def _checkpoint() -> wsurgery.Checkpoint:
    path = workdir() / "recipe-seed.safetensors"
    if not path.exists():
        sd = {n: torch.full((2, 3) if n.endswith("w") or n.endswith("weight") else (3,), float(i))
              for i, n in enumerate(_NAMES)}  # fmt: skip
        save_file(sd, path)
    return wsurgery.open(path)


def _run(recipe) -> str:
    """Load ``recipe`` and plan it on the seed checkpoint: 'loaded' or 'refused'."""
    TRIED["inputs"] += 1
    try:
        with watchdog(), _checkpoint() as ckpt:
            rec = recipes.load(recipe)
            recipes.plan(rec, {"input": ckpt})
    except WsurgeryError as exc:
        assert "\n" not in str(exc), repr(str(exc))
        TRIED["refused"] += 1
        return "refused"
    TRIED["loaded"] += 1
    return "loaded"


# --- YAML structure ------------------------------------------------------------------------------

_SCALARS = st.sampled_from(
    [
        "a",
        "'x'",
        "1",
        "-1",
        "0x1f",
        "0o17",
        "1_000",
        "59:59",
        "1.5e3",
        ".inf",
        "null",
        "true",
        "~",
        "''",
        "{i}",
        "'layers.{i}.w'",
        "model",
        "model.layers",
        "'*'",
        "!!str 3",
        "!!int 3",
        "!!binary aGk=",
        "!!set {a}",
        "2001-12-14",
        "<<",
        "&a x",
        "*a",
        "!!python/name:os.system",
        "? a",
    ]  # fmt: skip
)


def _flow_mapping(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def _yaml_value(depth: int = 3):
    if depth == 0:
        return _SCALARS
    inner = _yaml_value(depth - 1)
    return st.one_of(
        _SCALARS,
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(_SCALARS, inner, max_size=3).map(
            lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"
        ),
        st.tuples(st.sampled_from(["&a ", "&b ", ""]), inner).map("".join),
    )


_KINDS = ["rename", "drop", "keep", "cast", "copy", "tie", "untie", "concat", "split", "stack", "unstack", "frob"]

yaml_recipes = st.tuples(
    st.sampled_from(["version: 1\n", "version: 2\n", "", "version: [1]\n", "version: *a\n"]),
    st.lists(st.tuples(st.sampled_from(_KINDS), _yaml_value()), max_size=6),
    st.lists(_yaml_value(1), max_size=2),
    st.sampled_from(["", "output: {path: o.safetensors}\n", "output: {path: ../x}\n", "inputs: {a: null}\n"]),
).map(
    lambda t: (
        t[0]
        + t[3]
        + "steps:\n"
        + "".join(f"  - {k}: {v}\n" for k, v in t[1])
        + ("expect:\n" + "".join(f"  - {e}\n" for e in t[2]) if t[2] else "")
    )
)


def recipe_yaml(text: str) -> None:
    _run(text)


# --- rename patterns and names that grow -------------------------------------------------------

_ATOMS = [
    "a",
    ".",
    r"\.",
    "[a-z]",
    r"\d",
    "(a+)",
    "(.*)",
    "(?P<n>a)",
    "^",
    "$",
    "(a|aa)",
    r"\w",
    "(?=a)",
    r"\1",
    "(?i)",
]
patterns = st.lists(st.sampled_from(_ATOMS + ["+", "*", "?", "{2,}", "{1000}"]), min_size=1, max_size=8).map("".join)
replacements = st.lists(st.sampled_from(["", "x", r"\1", r"\g<0>", r"\g<n>", r"\2", r"\\", r"\n", "{i}", r"\q"]),
                        max_size=4).map("".join)  # fmt: skip


def recipe_renames(case: tuple[list[tuple[str, str]], int]) -> None:
    steps, repeat = case
    body = "".join(f"  - rename: {{pattern: {_quote(p)}, to: {_quote(r)}}}\n" for p, r in steps for _ in range(repeat))
    _run("version: 1\nsteps:\n" + body)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- integers of any length ------------------------------------------------------------------------

_INT_FORMS = st.sampled_from(["{d}", "-{d}", "0x{h}", "0o{o}", "0b{b}", "{d}_{d}", "{s}", "+{d}", "{d}.5", "{d}e{d}"])


def _integer(n_digits: int, form: str) -> str:
    return form.format(d="9" * n_digits, h="f" * n_digits, o="7" * n_digits, b="1" * n_digits,
                       s=":".join(["59"] * max(1, n_digits // 2)))  # fmt: skip


integers = st.tuples(
    st.sampled_from([1, 3, 90, 101, 4301, 5000, 20000]),
    _INT_FORMS,
    st.sampled_from(
        [
            "version: {n}\nsteps: []\n",
            "version: 1\nsteps:\n  - stack: {{src: 'model.layers.{{i}}.w', dst: s, dim: {n}}}\n",
            "version: 1\nsteps:\n  - split: {{src: head.weight, dsts: [x, y], dim: 0, sizes: [{n}, 1]}}\n",
            "version: 1\nsteps: []\nexpect:\n  - {{name: head.weight, count: {n}}}\n",
            "version: 1\nsteps:\n  - copy: {{src: head.weight, dst: x, transform: 'slice(0,0,{n})', new: true}}\n",
        ]
    ),  # fmt: skip
)


def recipe_integers(case: tuple[int, str, str]) -> None:
    n_digits, form, template = case
    _run(template.format(n=_integer(n_digits, form)))


# name -> (strategy of one input, target), as tests/fuzz/test_formats.py's TARGETS
TARGETS = {
    "recipe_yaml": (yaml_recipes, recipe_yaml),
    "recipe_renames": (
        st.tuples(st.lists(st.tuples(patterns, replacements), min_size=1, max_size=3), st.sampled_from([1, 2, 12, 40])),
        recipe_renames,
    ),
    "recipe_integers": (integers, recipe_integers),
}
