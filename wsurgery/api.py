"""The library's front door, in safetensors' idiom: ``open`` / ``load`` a checkpoint lazily,
``load_state_dict`` / ``save_state_dict`` for plain dicts of tensors, ``convert`` a file,
``diff`` / ``check`` to compare."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint, SaveResult
from .readers import from_tensors
from .readers import load as _load

if TYPE_CHECKING:
    import torch

    from .compare import CheckReport, DiffReport, Tuning
    from .surgery.recipe import ApplyResult

PathLike = str | os.PathLike


def open(path: PathLike) -> Checkpoint:  # noqa: A001 - the safe_open idiom
    """Open a checkpoint lazily: names, dtypes, shapes, aliases and metadata, no tensor data.

    Reads safetensors (one file, or a sharded index or its folder) and torch.save files
    (never executing pickled code), and distributed checkpoints: DCP folders, DCP's
    safetensors shards, Megatron-Core / NeMo 2 ``torch_dist`` folders, NeMo 1 ``.nemo``
    archives. The format comes from the file's first bytes (a folder's from its
    structure). Use it as a context manager, so its files are released at the end.

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json`` or the folder
            holding one, a torch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), a DCP,
            Megatron or NeMo 2 checkpoint folder, a ``.nemo`` archive, or one rank of a
            model-parallel ``.nemo`` (``model.nemo/mp_rank_01``).

    Returns:
        A lazy :class:`~wsurgery.Checkpoint`.

    Raises:
        InputError: the file is missing, unreadable, malformed or unsafe.

    Example:
        >>> with wsurgery.open("model.safetensors") as ckpt:  # doctest: +SKIP
        ...     ckpt.keys()
        ...     w = ckpt.get_tensor("embedding.weight")
    """
    return _load(path)


def load(path: PathLike) -> Checkpoint:
    """The same as :func:`open` (safetensors' name for it)."""
    return _load(path)


def load_state_dict(path: PathLike, device: str = "cpu") -> dict[str, Any]:
    """Read every tensor of a checkpoint into a plain dict.

    Args:
        path: any checkpoint :func:`open` reads.
        device: where the tensors go (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Returns:
        ``{name: torch.Tensor}`` in natural name order; each alias is a view of its
        source, so ties share memory as they did when saved.

    Example:
        >>> sd = wsurgery.load_state_dict("tied.safetensors")  # doctest: +SKIP
        >>> sd["lm_head.weight"].data_ptr() == sd["embed.weight"].data_ptr()
        True
    """
    with _load(path) as ckpt:
        return ckpt.state_dict(device)


def save_state_dict(
    state_dict: Mapping[str, Any],
    path: PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    aliases: Mapping[str, tuple[str, Sequence[str]]] | None = None,
    sync: bool = True,
) -> SaveResult:
    """Write a state dict to safetensors, storing each shared tensor once.

    Like ``safetensors.torch.save_file``, an existing file at ``path`` is replaced (the
    write is atomic: on error nothing is left at ``path`` and the old file stays whole).

    Args:
        state_dict: ``{name: torch.Tensor}``; tensors that share storage are recorded as
            ties (the same view, or a 2-D transpose).
        path: the output file.
        metadata: extra string metadata to store.
        aliases: explicit ties, ``{alias: (source, [view steps])}``.
        sync: fsync before the rename (durable after a power loss); ``False`` is faster.

    Returns:
        A :class:`~wsurgery.checkpoint.SaveResult`.

    Example:
        >>> wsurgery.save_state_dict(model.state_dict(), "model.safetensors")  # doctest: +SKIP
    """
    ckpt = from_tensors(dict(state_dict), explicit=dict(aliases) if aliases else None)
    if metadata:
        ckpt.metadata = dict(metadata)
    return ckpt.save(path, overwrite=True, sync=sync)


def convert(
    src: PathLike,
    out: PathLike,
    *,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    sync: bool = True,
    progress: Callable[[int], None] | None = None,
    format: str | None = None,  # noqa: A002 - safetensors' and torch's word
) -> SaveResult:
    """Convert any readable checkpoint to safetensors or a torch file, keeping its ties.

    Shared storage in a torch file becomes alias records in safetensors, and alias
    records become shared storage in a torch file; tensors are streamed one at a time,
    untouched bytes copied as they are.

    Args:
        src: any checkpoint :func:`open` reads.
        out: the output file, or a folder (with ``max_shard_size``, or when ``src`` is a
            model folder and ``out`` has no weights suffix): see :meth:`Checkpoint.save`.
        overwrite: replace an existing output; without it an existing one is an error.
        max_shard_size: bytes per shard (an int, or ``"5GB"``, ``"500MiB"``).
        sync: fsync before the rename; ``False`` is faster and still atomic.
        progress: called with the byte count of each piece written.
        format: ``"safetensors"``, ``"torch"`` or ``"dcp"`` (a folder that
            ``torch.distributed.checkpoint.load`` reads, aliases written as values); by
            default from ``out``'s suffix (``.pt``, ``.pth``, ``.bin``, ``.ckpt``: torch).

    Returns:
        A :class:`~wsurgery.checkpoint.SaveResult`.

    Example:
        >>> wsurgery.convert("pytorch_model.bin", "model.safetensors")  # doctest: +SKIP
        >>> wsurgery.convert("model.safetensors", "model.pt")  # doctest: +SKIP
    """
    with _load(src) as ckpt:
        return ckpt.save(
            out, overwrite=overwrite, max_shard_size=max_shard_size, sync=sync, progress=progress, format=format
        )


def apply(
    recipe: PathLike | Mapping[str, Any],
    inputs: Sequence[PathLike | Checkpoint] | Mapping[str, PathLike | Checkpoint] | None = None,
    out: PathLike | None = None,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    sync: bool = True,
    max_shard_size: int | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ApplyResult:
    """Run a recipe (schema ``wsurgery.recipe/1``): its steps in order on its first input,
    its expectations checked, the result written in one pass.

    The whole recipe is validated before any checkpoint is opened, and planned on the
    lazy checkpoint before anything is read or written: every problem is reported at once,
    with its step number and the recipe's line. Only ties with ``verify`` read tensor
    data before the write.

    Args:
        recipe: a YAML or JSON file, YAML text (a string holding a newline), or a dict.
            Relative paths in a file are relative to its folder.
        inputs: checkpoints (paths or opened :class:`~wsurgery.Checkpoint` objects) in
            place of the recipe's inputs: a list replaces them in order, a mapping by
            name. Checkpoints passed in are left open.
        out: the output, in place of the recipe's ``output.path``.
        overwrite: replace an existing output (never an input).
        dry_run: plan and check everything, write nothing.
        sync: fsync the output before renaming it into place; ``False`` is faster.
        max_shard_size: a folder of shards (``"5GB"``), in place of the recipe's.
        progress: called with the byte count of each piece written.

    Returns:
        An ``ApplyResult``: ``checkpoint`` (the lazy result; its ``changes`` are the plan),
        ``saved`` (a :class:`~wsurgery.checkpoint.SaveResult`, None for a dry run),
        ``output``, ``inputs``, ``steps``, ``expectations``, ``verified``.

    Raises:
        InputError: the recipe or an input is missing, unreadable or malformed.
        SurgeryError: every problem of the recipe, a refused step, failed expectations,
            ties whose values differ; nothing is written.
        UsageError: inputs that do not fit the recipe's, or nowhere to write.
        OutputError: the output exists, is an input, or cannot be written.

    Example:
        >>> recipe = {"version": 1, "steps": [{"rename": {"pattern": "^module[.]", "to": ""}}]}
        >>> wsurgery.apply(recipe, ["ddp.pt"], "model.safetensors").saved.stored  # doctest: +SKIP
        14
    """
    from .errors import UsageError
    from .surgery import recipe as recipes

    rec = recipes.load(recipe)
    target = os.fspath(out) if out is not None else rec.output
    if target is None and not dry_run:
        raise UsageError("nowhere to write: the recipe has no output path and no out was given", param="out")
    shard_size = max_shard_size if max_shard_size is not None else rec.max_shard_size
    with recipes.prepare(rec, inputs) as run:
        saved = None
        if not dry_run:
            saved = run.result.save(
                target, overwrite=overwrite, max_shard_size=shard_size, sync=sync, progress=progress
            )
        info = run.describe()
        return recipes.ApplyResult(
            run.result, saved, target, info["inputs"], info["steps"], info["expectations"], info["verified"]
        )


def diff(
    a: Checkpoint | Mapping[str, Any] | torch.nn.Module | PathLike,
    b: Checkpoint | Mapping[str, Any] | torch.nn.Module | PathLike,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    max_rel_l2: float | None = None,
    min_cosine: float | None = None,
    ignore_ties: bool = False,
    by_module: int | str | None = None,
    device: str | None = None,
    filter: str | None = None,  # noqa: A002 - a glob on names
    progress: Callable[[int, int], None] | None = None,
    tuning: Tuning | None = None,
) -> DiffReport:
    """Compare two checkpoints tensor by tensor, streaming.

    Args:
        a, b: paths (any readable format), loaded checkpoints, state dicts, or
            ``torch.nn.Module``s (their ``state_dict()``), on any device.
        atol, rtol: elements agree when ``|a - b| <= atol + rtol * |b|``; both 0 (the
            default) is bitwise equality (NaN in the same place is equal).
        max_rel_l2: a tensor whose ``||a - b|| / ||a||`` is at most this counts as equal.
        min_cosine: a tensor whose cosine similarity is at least this counts as equal.
            A tensor is equal when every stated criterion holds; ``atol = rtol = 0``
            with a threshold states no element-wise criterion (docs/compare.md).
        ignore_ties: compare values only (a tied file equals its untied twin).
        by_module: roll tensors up into modules of this many name components (or
            ``"auto"``): ``report.modules``, each with ``rel_l2`` and ``cosine``.
        device: ``None``/``"cpu"`` compares with numpy, ``"cuda"`` on the GPU.
        filter: a glob on names; only matching names are compared.
        progress: called as ``progress(done_bytes, total_bytes)``.
        tuning: worker threads (``wsurgery.compare.Tuning``); never changes a result.

    Returns:
        A ``DiffReport``: ``equal``, ``changed`` (each with ``reason`` and ``stats``:
        ``max_abs_diff``, ``max_rel_diff``, ``mismatched``, ``numel``, ``cosine``,
        ``rel_l2``), ``only_in_a``, ``only_in_b``, ``same``, ``modules``, ``to_dict()``,
        ``to_json()``, ``to_html()``, ``save_html(path)``.

    Example:
        >>> wsurgery.diff("model.pt", "model.safetensors").equal  # doctest: +SKIP
        True
        >>> wsurgery.diff(model, "ref.safetensors", max_rel_l2=1e-3).changed  # doctest: +SKIP
        []
    """
    from .compare import diff as _diff

    return _diff(
        a,
        b,
        atol=atol,
        rtol=rtol,
        device=device,
        filter=filter,
        progress=progress,
        max_rel_l2=max_rel_l2,
        min_cosine=min_cosine,
        ignore_ties=ignore_ties,
        by_module=by_module,
        tuning=tuning,
    )


def check(
    ckpt: Checkpoint | Mapping[str, Any] | torch.nn.Module | PathLike,
    src: str,
    dst: str,
    transform: str | Sequence[str] | None = None,
    *,
    other: Checkpoint | Mapping[str, Any] | torch.nn.Module | PathLike | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    max_rel_l2: float | None = None,
    min_cosine: float | None = None,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    tuning: Tuning | None = None,
) -> CheckReport:
    """Check that ``transform(src)`` equals ``dst``, within one checkpoint or against ``other``.

    Args:
        ckpt: where ``src`` is (a path, a loaded checkpoint, a state dict or a module).
        src, dst: tensor names, or module prefixes (every pair under them is checked).
        transform: steps applied to ``src`` first (``"transpose"``, ``["cast(bfloat16)"]``).
        other: where ``dst`` is, when not in ``ckpt``.
        atol, rtol, max_rel_l2, min_cosine, device, progress, tuning: as for :func:`diff`.

    Returns:
        A ``CheckReport`` (``equal``, ``pairs``, ``max_abs_diff``, ``rel_l2``, ``cosine``,
        ``to_dict()``, ``to_json()``).

    Example:
        >>> wsurgery.check("model.safetensors", "embed.weight", "lm_head.weight").equal  # doctest: +SKIP
        True
    """
    from .compare import check as _check

    return _check(
        ckpt,
        src,
        dst,
        transform=transform,
        other=other,
        atol=atol,
        rtol=rtol,
        device=device,
        progress=progress,
        max_rel_l2=max_rel_l2,
        min_cosine=min_cosine,
        tuning=tuning,
    )


def merge(
    checkpoints: Sequence[PathLike | Checkpoint],
    *,
    method: str = "mean",
    weights: Sequence[float] | None = None,
    base: PathLike | Checkpoint | None = None,
    density: float | None = None,
    t: float | None = None,
    only: Sequence[str] | str | None = None,
    dtype: str | None = None,
    device: str = "cpu",
) -> Checkpoint:
    """Merge checkpoints of one architecture tensor by tensor, lazily: nothing is read until
    the result is written. Every floating tensor is computed in float64, rounded once.

    Args:
        checkpoints: paths or opened checkpoints, any format (formats may differ).
        method: ``mean``, ``task-arithmetic``, ``ties`` or ``slerp`` (mergekit's).
        weights: one per checkpoint (default 1 each).
        base: the base of ``task-arithmetic`` and ``ties``.
        density: ``ties``: the fraction of each task vector kept, in (0, 1].
        t: ``slerp``: in [0, 1]; 0 gives the first checkpoint.
        only: selectors of the names to merge; the rest is carried from the first.
        dtype: the output's floating dtype (default: the first checkpoint's).
        device: where the arithmetic runs.

    Returns:
        A lazy :class:`~wsurgery.Checkpoint` (see :func:`wsurgery.surgery.merge.merge`).

    Example:
        >>> wsurgery.merge(["ft1/", "ft2/"], method="ties", base="base/", density=0.5).save("merged/")  # doctest: +SKIP
    """
    from .surgery.merge import merge as _merge

    return _merge(
        checkpoints,
        method=method,
        weights=weights,
        base=base,
        density=density,
        t=t,
        only=only,
        dtype=dtype,
        device=device,
    )
