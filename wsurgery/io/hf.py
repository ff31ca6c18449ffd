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
        left: what is not carried and is not a weight file (subfolders, special files).
    """

    path: str
    weights: str | None
    config: dict | None = None
    config_bytes: bytes | None = None
    files: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    @property
    def is_hf(self) -> bool:
        """A Hugging Face model folder: it has a ``config.json``."""
        return self.config is not None


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
        try:
            mode = os.stat(full).st_mode
        except OSError:
            left.append(name)
            continue
        if name == CONFIG and stat.S_ISREG(mode):
            config, config_bytes = _read_config(full)
            files.append(name)
        elif is_weight_file(name):
            continue
        elif stat.S_ISREG(mode):
            files.append(name)
        else:
            left.append(name + ("/" if stat.S_ISDIR(mode) else ""))
    return ModelFolder(os.fspath(folder), weights, config, config_bytes, files, left)


def carry(source: ModelFolder, dest: str, *, config: bytes | None = None, sync: bool = True) -> list[str]:
    """Copy ``source``'s other files into the folder ``dest`` byte for byte (``config.json``
    as ``config`` when given); returns the names copied."""
    for name in source.files:
        target = os.path.join(dest, name)
        if name == CONFIG and config is not None:
            with atomic_file(target, sync=sync) as f:
                write_all(f, config)
            continue
        with atomic_file(target, sync=sync) as f:
            try:
                src = open(os.path.join(source.path, name), "rb")
            except OSError as exc:
                raise InputError(f"{os.path.join(source.path, name)}: cannot read: {exc.strerror or exc}") from None
            with src:
                shutil.copyfileobj(src, f, 1 << 20)
    return list(source.files)
