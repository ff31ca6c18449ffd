"""wsurgery drop: remove tensors by name, module prefix or glob."""

from __future__ import annotations

from ._errors import command
from .common import CkptArg, NamesArg
from .options import OutputOptions, output_options
from .output import write_result


@command("drop")
@output_options()
def drop(ckpt: CkptArg, names: NamesArg, *, out: OutputOptions) -> int:
    """Remove tensors by name, module prefix or glob.

    A source that a remaining alias uses cannot be dropped.

    Example: wsurgery drop model.pt 'optimizer.*' '*._extra_state' -o weights.safetensors
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        return write_result("drop", ckpt, c.drop(names), out)
