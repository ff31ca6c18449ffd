"""The library's front door, in safetensors' idiom: ``open`` / ``load`` a checkpoint lazily,
``load_state_dict`` / ``save_state_dict`` for plain dicts of tensors, ``convert`` a file,
``diff`` / ``check`` to compare; and the public :class:`Checkpoint`, the model's data
with the verb methods (each one call of ``wsurgery.surgery``) and ``save`` (the io layer).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import model as _model
from .io.options import SaveResult, WriteOptions

if TYPE_CHECKING:
    from .io.options import Collective
    from .io.targets import OutputPlan

if TYPE_CHECKING:
    import torch

    from .compare import CheckReport, DiffReport, Tuning
    from .compare.options import Mapper
    from .surgery.recipe import ApplyResult
    from .transforms import Transform

    Device = str | torch.device
    # a transform: None (identity), one step or chain as text, a list of steps, or a Transform
    Steps = str | Sequence[str] | Transform | None

PathLike = str | os.PathLike[str]


class Checkpoint(_model.Checkpoint):
    """A checkpoint: ordered names -> lazy tensors, aliases, metadata, the source format.

    Nothing is read until asked: opening reads headers (or, for torch files, maps the
    file), and :meth:`save` streams one tensor at a time, copying untouched tensors as
    raw bytes. Use it as a context manager (or call :meth:`close`) to release the files.
    Every verb returns a new lazy checkpoint and leaves this one as it is; each refuses
    with every problem at once (``SurgeryError``, nothing applied); an unknown name is
    an ``UnknownNameError``.

    Example:
        >>> with wsurgery.open("model.safetensors") as ckpt:          # doctest: +SKIP
        ...     tied = ckpt.tie("embedding.weight", "projection.weight")
        ...     tied.save("tied.safetensors")
    """

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Any],
        *,
        aliases: Mapping[str, tuple[str, Sequence[str]]] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Checkpoint:
        """A lazy checkpoint over torch tensors in memory; tensors that share storage
        become aliases, and ``aliases`` adds ties ``{alias: (source, [view steps])}``.

        Example:
            >>> ckpt = wsurgery.Checkpoint.from_state_dict(model.state_dict())  # doctest: +SKIP
        """
        from .io.torch_format import from_tensors

        explicit = dict(aliases) if aliases else None
        return _facade(from_tensors(dict(state_dict), explicit=explicit, metadata=dict(metadata or {})))

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        """``(shape, dtype)`` of a tensor or alias, from the header: no tensor data is read.

        Example:
            >>> ckpt.shape_dtype("projection.weight")  # doctest: +SKIP
            ((32, 8), 'float32')
        """
        from .lookup import shape_dtype

        return shape_dtype(self, name)

    def tie(
        self,
        src: str | Sequence[str],
        dst: str | Sequence[str],
        transform: Steps = None,
        *,
        new: bool = False,
        verify: bool = False,
        atol: float = 0.0,
        rtol: float = 0.0,
    ) -> Checkpoint:
        """``dst`` becomes an alias of ``transform(src)``, stored once.

        Args:
            src: a stored or alias name, or a module prefix (every tensor under it); a
                list ties several pairs at once.
            dst: the alias name (new, or an existing tensor of the same shape and dtype
                after the transform); a prefix for a prefix; a list for a list.
            transform: view steps only (``"transpose"``, ``["slice(0,0,8)"]``...).
            new: ``dst`` is meant to be a new name, even one edit away from another.
            verify: refuse unless ``dst`` already holds ``transform(src)`` within
                ``atol``/``rtol`` (reads both): the safe way to dedupe a head stored twice.

        Returns:
            A new lazy :class:`Checkpoint`.

        Example:
            >>> tied = ckpt.tie("embedding.weight", "lm_head.weight", verify=True)  # doctest: +SKIP
        """
        from . import surgery

        return _facade(surgery.tie(self, src, dst, transform, new=new, verify=verify, atol=atol, rtol=rtol))

    def copy(
        self,
        src: str | Sequence[str],
        dst: str | Sequence[str],
        transform: Steps = None,
        *,
        other: _model.Checkpoint | None = None,
        device: Device = "cpu",
        new: bool = False,
    ) -> Checkpoint:
        """``dst`` holds an independent ``transform(src)``.

        Args:
            src: a tensor or module prefix (a list for several pairs, all read from this
                checkpoint as it is, so two copies can swap two tensors).
            dst: the destination: new, or existing (replaced, whatever its shape or
                dtype; aliases of a replaced tensor keep their values).
            transform: any steps, ``cast`` and ``scale`` included.
            other: take ``src`` from this checkpoint instead.
            device: where the copies are computed when written or read (``"cuda"``).
            new: ``dst`` is meant to be a new name, even one edit away from another.

        Example:
            >>> grown = ckpt.copy("layers.0", "layers.12")  # doctest: +SKIP
        """
        from . import surgery

        return _facade(surgery.copy(self, src, dst, transform, other=other, device=device, new=new))

    def untie(self, names: str | Sequence[str] | None = None, *, device: Device = "cpu") -> Checkpoint:
        """The named aliases (every alias by default) become stored tensors of their own,
        for loaders that know no alias metadata.

        Args:
            names: aliases, stored tensors (every alias of them) or module prefixes.
            device: where the untied values are computed when written.

        Example:
            >>> plain = ckpt.untie()  # doctest: +SKIP
        """
        from . import surgery

        return _facade(surgery.untie(self, names, device=device))

    def rename(self, pattern: str, to: str) -> Checkpoint:
        """Every name ``n`` becomes ``re.sub(pattern, to, n)``; aliases follow their sources.

        Example:
            >>> ckpt.rename(r"^module\\.", "")  # doctest: +SKIP
        """
        from . import surgery

        return _facade(surgery.rename(self, pattern, to))

    def drop(self, names: str | Sequence[str]) -> Checkpoint:
        """Without the tensors ``names`` select (a name, module prefix or glob each); a
        source an alias still uses cannot go.

        Example:
            >>> ckpt.drop(["optimizer.*", "*._extra_state"])  # doctest: +SKIP
        """
        from . import surgery

        return _facade(surgery.drop(self, [names] if isinstance(names, str) else list(names)))

    def keep(self, names: str | Sequence[str]) -> Checkpoint:
        """Only the tensors ``names`` select (a name, module prefix or glob each).

        Example:
            >>> ckpt.keep(["layers.*", "embed.weight"])  # doctest: +SKIP
        """
        from . import surgery

        return _facade(surgery.keep(self, [names] if isinstance(names, str) else list(names)))

    def cast(
        self, dtype: str, *, only: Sequence[str] = (), exclude: Sequence[str] = (), device: Device = "cpu"
    ) -> Checkpoint:
        """Floating tensors (never integers or bool) cast to ``dtype``; ``only``/``exclude``
        choose by glob or module prefix; a tied source is cast once, its aliases follow.

        Example:
            >>> ckpt.cast("bfloat16", exclude=["*norm*"])  # doctest: +SKIP
        """
        from . import surgery

        return _facade(surgery.cast(self, dtype, only=list(only), exclude=list(exclude), device=device))

    def concat(self, srcs: Sequence[str], dst: str, dim: int = 0, *, new: bool = False) -> Checkpoint:
        """``dst`` = ``srcs`` concatenated along ``dim`` (the sources are gone).

        Example:
            >>> ckpt.concat(["q.weight", "k.weight", "v.weight"], "qkv.weight")  # doctest: +SKIP
        """
        from . import surgery

        return _facade(surgery.concat(self, srcs, dst, dim, new=new))

    def split(self, src: str, dsts: Sequence[str], dim: int, sizes: Sequence[int], *, new: bool = False) -> Checkpoint:
        """``dsts`` = pieces of ``src`` along ``dim`` of the given ``sizes`` (``src`` is gone).

        Example:
            >>> ckpt.split("qkv.weight", ["q.weight", "k.weight", "v.weight"], 0, [64, 64, 64])  # doctest: +SKIP
        """
        from . import surgery

        return _facade(surgery.split(self, src, dsts, dim, sizes, new=new))

    def stack(self, template: str, dst: str, dim: int = 0, *, new: bool = False) -> Checkpoint:
        """``dst`` = the tensors ``template`` names (``"layers.{i}.w"``) on a new axis ``dim``;
        a template of module prefixes stacks every tensor under them.

        Example:
            >>> ckpt.stack("layers.{i}.fc1.weight", "layers.fc1.weight")  # doctest: +SKIP
        """
        from . import surgery

        return _facade(surgery.stack(self, template, dst, dim, new=new))

    def unstack(self, src: str, template: str, dim: int = 0, *, new: bool = False) -> Checkpoint:
        """The slices of ``src`` along ``dim`` become ``template`` with i = 0, 1, ...

        Example:
            >>> ckpt.unstack("layers.fc1.weight", "layers.{i}.fc1.weight")  # doctest: +SKIP
        """
        from . import surgery

        return _facade(surgery.unstack(self, src, template, dim, new=new))

    def merge_lora(
        self,
        adapter: PathLike | Sequence[PathLike],
        weight: float | Sequence[float] | None = None,
        *,
        device: Device = "cpu",
    ) -> Checkpoint:
        """PEFT LoRA adapters (folders, in order; ``weight`` one multiplier each) folded in,
        as ``merge_and_unload`` does: see :func:`wsurgery.surgery.lora.merge_lora`.

        Example:
            >>> merged = base.merge_lora("my-lora/")  # doctest: +SKIP
        """
        from .surgery.lora import merge_lora

        return _facade(merge_lora(self, adapter, weight, device=device))

    def save(
        self,
        path: PathLike | OutputPlan,
        *,
        overwrite: bool = False,
        max_shard_size: int | str | None = None,
        sync: bool = True,
        progress: Callable[[int], None] | None = None,
        replace_input: bool | None = None,
        format: str | None = None,  # noqa: A002 - safetensors' and torch's word
        keep_aliases: bool = False,
        flat: bool = False,
    ) -> SaveResult:
        """Write the checkpoint atomically: safetensors (aliases recorded in the metadata),
        a torch file (aliases as views of shared storage), a DCP folder, or a folder of
        shards.

        Args:
            path: the output file; a folder with ``max_shard_size`` (Hugging Face-style
                shards and their index), when it is an existing folder or ends with a
                separator, or when this checkpoint was read from a folder and ``path``
                has no weights file's suffix (the input folder's other files are carried
                over, ``config.json``'s ``tie_word_embeddings`` true to the ties written).
                An ``OutputPlan`` already made by ``wsurgery.io.targets.plan_output``.
            overwrite: replace an existing file or folder; without it, an existing
                output is an ``OutputError``, and so is one of this checkpoint's own inputs.
            max_shard_size: bytes per shard (an int, or ``"5GB"``, ``"500MiB"``):
                safetensors shards, or ``pytorch_model-*.bin`` shards with ``format="torch"``.
            sync: fsync the output before renaming it into place (durable after a power
                loss); ``False`` is faster and still atomic against the process dying.
            progress: called with the byte count of each piece written.
            replace_input: whether an input may be replaced; by default as ``overwrite``.
            format: ``"safetensors"``, ``"torch"`` (``torch.load(weights_only=True)``
                reads it) or ``"dcp"`` (``torch.distributed.checkpoint.load`` reads it;
                aliases written as values); by default from ``path``'s suffix.
            keep_aliases: a model-folder output keeps every alias as an alias; by default
                those ``from_pretrained`` would not restore (all but the head tie) are
                written as values.
            flat: a torch file written from a torch file is a flat state dict; by default
                it keeps the input's structure (containers, keys, non-tensor values).

        Returns:
            A :class:`SaveResult`.

        Under a :func:`wsurgery.distributed.session` of several ranks, every rank calls
        it: a folder is written by all of them and renamed into place by rank 0; a
        single file is written by rank 0.

        Raises:
            OutputError: the output exists, is an input, or cannot be written.
            UsageError: ``format`` is unknown or contradicts ``path``'s suffix.

        Example:
            >>> ckpt.save("out.safetensors", overwrite=True)  # doctest: +SKIP
        """
        options = WriteOptions(
            format=format,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            in_place=overwrite if replace_input is None else replace_input,
            sync=sync,
            keep_aliases=keep_aliases,
            flat=flat,
            progress=progress,
        )
        return save(self, path, options)


def save(ckpt: _model.Checkpoint, target: PathLike | OutputPlan, options: WriteOptions) -> SaveResult:
    """Write ``ckpt`` at ``target`` as ``options`` say (see :meth:`Checkpoint.save`); under a
    ``wsurgery.distributed`` session of several ranks, written by all of them together."""
    from .io.targets import OutputPlan
    from .io.targets import save as _save

    if options.collective is None:
        group = _collective()
        if group is not None:
            options = dataclasses.replace(options, collective=group)
    return _save(ckpt, target if isinstance(target, OutputPlan) else os.fspath(target), options)


def _facade(ckpt: _model.Checkpoint) -> Checkpoint:
    """``ckpt`` as the public :class:`Checkpoint` (the same one when it is already)."""
    if isinstance(ckpt, Checkpoint):
        return ckpt
    return Checkpoint(**{f.name: getattr(ckpt, f.name) for f in dataclasses.fields(ckpt)})


class _SessionGroup:
    """A ``wsurgery.distributed`` session as the io layer's ``Collective``."""

    def __init__(self, session: Any):
        self._s = session
        self.rank: int = session.rank
        self.world_size: int = session.world_size

    @property
    def is_first(self) -> bool:
        return bool(self._s.is_first)

    def exchange(self, phase: str, payload: Any = None) -> list[Any]:
        gathered: list[Any] = self._s.exchange(phase, payload)
        return gathered

    def shared_folder(self, folder: str, *, replace: bool = False, sync: bool = True) -> Any:
        return self._s.shared_folder(folder, replace=replace, sync=sync)

    def first_writes(self, write: Callable[[], Any]) -> Any:
        return self._s.first_writes(write)

    def owners(self, sizes: Sequence[int]) -> list[int]:
        from .distributed import split_by_bytes

        return split_by_bytes(list(sizes), self.world_size)

    def carry(self, exc: BaseException) -> BaseException:
        from .distributed import carry

        return carry(exc, self.rank)

    def uncarry(self, exc: BaseException) -> BaseException:
        from .distributed import uncarry

        return uncarry(exc)


