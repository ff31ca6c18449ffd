"""The library's front door, in safetensors' idiom."""

from __future__ import annotations

import os

from .checkpoint import Checkpoint, from_tensors
from .checkpoint import load as _load


def load(path) -> Checkpoint:
    """Open a checkpoint lazily: names, dtypes, shapes, aliases and metadata, no tensor data.

    Reads safetensors (one file, or a sharded index or its folder) and torch.save files
    (never executing pickled code). The format comes from the file's first bytes.
    """
    return _load(path)


def load_state_dict(path, device="cpu") -> dict:
    """Read every tensor into a plain dict; each alias is a view of its source."""
    ckpt = _load(path)
    try:
        return ckpt.state_dict(device)
    finally:
        ckpt.close()


def save_state_dict(
    state_dict: dict, path, metadata: dict[str, str] | None = None, *, aliases=None, sync: bool = True
) -> None:
    """Write a state dict to safetensors, storing each shared tensor once.

    Tensors that share storage are recorded as ties (same view, or a 2-D transpose);
    ``aliases`` adds explicit ones as ``{alias: (source, [transform steps])}``. The write
    is atomic: on error nothing is left at ``path``. ``sync=False`` skips the fsyncs:
    faster and still atomic if the process dies, but an operating-system crash or power
    loss soon after may leave the file empty or partial.
    """
    ckpt = from_tensors(dict(state_dict), explicit=aliases)
    if metadata:
        ckpt.metadata = dict(metadata)
    ckpt.save(os.fspath(path), sync=sync)


def diff(a, b, **kwargs):
    """Compare two checkpoints (paths or loaded) tensor by tensor; see ``wsurgery.compare``."""
    from .compare import diff as _diff

    return _diff(a, b, **kwargs)


def check(*args, **kwargs):
    """Assert ``transform(src) == dst``; see ``wsurgery.compare``."""
    from .compare import check as _check

    return _check(*args, **kwargs)
