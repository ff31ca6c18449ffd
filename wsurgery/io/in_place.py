"""Writing a model folder in place: only the files wsurgery writes are replaced.

In place (``replace_input``, the CLI's in-place flag) on a model folder replaces its
weights (one file, or shards and their index) and ``config.json``; every other file,
folder, link and hidden file stays as it was (``original/``, ``onnx/``, tokenizer files,
``.git``).

The new files are written into a temporary folder beside the model folder, then switched
in by renames, in an order that leaves the folder readable as the old weights or as the
new ones at every point, never a mix:

1. new shards are moved in under names that no file of the folder has (a shard whose
   standard name is taken gets ``.1``, ``.2``, ... before ``.safetensors``, and the new
   index names it so): nothing reads them yet;
2. the new index (or the new single weights file) replaces the old one in one rename:
   this is the switch;
3. the other entry point of the old set is removed right after (the old single file when
   the new weights are sharded, the old index when they are one file): until then a
   reader that prefers the single file (transformers) reads the old weights and one that
   prefers the index (wsurgery) the new ones, each whole;
4. ``config.json`` is replaced;
5. the old set's files that the new set does not use are removed.

A crash before step 2 leaves the old weights (and unused new shards under their new
names, plus the temporary folder beside the model folder: hidden ``.NAME.*.wsurgery-tmp``);
a crash after it leaves the new weights, with the old ``config.json`` if it came before
step 4, and stale old shards if it came before step 5. Rerunning the command cleans up.
An error (not a crash) before the switch removes the new shards moved in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from ..errors import OutputError
from .writer import TMP_SUFFIX, fsync_dir, os_error

CONFIG = "config.json"


def is_in_place(path, source) -> bool:
    """Whether a folder output at ``path`` is the model folder ``source`` was read from."""
    if source is None or not os.path.isdir(os.fspath(path)):
        return False
    try:
        return os.path.samefile(os.fspath(path), os.fspath(source.path))
    except OSError:
        return False


def old_weights(folder: str, input_files, weights: str | None) -> list[str]:
    """The names of the files of ``folder`` that hold the weights read: the input files
    that lie directly in it, and the index or file the weights were found by."""
    real = os.path.realpath(folder)
    out: list[str] = []
    for f in [*(input_files or ()), *([weights] if weights else [])]:
        f = os.path.abspath(os.fspath(f))
        if os.path.realpath(os.path.dirname(f)) == real:
            name = os.path.basename(f)
            if name not in out:
                out.append(name)
    return out


def describe_in_place(target, ckpt) -> str | None:
    """What writing ``ckpt`` to the folder ``target`` would replace when ``target`` is the
    model folder it was read from (None otherwise), for a dry run."""
    source = getattr(ckpt, "model_folder", None)
    if source is None or not is_in_place(target, source):
        return None
    old = old_weights(source.path, ckpt.input_files, source.weights)
    shown = ", ".join(old[:6]) + (f" and {len(old) - 6} more" if len(old) > 6 else "")
    kept = sorted(set(os.listdir(source.path)) - set(old) - {CONFIG})
    stays = ", ".join(kept[:8]) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
    return f"in place: would replace {shown} and {CONFIG} where it changes; would leave {stays or 'nothing else'}"


def _free_name(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    stem, dot, ext = name.rpartition(".")
    for k in range(1, 10_000):
        candidate = f"{stem}.{k}.{ext}" if dot else f"{name}.{k}"
        if candidate not in taken:
            return candidate
    raise OutputError(f"no free name for {name}")  # pragma: no cover - 10,000 names taken


@contextlib.contextmanager
def in_place_folder(folder, old: list[str], *, sync: bool = True, notes: list[str] | None = None, replace: bool = True):
    """Yield a temporary folder to write the new weights, their index and (when it
    changes) ``config.json`` into; on success switch them into ``folder`` as the module
    docstring says, removing the ``old`` weights files that are no longer used.
    ``notes`` gets one line saying what was replaced and removed; ``replace`` is
    accepted for the signature of ``atomic_folder`` (the folder is always there)."""
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", suffix=TMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise os_error(folder, exc) from None
    try:
        yield tmp
        _switch(tmp, folder, old, sync=sync, notes=notes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _index_of(names: list[str]) -> str | None:
    found = [n for n in names if n.endswith(".index.json")]
    return found[0] if found else None


def _switch(tmp: str, folder: str, old: list[str], *, sync: bool, notes: list[str] | None) -> None:
    from .hf import is_weight_file

    new = sorted(n for n in os.listdir(tmp) if is_weight_file(n) or n == CONFIG)
    index = _index_of(new)
    weights = [n for n in new if n != CONFIG and n != index]
    present = set(os.listdir(folder))
    moved: list[str] = []
    switched = False
    try:
        if index is not None:
            # 1. shards under free names; the index names them
            renames: dict[str, str] = {}
            taken = present | set(weights)
            for name in weights:
                target = _free_name(name, taken - {name} if name not in present else taken)
                taken.add(target)
                renames[name] = target
            for name in weights:
                os.replace(os.path.join(tmp, name), os.path.join(folder, renames[name]))
                moved.append(renames[name])
            if any(k != v for k, v in renames.items()):
                _rename_in_index(os.path.join(tmp, index), renames)
            entry = index
            if sync:
                fsync_dir(folder)
        else:
            entry = weights[0]
        # 2. the switch
        os.replace(os.path.join(tmp, entry), os.path.join(folder, entry))
        switched = True
        if sync:
            fsync_dir(folder)
        # 3. the old set's other entry point (its index, or a single file a reader prefers)
        in_use = {entry, *moved}
        for name in old:
            if name not in in_use and _is_entry(name):
                _remove(folder, name)
        # 4. config.json
        if CONFIG in new:
            os.replace(os.path.join(tmp, CONFIG), os.path.join(folder, CONFIG))
        # 5. stale files of the old set
        removed = [n for n in old if n not in in_use and n != CONFIG]
        for name in removed:
            _remove(folder, name)
        if sync:
            fsync_dir(folder)
    except OSError as exc:
        if not switched:
            for name in moved:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
        raise os_error(folder, exc) from None
    if notes is not None:
        written = [entry, *moved, *([CONFIG] if CONFIG in new else [])]
        text = f"in place: wrote {', '.join(written)}"
        if removed:
            text += f"; removed the old {', '.join(removed)}"
        notes.append(text + "; every other file was left as it was")


def _is_entry(name: str) -> bool:
    """A file a reader starts from: an index, or a single weights file of transformers' names."""
    return name.endswith(".index.json") or name in ("model.safetensors", "pytorch_model.bin")


def _remove(folder: str, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, name))


def _rename_in_index(path: str, renames: dict[str, str]) -> None:
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    record["weight_map"] = {k: renames.get(v, v) for k, v in record["weight_map"].items()}
    data = (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
