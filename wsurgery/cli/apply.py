"""wsurgery apply: run a recipe (several surgery steps, checked whole) and write once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._errors import command
from .common import console, safe
from .options import OutputOptions, output_options
from .output import write_result

RecipeArg = Annotated[
    Path,
    typer.Argument(
        metavar="RECIPE", help="A recipe file: YAML (or JSON), schema wsurgery.recipe/1.", show_default=False
    ),
]
CkptsArg = Annotated[
    Optional[list[Path]],
    typer.Argument(
        metavar="[CKPT...]",
        help="Checkpoints in place of the recipe's inputs, in the recipe's order (the first is the one the steps "
        "change).",
        show_default=False,
    ),
]


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@command("apply")
@output_options()
def apply(recipe: RecipeArg, ckpts: CkptsArg = None, *, out: OutputOptions) -> int:
    """Run a recipe: surgery steps in order on its first input, its expectations checked, one write.

    The whole recipe is checked before anything is read (every problem at once, with its
    step number and line), then planned on the lazy checkpoint; a refused step or a failed
    expectation writes nothing (exit 4). -o and --max-shard-size take the place of the
    recipe's output.

    Example: wsurgery apply examples/recipes/ddp_to_plain.yaml train.pt -o model.safetensors
    """
    from ..surgery import recipe as recipes

    rec = recipes.load(recipe)
    with recipes.prepare(rec, list(ckpts or [])) as run:
        first = Path(next(iter(run.paths.values())) or recipe)
        options = dataclasses.replace(
            out,
            output=out.output if out.output is not None else (None if rec.output is None else Path(rec.output)),
            max_shard_size=out.max_shard_size if out.max_shard_size is not None else rec.max_shard_size,
        )
        info = run.describe()
        code = write_result("apply", first, run.result, options, extra=info)
        if not out.json:
            said = [_count(info["steps"], "step"), _count(info["expectations"], "expectation") + " held"]
            if info["verified"]:
                said.append(_count(info["verified"], "tie") + " verified")
            console().print(f"recipe {safe(recipe)}: {', '.join(said)}", markup=False)
        return code
