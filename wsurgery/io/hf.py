"""Model folders: a Hugging Face model folder (``config.json`` beside the weights) or any
folder of shards, read as a whole and written as a whole.

Reading: the weights are the first of ``model.safetensors.index.json``,
``model.safetensors``, ``pytorch_model.bin`` that the folder holds (transformers' order);
a folder without those falls back to the one ``*.safetensors.index.json`` or single
``*.safetensors`` it holds. ``config.json``, when there, is parsed and kept.

Writing a folder: the weights (one file, or shards and their index) and every other
file of the input folder carried over byte for byte: ``config.json`` (rewritten only where
``tie_word_embeddings`` must change), tokenizer files, ``generation_config.json``, ... Never
carried: weight files of any framework (:data:`WEIGHT_PATTERNS`: ``*.safetensors``,
``*.bin`` but ``training_args.bin``, ``*.pt``, ``*.h5``, ``*.onnx``, ... and their
indexes), subfolders (``original/``, ``onnx/``: weights of another layout), wsurgery's
temporaries.

Nothing is read from outside the input: a file is carried only when it is a regular file
whose real path lies inside the folder (a link to a file beside it is carried, as the
file's bytes). A link that leaves the folder (to ``/proc/self/environ``, to a file
elsewhere) and anything that is not a regular file are not carried, and
:attr:`ModelFolder.left` names each with the reason. One exception keeps the Hugging Face
cache usable: in ``models--ORG--NAME/snapshots/REV/`` every file is a link to
``models--ORG--NAME/blobs/``, which counts as inside.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import stat
from dataclasses import dataclass, field

from ..errors import InputError
from .writer import TMP_SUFFIX, atomic_file, write_all

CONFIG = "config.json"
MAX_CONFIG_BYTES = 16 << 20  # a config.json larger than this is refused, not parsed
# transformers' order of preference for the weights of a model folder
WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
# files that hold weights (of any framework) or index them: never carried into an output folder
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.h5.index.json",
    "*.msgpack",
    "*.msgpack.index.json",
    "model.ckpt*",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "*.gguf",
    "*.distcp",
    ".metadata",
    "*" + TMP_SUFFIX,
)
NOT_WEIGHTS = ("training_args.bin",)  # a pickle of the Trainer's arguments, carried like any file


def is_weight_file(name: str) -> bool:
    return name not in NOT_WEIGHTS and any(fnmatch.fnmatchcase(name, p) for p in WEIGHT_PATTERNS)


@dataclass
class ModelFolder:
    """A folder read as a whole.

    Attributes:
        path: the folder.
        weights: the file or index the tensors are read from (None: let the folder's
            own index be found).
        config: ``config.json`` parsed (None when the folder has none).
        config_bytes: its bytes, as read.
        files: the other files, carried into a folder output (names, sorted).
        left: what is not carried and is not a weight file, each with why: ``name/`` (a
            subfolder), ``name (a link out of the folder)``, ``name (not a regular file)``.
    """

    path: str
    weights: str | None
    config: dict | None = None
    config_bytes: bytes | None = None
    files: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


def _read_config(path: str) -> tuple[dict, bytes]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise InputError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a model config")
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{path}: not valid JSON", hint="fix or remove the config file") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object", hint="fix or remove the config file")
    return config, data


def _roots(folder: str) -> list[str]:
    """The real folders a file of ``folder`` may lie in: the folder, and for a snapshot of
    the Hugging Face cache, its repository's ``blobs/``."""
    real = os.path.realpath(folder)
    roots = [real]
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots" and os.path.basename(os.path.dirname(parent)).startswith("models--"):
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots


def inside(path: str, folder: str) -> bool:
    """Whether ``path``'s real path lies inside ``folder`` (see :func:`_roots`)."""
    real = os.path.realpath(path)
    return any(real.startswith(root.rstrip(os.sep) + os.sep) for root in _roots(folder))


def _why_not_carried(folder: str, name: str) -> str | None:
    """Why the entry ``name`` of ``folder`` is not read (None: a regular file inside)."""
    full = os.path.join(folder, name)
    try:
        link = stat.S_ISLNK(os.lstat(full).st_mode)
        mode = os.stat(full).st_mode
    except OSError:
        return "a broken link"
    if link and not inside(full, folder):
        return "a link out of the folder"
    if stat.S_ISDIR(mode):
        return "a folder"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def open_folder(folder: str) -> ModelFolder:
    """What a folder holds: its weights, its config and the files an output carries."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise InputError(f"{folder}: cannot list folder: {exc.strerror or exc}") from None
    weights = next((os.path.join(folder, n) for n in WEIGHTS if os.path.isfile(os.path.join(folder, n))), None)
    config = config_bytes = None
    files, left = [], []
    for name in names:
        full = os.path.join(folder, name)
        why = _why_not_carried(folder, name)
        if why is None and name == CONFIG:
            config, config_bytes = _read_config(full)
            files.append(name)
        elif is_weight_file(name) and why in (None, "a folder"):
            continue
        elif why is None:
            files.append(name)
        elif why == "a folder":
            left.append(name + "/")
        else:
            left.append(f"{name} ({why})")
    return ModelFolder(os.fspath(folder), weights, config, config_bytes, files, left)


def _open_inside(folder: str, name: str):
    """``folder/name`` opened for reading, checked again as it is opened: a regular file
    whose real path lies inside the folder (it may have changed since it was listed)."""
    full = os.path.join(folder, name)
    real = os.path.realpath(full)
    if not inside(real, folder):
        raise InputError(f"{full}: now links out of the folder; not read")
    try:
        f = open(real, "rb")  # noqa: SIM115 - returned to the caller's with
    except OSError as exc:
        raise InputError(f"{full}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise InputError(f"{full}: not a regular file; not read")
    return f


def carry(
    source: ModelFolder, dest: str, *, config: bytes | None = None, sync: bool = True, in_place: bool = False
) -> list[str] | None:
    """Copy ``source``'s other files into the folder ``dest`` byte for byte (``config.json``
    as ``config`` when given); returns the names copied. ``in_place``: the output is
    ``source`` itself, whose other files stay where they are: only a changed
    ``config.json`` is written; returns None."""
    if in_place:
        if config is not None:
            with atomic_file(os.path.join(dest, CONFIG), sync=sync) as f:
                write_all(f, config)
        return None
    for name in source.files:
        target = os.path.join(dest, name)
        if name == CONFIG and config is not None:
            with atomic_file(target, sync=sync) as f:
                write_all(f, config)
            continue
        with atomic_file(target, sync=sync) as f, _open_inside(source.path, name) as src:
            shutil.copyfileobj(src, f, 1 << 20)
    return list(source.files)