def _collective() -> Collective | None:
    """The running ``wsurgery.distributed`` session of several ranks, if any."""
    from .distributed import current

    s = current()
    return None if s is None else _SessionGroup(s)


def _load(path: PathLike) -> Checkpoint:
    from .io.registry import open as _open

    return _facade(_open(path))


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
        A :class:`~wsurgery.SaveResult`.

    Example:
        >>> wsurgery.save_state_dict(model.state_dict(), "model.safetensors")  # doctest: +SKIP
    """
    ckpt = Checkpoint.from_state_dict(state_dict, aliases=aliases, metadata=metadata)
    return save(ckpt, path, WriteOptions(overwrite=True, in_place=True, sync=sync))


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
        A :class:`~wsurgery.SaveResult`.

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
    format: str | None = None,  # noqa: A002 - as for convert
    replace_input: bool = False,
    default_out: Callable[[str | None], PathLike] | None = None,
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
        format: the output's format, as for :func:`convert`.
        replace_input: let the output replace an input (see :meth:`Checkpoint.save`).
        default_out: where to write when neither ``out`` nor the recipe says, given the
            first input's path (a front end's default, such as a name beside the input).

    Returns:
        An ``ApplyResult``: ``checkpoint`` (the lazy result; its ``changes`` are the plan),
        ``saved`` (a :class:`~wsurgery.SaveResult`, None for a dry run),
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
    if target is None and not dry_run and default_out is None:
        raise UsageError("nowhere to write: the recipe has no output path and no out was given", param="out")
    shard_size = max_shard_size if max_shard_size is not None else rec.max_shard_size
    with recipes.prepare(rec, inputs) as run:
        if target is None and default_out is not None:
            target = os.fspath(default_out(next(iter(run.paths.values()), None)))
        saved = None
        if not dry_run:
            options = WriteOptions(
                format=format,
                max_shard_size=shard_size,
                overwrite=overwrite,
                in_place=replace_input,
                sync=sync,
                progress=progress,
            )
            assert target is not None
            saved = save(run.result, target, options)
        info = run.describe()
        return recipes.ApplyResult(
            _facade(run.result), saved, target, info["inputs"], info["steps"], info["expectations"], info["verified"]
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
    from .compare import CompareOptions
    from .compare import diff as _diff

    options = CompareOptions(
        atol=atol,
        rtol=rtol,
        max_rel_l2=max_rel_l2,
        min_cosine=min_cosine,
        ignore_ties=ignore_ties,
        by_module=by_module,
        filter=filter,
        device=device,
        tuning=tuning if tuning is not None else compare_tuning(),
    )
    return _diff(a, b, options, progress=progress, mapper=compare_mapper())


def compare_tuning() -> Tuning:
    """The threads of a compare in this process: the node's cores shared among the local
    ranks of a ``torchrun`` job (``distributed.local_workers``), at most 4, at least 1."""
    from .compare import Tuning
    from .distributed import local_workers

    return Tuning(workers=min(local_workers(), Tuning.detect().workers))


def compare_mapper() -> Mapper:
    """How ``diff`` / ``check`` spread their tensor pairs: over the ranks of an active
    ``wsurgery.distributed`` session (each rank compares its share), else serially."""
    from .distributed import map_by_bytes

    return map_by_bytes


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
    from .compare import CompareOptions
    from .compare import check as _check

    options = CompareOptions(
        atol=atol,
        rtol=rtol,
        max_rel_l2=max_rel_l2,
        min_cosine=min_cosine,
        device=device,
        tuning=tuning if tuning is not None else compare_tuning(),
    )
    return _check(ckpt, src, dst, transform, other, options, progress=progress, mapper=compare_mapper())


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

    return _facade(
        _merge(
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
    )
