"""Where tensors are computed: a device name checked once, before any work."""

from __future__ import annotations

from .errors import UsageError


def check_device(device) -> str:
    """Validate a device string (``cpu``, ``cuda``, ``cuda:1``, ...) before any work.

    Raises:
        UsageError: (``param="device"``) an unknown device, or one not available here.
    """
    text = str(device)
    if text == "cpu":
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {text!r}", param="device", hint="use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {text!r} asked for, but CUDA is not available here", param="device", hint="use cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {text!r} asked for, but there are only {torch.cuda.device_count()} CUDA devices",
                param="device",
                hint="use cuda:0 .. cuda:N-1",
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {text!r} asked for, but MPS is not available here", param="device", hint="use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {text!r} is not supported for surgery", param="device", hint="use cpu or cuda")
    return text
