"""Recipes, schema ``wsurgery.recipe/1``: named inputs, ordered surgery steps and
expectations in one YAML (or JSON) file, run as one plan and written in one pass.

A recipe goes through three stages; each reports every problem it finds at once:

1. :func:`load` (:mod:`.recipe_schema`) reads and validates the whole recipe before any
   checkpoint is opened.
2. :func:`plan` runs the steps in order on the lazy first input. Each step is the
   ``Checkpoint`` method of the same name, so nothing is read. A step that is refused is
   skipped and the steps after it are still checked, against the names as they are
   without it, so one run reports every problem (each with its step number and line).
   Then the expectations are checked (names, shapes, dtypes and aliases: no data), then
   ties with ``verify`` compare their values, the only data read before the write.
3. The caller writes the result once (``Checkpoint.save``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..errors import InputError, Problem, SurgeryError, UnknownNameError, UsageError
from ..io.options import SaveResult
from ..model import Checkpoint
from .recipe_schema import KINDS as KINDS
from .recipe_schema import SCHEMA, Expectation, Recipe, Step, load
from .recipe_yaml import MAX_BYTES as MAX_BYTES
from .recipe_yaml import PathLike

# --- inputs -----------------------------------------------------------------------------

Input = PathLike | Checkpoint


def resolve_inputs(
    recipe: Recipe, given: Sequence[Input] | Mapping[str, Input] | Input | None = None
) -> dict[str, Input]:
    """Input name -> path or checkpoint: the recipe's, with ``given`` in their place.

    ``given`` replaces the recipe's inputs in order (a list), or by name (a mapping). A
    recipe that declares no inputs takes exactly one, named ``input``.

    Raises:
        UsageError: more inputs than the recipe has, an unknown name, or an input left
            without a path.
    """
    names = list(recipe.inputs) or ["input"]
    out: dict[str, Input | None] = {n: recipe.inputs.get(n) for n in names}
    if given is None:
        given = []
    elif isinstance(given, (str, os.PathLike, Checkpoint)):
        given = [given]
    if isinstance(given, Mapping):
        unknown = [k for k in given if k not in out]
        if unknown:
            raise UsageError(
                f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not an input of the recipe "
                f"(its inputs are {', '.join(names)})",
                param="inputs",
            )
        out.update(given)
    else:
        given = list(given)
        if len(given) > len(names):
            raise UsageError(
                f"{len(given)} inputs given, but the recipe has {len(names)} ({', '.join(names)})",
                param="inputs",
                hint="give at most one checkpoint per input of the recipe, in its order",
            )
        out.update(zip(names[: len(given)], given, strict=True))
    missing = [n for n, v in out.items() if v is None]
    if missing and not recipe.inputs:
        raise UsageError("the recipe names no inputs: give it the checkpoint to work on", param="inputs")
    if missing:
        raise UsageError(
            f"no checkpoint for the input{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
            "the recipe gives no path",
            param="inputs",
            hint="give a checkpoint for each, in the order of the recipe's inputs",
        )
    return out  # type: ignore[return-value]


def _label(value: Input) -> str | None:
    return value.path if isinstance(value, Checkpoint) else os.fspath(value)


# --- planning ---------------------------------------------------------------------------


def _recipe_problem(p: Problem, where: str, number: int | None = None) -> Problem:
    """A verb's problem, located in the recipe, its fix said in recipe words."""
    text = p.message
    if p.new_name:
        text += " (add 'new: true' to the step if the name is meant to be new)"
    elif p.suggest:
        text += f" (try 'transform: {' -> '.join(p.suggest)}')"
    elif p.use == "untie":
        text += " (add an untie step before it)"
    elif p.use:
        text += f" (use a {p.use} step instead)"
    return Problem(f"{where}: {text}", names=p.names, step=number)


def _step_problems(step: Step, exc: Exception) -> list[Problem]:
    """A refused step's problems, each located in the recipe."""
    if isinstance(exc, SurgeryError) and exc.problems:
        return [_recipe_problem(p, step.where, step.number) for p in exc.problems]
    if isinstance(exc, UnknownNameError):
        return [Problem(f"{step.where}: {exc}", names=(exc.name,), candidates=tuple(exc.candidates), step=step.number)]
    text = f"{exc} ({exc.hint})" if isinstance(exc, UsageError) and exc.hint else str(exc)
    return [Problem(f"{step.where}: {text}", step=step.number)]


