"""wsurgery merge: checkpoints of one architecture merged tensor by tensor (mean, task
arithmetic, TIES, SLERP), streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from ._errors import command
from .common import DeviceOpt
from .options import OutputOptions, output_options
from .output import write_result
from .params import Arg, Opt

CkptsArg = Annotated[
    list[Path],
    Arg(
        metavar="CKPT CKPT...",
        help="The checkpoints to merge (any format wsurgery reads; formats may differ).",
        readable=False,
        show_default=False,
    ),
]


def beside(first: Path) -> Path:
    """Where the output goes by default: ``<name>.merged.safetensors`` beside a file input
    (its own ``.safetensors`` path would be the input itself); beside a folder as for every
    command."""
    p = Path(first)
    if p.is_dir() or p.name.endswith(".index.json"):
        return p
    return p.with_name(f"{p.name.split('.')[0]}.merged{p.suffix}")


def _weights(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    from ..errors import UsageError

    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights takes numbers separated by commas, got {text!r}", param="weights") from None


@command("merge")
@output_options()
def merge(
    ckpts: CkptsArg,
    method: Annotated[str, Opt("--method", "-m", help="mean, task-arithmetic, ties or slerp (mergekit's).")] = "mean",
    weights: Annotated[
        Optional[str], Opt("--weights", "-w", metavar="W,W,...", help="One weight per CKPT (default 1 each).")
    ] = None,
    base: Annotated[
        Optional[Path],
        Opt("--base", readable=False, help="The base checkpoint of task-arithmetic and ties.", show_default=False),
    ] = None,
    density: Annotated[
        Optional[float], Opt("--density", help="ties: the fraction of each task vector kept, in (0, 1].")
    ] = None,
    t: Annotated[Optional[float], Opt("--t", help="slerp: in [0, 1]; 0 gives the first CKPT (default 0.5).")] = None,
    only: Annotated[
        Optional[list[str]],
        Opt(
            "--only",
            metavar="SELECTOR",
            help="Merge only these tensors (exact name, module prefix or glob; repeatable); the rest is carried "
            "from the first CKPT.",
        ),
    ] = None,
    dtype: Annotated[
        Optional[str], Opt("--dtype", help="The output's floating dtype (default: the first CKPT's).")
    ] = None,
    device: DeviceOpt = "cpu",
    *,
    out: OutputOptions,
) -> int:
    """Merge checkpoints of one architecture, tensor by tensor, in float64 rounded once.

    mean: sum(w x) / sum(w). task-arithmetic: B + sum w (x - B). ties: each task vector x - B trimmed to its
    --density largest magnitudes, a sign elected per element, the agreeing ones averaged (mergekit's). slerp: two
    CKPTs interpolated along the angle between them. Names must match across CKPTs; ties every CKPT stores alike
    stay ties; non-floating tensors must be equal. The output defaults to the first CKPT's path with .safetensors.

    Example: wsurgery merge run/ckpt-8000.pt run/ckpt-9000.pt run/ckpt-10000.pt -o averaged.safetensors
    """
    from ..surgery.merge import merge as merge_checkpoints
    from ..surgery.merge import merge_spec

    w = _weights(weights)
    spec = merge_spec(len(ckpts), method=method, weights=w, has_base=base is not None, density=density, t=t)
    result = merge_checkpoints(
        list(ckpts), method=method, weights=w, base=base, density=density, t=t, only=only, dtype=dtype, device=device
    )
    try:
        extra = {"method": spec.method, "inputs": [str(c) for c in ckpts], "base": None if base is None else str(base)}
        return write_result("merge", beside(ckpts[0]), result, out, extra=extra)
    finally:
        result.close()
