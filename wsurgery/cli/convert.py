"""wsurgery convert: any readable checkpoint to safetensors or a torch file, keeping its ties."""

from __future__ import annotations

from ._errors import command
from .common import CkptArg
from .options import OutputOptions, output_options
from .output import write_result


@command("convert")
@output_options(dry_run=False)
def convert(ckpt: CkptArg, *, out: OutputOptions) -> int:
    """Convert a checkpoint to safetensors (shared storage recorded as aliases) or, with -o x.pt or
    --format torch, to a torch.save file (aliases as shared storage), or with --format dcp to a
    torch.distributed.checkpoint folder (aliases written as values).

    With --max-shard-size, OUT is a folder of model-0000K-of-0000N.safetensors shards and a
    model.safetensors.index.json, in the Hugging Face layout. From a model folder, an OUT without a
    weights suffix is a folder too, with the input's config and tokenizer files.

    Example: wsurgery convert model.pt -o model.safetensors
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        return write_result("convert", ckpt, c, out)
