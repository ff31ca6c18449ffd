"""wsurgery stack / unstack: per-layer tensors <-> one tensor with a layer axis."""

from __future__ import annotations

from typing import Annotated

from ._errors import command
from .common import CkptArg, DimOpt, NewOpt
from .options import OutputOptions, output_options
from .output import write_result
from .params import Opt


@command("stack")
@output_options()
def stack(
    ckpt: CkptArg,
    src: Annotated[str, Opt("--src", help="Template of the per-layer names: 'layers.{i}.fc1.weight' or 'layers.{i}'.")],
    dst: Annotated[str, Opt("--dst", help="The stacked tensor (or module prefix).", show_default=False)],
    dim: DimOpt = 0,
    new: NewOpt = False,
    *,
    out: OutputOptions,
) -> int:
    """Stack per-layer tensors into one with a layer axis.

    The tensors the template names (i = 0, 1, ...) go on a new axis --dim of DST; a template
    of module prefixes stacks every tensor under them. The sources are gone.

    Example: wsurgery stack model.safetensors --src 'layers.{i}.mlp.fc1.weight' --dst layers.mlp.fc1.weight
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        return write_result("stack", ckpt, c.stack(src, dst, dim, new=new), out)


@command("unstack")
@output_options()
def unstack(
    ckpt: CkptArg,
    src: Annotated[str, Opt("--src", help="The stacked tensor, or a module prefix.", show_default=False)],
    dst: Annotated[str, Opt("--dst", help="Template of the per-layer names: 'layers.{i}.fc1.weight'.")],
    dim: DimOpt = 0,
    new: NewOpt = False,
    *,
    out: OutputOptions,
) -> int:
    """Unstack a tensor with a layer axis into per-layer tensors.

    SRC's slices along --dim get the names the template gives (i = 0, 1, ...); SRC is gone.
    Turns Megatron-style stacked layers into per-layer tensors.

    Example: wsurgery unstack model.safetensors --src decoder.layers.fc1.weight --dst 'decoder.layers.{i}.fc1.weight'
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        return write_result("unstack", ckpt, c.unstack(src, dst, dim, new=new), out)
