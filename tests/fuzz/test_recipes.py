"""Bounded property tests over hostile recipes (the targets of ``fuzz/recipes.py``): YAML
structure, rename patterns (backtracking-prone ones too), integers of any length and
renames that grow names. Same contract as ``tests/fuzz/test_formats.py``: planned, or one wsurgery
error of one line. ``make fuzz`` runs them for minutes."""

from __future__ import annotations

from hypothesis import given, settings

from fuzz.recipes import TARGETS, recipe_integers, recipe_renames
from tests.fuzz.test_formats import PROFILE, TRIED


def _property(name: str):
    strategy, target = TARGETS[name]
    return settings(settings.get_profile(PROFILE))(given(strategy)(target))


test_recipe_yaml = _property("recipe_yaml")
test_recipe_renames = _property("recipe_renames")
test_recipe_integers = _property("recipe_integers")


def test_the_known_bombs_are_refused_not_crashes():
    before = dict(TRIED)
    recipe_renames(([("^(.*)$", r"\1\1")], 40))  # names that double 40 times
    recipe_renames(([("^(a+)+$", "x")], 1))  # backtracking on a name of 40 a's
    recipe_integers((5000, "0x{h}", "version: {n}\nsteps: []\n"))
    assert TRIED["refused"] - before["refused"] == 3
