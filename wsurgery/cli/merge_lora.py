"""wsurgery merge-lora: PEFT LoRA adapters folded into their base, as merge_and_unload does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from ._errors import command
from .common import CkptArg, DeviceOpt
from .merge import _weights, beside
from .options import OutputOptions, output_options
from .output import write_result
from .params import Arg, Opt

AdaptersArg = Annotated[
    list[Path],
    Arg(
        metavar="ADAPTER...",
        help="PEFT adapter folders (adapter_config.json and adapter_model.safetensors or .bin), merged in order.",
        readable=False,
        show_default=False,
    ),
]


@command("merge-lora")
@output_options()
def merge_lora(
    ckpt: CkptArg,
    adapters: AdaptersArg,
    weights: Annotated[
        Optional[str], Opt("--weights", "-w", metavar="W,...", help="One multiplier per ADAPTER (default 1).")
    ] = None,
    device: DeviceOpt = "cpu",
    *,
    out: OutputOptions,
) -> int:
    """Fold PEFT LoRA adapters into the base checkpoint CKPT: W + w * s * (B @ A) per targeted module.

    s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), per module from rank_pattern and alpha_pattern;
    fan_in_fan_out (GPT-2's Conv1D), Embedding and Conv2d adapters; modules_to_save replace the base's tensors.
    Computed in float64, rounded once to the base's dtype. A model folder in gives a model folder out that
    from_pretrained loads.

    Example: wsurgery merge-lora base-model/ my-lora/ -o merged/
    """
    from ..api import open as open_checkpoint
    from ..surgery.lora import merge_lora as fold

    with open_checkpoint(ckpt) as c:
        result = fold(c, [str(a) for a in adapters], _weights(weights), device=device)
        try:
            return write_result("merge-lora", beside(ckpt), result, out, extra={"adapters": [str(a) for a in adapters]})
        finally:
            result.close()
