"""The dtype table, shared by every layer. Pure Python: importing it never imports torch.

wsurgery names dtypes as torch does, without the ``torch.`` prefix (``float32``,
``bfloat16``). safetensors names them by short codes (``F32``, ``BF16``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str  # torch name without prefix
    code: str  # safetensors code
    itemsize: int  # bytes per element; sub-byte types are not stored by wsurgery
    kind: str  # "float", "int", "uint", "bool", "complex"


_TABLE = [
    DType("float64", "F64", 8, "float"),
    DType("float32", "F32", 4, "float"),
    DType("float16", "F16", 2, "float"),
    DType("bfloat16", "BF16", 2, "float"),
    DType("float8_e4m3fn", "F8_E4M3", 1, "float"),
    DType("float8_e5m2", "F8_E5M2", 1, "float"),
    DType("int64", "I64", 8, "int"),
    DType("int32", "I32", 4, "int"),
    DType("int16", "I16", 2, "int"),
    DType("int8", "I8", 1, "int"),
    DType("uint64", "U64", 8, "uint"),
    DType("uint32", "U32", 4, "uint"),
    DType("uint16", "U16", 2, "uint"),
    DType("uint8", "U8", 1, "uint"),
    DType("bool", "BOOL", 1, "bool"),
    DType("complex64", "C64", 8, "complex"),
]

BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
BY_CODE: dict[str, DType] = {d.code: d for d in _TABLE}

# Common spellings a user may type in cast(...).
_ALIASES = {
    "float": "float32",
    "fp32": "float32",
    "f32": "float32",
    "double": "float64",
    "fp64": "float64",
    "half": "float16",
    "fp16": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


def lookup(name: str) -> DType | None:
    """Find a dtype by torch name (with or without ``torch.``), alias or safetensors code."""
    key = name.strip()
    if key.startswith("torch."):
        key = key[len("torch.") :]
    if key in BY_NAME:
        return BY_NAME[key]
    if key.upper() in BY_CODE:
        return BY_CODE[key.upper()]
    low = key.lower()
    if low in _ALIASES:
        return BY_NAME[_ALIASES[low]]
    return BY_NAME.get(low)


def torch_dtype(name: str):
    """The ``torch.dtype`` for a wsurgery dtype name. Imports torch."""
    import torch

    return getattr(torch, name)


def name_of_torch_dtype(dtype) -> str:
    """``torch.float32`` -> ``"float32"``; raises KeyError for dtypes safetensors cannot store."""
    name = str(dtype).removeprefix("torch.")
    if name not in BY_NAME:
        raise KeyError(name)
    return name