def plan(recipe: Recipe, inputs: Mapping[str, Checkpoint]) -> Checkpoint:
    """Run ``recipe``'s steps on the first of ``inputs`` (lazily), check its expectations,
    then verify the ties that ask for it (which reads their values).

    A refused step is skipped, and the steps after it run on the names as they are
    without it, so every refused step is reported at once. The expectations are checked
    only when every step ran (on a partial result they would mislead).

    Args:
        recipe: a validated :class:`Recipe`.
        inputs: input name -> opened checkpoint, in the recipe's order.

    Returns:
        The resulting lazy :class:`~wsurgery.Checkpoint`, not yet written.

    Raises:
        SurgeryError: every problem of every refused step (with its step number and
            line), else every failed expectation, else every tie whose values differ;
            ``problems`` carries them all.
    """
    from .ties import verify_ties

    ckpt = next(iter(inputs.values()))
    to_verify: list[tuple[Step, Checkpoint]] = []
    problems: list[Problem] = []
    for step in recipe.steps:
        before = ckpt
        try:
            ckpt = step.run(ckpt, inputs)
        except (SurgeryError, InputError, UsageError) as exc:
            problems += _step_problems(step, exc)
            continue
        if step.verify is not None:
            to_verify.append((step, before))
    if problems:
        hint = "nothing was written" + ("" if not recipe.expect else "; the expectations were not checked")
        raise SurgeryError(problems=_distinct(problems), hint=hint)
    problems = [Problem(f"{e.where}: {text}") for e in recipe.expect for text in e.failures(ckpt)]
    if problems:
        raise SurgeryError(problems=problems, hint="nothing was written")
    for step, before in to_verify:
        a = step.args
        try:
            verify_ties(before, a["src"], a["dst"], a["transform"], **(step.verify or {}))
        except SurgeryError as exc:
            problems += [_recipe_problem(p, step.where, step.number) for p in exc.problems or [Problem(str(exc))]]
    if problems:
        raise SurgeryError(problems=problems, hint="nothing was written")
    files = [f for c in inputs.values() for f in c.input_files]
    return replace(ckpt, input_files=list(dict.fromkeys([*ckpt.input_files, *files])))


def _distinct(problems: Sequence[Problem]) -> list[Problem]:
    """Each problem once, in order."""
    return list({p.message: p for p in problems}.values())


@dataclass
class Prepared:
    """A recipe planned over its opened inputs: the result, lazy, ready for one write.
    A context manager: closing it closes the inputs it opened.

    Attributes:
        recipe: the validated recipe.
        inputs: input name -> the checkpoint, opened.
        paths: input name -> its path (None for a checkpoint built in memory).
        result: the planned checkpoint (its ``changes`` list every step's operations).
    """

    recipe: Recipe
    inputs: dict[str, Checkpoint]
    paths: dict[str, str | None]
    result: Checkpoint
    owned: list[Checkpoint] = field(default_factory=list)

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for c in self.owned:
            c.close()

    def describe(self) -> dict:
        """The recipe's part of a report: its file, inputs, and what was checked."""
        return {
            "recipe": self.recipe.path,
            "inputs": dict(self.paths),
            "steps": len(self.recipe.steps),
            "expectations": len(self.recipe.expect),
            "verified": sum(1 for s in self.recipe.steps if s.verify is not None),
        }


def prepare(
    recipe: Recipe | Mapping | PathLike, inputs: Sequence[Input] | Mapping[str, Input] | Input | None = None
) -> Prepared:
    """:func:`load` the recipe, open its inputs (``inputs`` in place of the recipe's, see
    :func:`resolve_inputs`) and :func:`plan` it. Inputs given as checkpoints are used as
    they are and left open; those opened here are closed by :meth:`Prepared.close`."""
    from ..io.registry import open as open_checkpoint

    rec = load(recipe)
    resolved = resolve_inputs(rec, inputs)
    opened: dict[str, Checkpoint] = {}
    owned: list[Checkpoint] = []
    try:
        for name, value in resolved.items():
            if isinstance(value, Checkpoint):
                opened[name] = value
            else:
                opened[name] = open_checkpoint(value)
                owned.append(opened[name])
        result = plan(rec, opened)
    except BaseException:
        for c in owned:
            c.close()
        raise
    paths = {n: _label(v) for n, v in resolved.items()}
    return Prepared(rec, opened, paths, result, owned)


@dataclass(frozen=True)
class ApplyResult:
    """What :func:`wsurgery.apply` did.

    Attributes:
        checkpoint: the resulting lazy checkpoint (its ``changes`` are the plan; reading
            its tensors reopens the input files).
        saved: what was written, or None for a dry run.
        output: where it was (or would be) written; None for a dry run without one.
        inputs: input name -> path.
        steps: how many steps ran.
        expectations: how many expectations were checked (all held).
        verified: how many ties verified their values.
    """

    checkpoint: Checkpoint
    saved: SaveResult | None
    output: str | None
    inputs: dict[str, str | None]
    steps: int
    expectations: int
    verified: int


__all__ = [
    "KINDS",
    "SCHEMA",
    "ApplyResult",
    "Expectation",
    "Prepared",
    "Recipe",
    "Step",
    "load",
    "plan",
    "prepare",
    "resolve_inputs",
]
