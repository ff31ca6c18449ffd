"""wsurgery convert: any readable checkpoint to safetensors, keeping its ties."""

from __future__ import annotations

from ._errors import command
from .common import CkptArg, ForceOpt, InPlaceOpt, JsonOpt, MaxShardOpt, NoSyncOpt, OutOpt
from .output import finish


@command("convert")
def convert(
    ckpt: CkptArg,
    output: OutOpt = None,
    force: ForceOpt = False,
    in_place: InPlaceOpt = False,
    max_shard_size: MaxShardOpt = None,
    no_sync: NoSyncOpt = False,
    json_out: JsonOpt = False,
) -> int:
    """Convert a checkpoint to safetensors; shared storage is recorded as aliases.

    With --max-shard-size, OUT is a folder of model-0000K-of-0000N.safetensors shards and a
    model.safetensors.index.json, in the Hugging Face layout.

    Example: wsurgery convert model.pt -o model.safetensors
    """
    from ..checkpoint import load, natural_key

    c = load(ckpt)
    try:
        summary = {
            "stored": len(c.stored),
            "aliases": [{"name": n, **c.aliases[n].record()} for n in sorted(c.aliases, key=natural_key)],
            "copied": [],
        }
        return finish(
            "convert",
            ckpt,
            c,
            summary,
            out=output,
            force=force,
            in_place=in_place,
            dry_run=False,
            json_out=json_out,
            max_shard_size=max_shard_size,
            sync=not no_sync,
        )
    finally:
        c.close()
