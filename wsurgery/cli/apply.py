"""wsurgery apply: run a recipe (several surgery steps, checked whole) and write once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from ._errors import command
from .common import LateProgress, console, safe
from .options import OutputOptions, output_options
from .output import _target, report_write
from .params import Arg

RecipeArg = Annotated[
    Path,
    Arg(metavar="RECIPE", help="A recipe file: YAML (or JSON), schema wsurgery.recipe/1.", show_default=False),
]
CkptsArg = Annotated[
    Optional[list[Path]],
    Arg(
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
    from ..api import apply as run_recipe

    def beside_first_input(first: str | None) -> str:  # the default output of every command
        return _target(Path(first or recipe), out)

    bar = LateProgress("writing", enabled=not (out.json or out.quiet or out.dry_run))
    with bar:
        done = run_recipe(
            recipe,
            list(ckpts or []),
            None if out.output is None else _target(recipe, out),
            overwrite=out.force,
            dry_run=out.dry_run,
            sync=out.sync,
            max_shard_size=out.max_shard_size,
            progress=bar.advance,
            format=out.format,
            replace_input=out.in_place,
            default_out=beside_first_input,
        )
    info = {
        "recipe": str(recipe),
        "inputs": dict(done.inputs),
        "steps": done.steps,
        "expectations": done.expectations,
        "verified": done.verified,
    }
    target = done.output or beside_first_input(None)
    code = report_write("apply", target, done.checkpoint, done.saved, out, extra=info)
    if not (out.json or out.quiet):
        said = [_count(done.steps, "step"), _count(done.expectations, "expectation") + " held"]
        if done.verified:
            said.append(_count(done.verified, "tie") + " verified")
        console().print(f"recipe {safe(recipe)}: {', '.join(said)}", markup=False)
    return code
