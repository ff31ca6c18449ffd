"""Transform chains: parse step specs, infer shapes and dtypes without data, apply to tensors.

A transform is a list of steps applied in order. Step syntax (names are case-insensitive,
whitespace is ignored)::

    same                     no-op (dropped when parsing: the identity is the empty chain)
    transpose                swap the two dims of a 2-D tensor
    transpose(d0,d1)         swap two dims of an N-D tensor (negative dims allowed)
    permute(2,0,1)           reorder all dims (negative dims allowed)
    reshape(4096,-1)         new shape with the same element count, at most one -1
    slice(dim,start,stop)    Python slicing on one dim, step 1; stop may be omitted or empty
    cast(bfloat16)           change dtype (any dtype of ``wsurgery.dtypes``, aliases accepted)
    scale(0.5)               multiply by a finite float, keeping the dtype

View steps (``same``, ``transpose``, ``permute``, ``reshape``, ``slice``) return views of
their input, so a tie made with them stays live; ``cast`` and ``scale`` always return new
tensors.

Rules worth knowing:

* ``slice`` indices follow Python's rules for negative values, but an index outside
  ``-size..size`` is an error rather than silently clamped (it is almost always a typo in
  weight surgery); ``stop <= start`` gives an empty dim.
* ``reshape`` follows torch: a ``-1`` next to a ``0`` is ambiguous for an empty tensor and is
  an error. In a view-only chain it must be a true view (``Tensor.view``); a chain that copies
  anyway (one with ``cast``/``scale``) or ``apply(..., allow_copy=True)`` falls back to
  ``Tensor.reshape``.
* ``scale`` on a floating tensor computes in float32 for types narrower than float32
  (float16, bfloat16, float8) and rounds back; float32/float64/complex compute natively.
  On a bool tensor it is an error; on integer tensors only an integral factor that the
  dtype holds is allowed (computed in the integer dtype, the products wrapping like
  torch), so a negative one is refused for unsigned dtypes.
* Every step's result must be a tensor torch can hold (:func:`wsurgery.limits.shape_problem`:
  at most 64 dims, sizes, strides and byte size within int64): ``reshape(10**29,0)`` of
  an empty tensor infers, but torch could not make it.

Importing this module, parsing and inferring never import torch.
"""

from __future__ import annotations

import difflib
import functools
import math
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from . import dtypes
from .errors import TransformError
from .limits import MAX_DIMS, shape_problem
from .show import shape_text

__all__ = [
    "IDENTITY",
    "Cast",
    "Permute",
    "Reshape",
    "Same",
    "Scale",
    "Slice",
    "Step",
    "Transform",
    "Transpose",
    "parse",
    "parse_step",
]

Shape = tuple[int, ...]


VIEW_STEPS = "same, transpose, permute, reshape, slice"  # the steps a tie may take

class _StepError(Exception):
    """Internal: a step that does not fit; turned into a ``TransformError`` with context."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


# ----------------------------------------------------------------------------- helpers


def _label(spec: str, index: int | None) -> str:
    return f"step '{spec}'" if index is None else f"step {index} '{spec}'"


def _raise(spec: str, index: int | None, err: _StepError) -> TransformError:
    return TransformError(f"{_label(spec, index)}: {err.message}", hint=err.hint)


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _elements(n: int) -> str:
    return f"{n} element" if n == 1 else f"{n} elements"


def _wrap_dim(dim: int, rank: int, shape: Shape, what: str = "dim") -> int:
    """Normalize a possibly negative dim like torch (a 0-d tensor accepts -1 and 0)."""
    bound = max(rank, 1)
    if not -bound <= dim < bound:
        raise _StepError(
            f"{what} {dim} is out of range for a tensor of shape {shape_text(shape)} (expected {-bound}..{bound - 1})"
        )
    return dim + bound if dim < 0 else dim


_INT_RE = re.compile(r"^[+-]?\d+$")


# No dimension or shape of a real tensor needs more digits; longer numbers are refused
# before int() (whose own limit raises a ValueError past 4300 digits).
_MAX_INT_DIGITS = 30


def _parse_int(text: str, position: int, what: str) -> int:
    if not _INT_RE.match(text):
        raise _StepError(f"argument {position} ({what}) must be an integer, got {text[:40]!r}")
    if len(text.lstrip("+-")) > _MAX_INT_DIGITS:
        raise _StepError(f"argument {position} ({what}) has more than {_MAX_INT_DIGITS} digits")
    return int(text)


def _parse_ints(args: list[str], what: str) -> tuple[int, ...]:
    return tuple(_parse_int(a, i, what) for i, a in enumerate(args, 1))


def _fmt_args(values: Iterable[Any]) -> str:
    return ",".join("" if v is None else str(v) for v in values)


def _dtype_kind(name: str) -> str:
    """float / int / uint / bool / complex from a torch dtype name (table or not)."""
    entry = dtypes.BY_NAME.get(name)
    if entry is not None:
        return entry.kind
    for prefix, kind in (
        ("uint", "uint"),
        ("int", "int"),
        ("complex", "complex"),
        ("bool", "bool"),
    ):
        if name.startswith(prefix):
            return kind
    return "float"


def _valid_dtype_names() -> str:
    return ", ".join(dtypes.BY_NAME)


def _resolve_dtype(dtype: Any) -> str:
    """A dtype name, alias, safetensors code or ``torch.dtype`` -> torch name without prefix."""
    entry = dtypes.lookup(dtype if isinstance(dtype, str) else str(dtype))
    if entry is None:
        raise _StepError(f"unknown dtype {str(dtype)!r}; valid dtypes: {_valid_dtype_names()}")
    return entry.name


def _tensor_dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _itemsize(name: str) -> int:
    entry = dtypes.BY_NAME.get(name)
    return entry.itemsize if entry is not None else 1


def _int_range(name: str) -> tuple[int, int] | None:
    """The values an integer dtype holds (``int8`` -> -128..127), or None if unknown."""
    entry = dtypes.BY_NAME.get(name)
    if entry is not None:
        bits = 8 * entry.itemsize
    else:
        digits = re.search(r"\d+", name)
        if digits is None:
            return None
        bits = int(digits.group())
    if _dtype_kind(name) == "uint":
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _check_shape(shape: Any) -> Shape:
    try:
        items = tuple(shape)
        dims = tuple(operator.index(d) for d in items)
    except TypeError:
        items = dims = ()
        bad = True
    else:
        bad = any(d < 0 for d in dims) or any(isinstance(d, bool) for d in items)
    if bad:
        raise _StepError(f"a shape must be a sequence of non-negative ints, got {shape!r}")
    return dims


# ----------------------------------------------------------------------------- steps


class Step(ABC):
    """One step of a transform. Concrete steps are frozen dataclasses."""

    name: ClassVar[str]
    is_view: ClassVar[bool]

    @abstractmethod
    def spec(self) -> str:
        """Canonical text; ``parse_step(step.spec()) == step``."""

    @abstractmethod
    def _infer(self, shape: Shape, dtype: str) -> tuple[Shape, str]:
        """Shape/dtype after this step; raises ``_StepError``."""

    @abstractmethod
    def _apply(self, tensor: Any, allow_copy: bool) -> Any:
        """Apply to a tensor already checked by ``_infer``."""

    def infer(self, shape: tuple[int, ...], dtype: str) -> tuple[tuple[int, ...], str]:
        """Shape and dtype of the output for an input of ``shape``/``dtype``; no data touched."""
        return self._infer_at(shape, dtype, None)

    def apply(self, tensor: Any, *, allow_copy: bool = False) -> Any:
        """Apply to a ``torch.Tensor`` on any device. View steps return views; ``reshape``
        raises unless the input can be viewed, or ``allow_copy`` is true."""
        return self._apply_at(tensor, None, allow_copy)

    def __str__(self) -> str:
        return self.spec()

    # -- with a position in a chain, for messages

    def _checked(self, shape: Shape, dtype: str) -> tuple[Shape, str]:
        """``_infer``, then refuse a result that torch could not hold."""
        out, out_dtype = self._infer(shape, dtype)
        problem = shape_problem(out, _itemsize(out_dtype))
        if problem:
            shown = shape_text(out)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            raise _StepError(f"the result, of shape {shown}, is not a tensor torch can hold: {problem}")
        return out, out_dtype

    def _infer_at(self, shape: Any, dtype: Any, index: int | None) -> tuple[Shape, str]:
        try:
            return self._checked(_check_shape(shape), _resolve_dtype(dtype))
        except _StepError as err:
            raise _raise(self.spec(), index, err) from None

    def _apply_at(self, tensor: Any, index: int | None, allow_copy: bool) -> Any:
        try:
            if not hasattr(tensor, "shape") or not hasattr(tensor, "dtype"):
                raise _StepError(f"expects a torch.Tensor, got {type(tensor).__name__}")
            self._checked(tuple(tensor.shape), _tensor_dtype_name(tensor))
            return self._apply(tensor, allow_copy)
        except _StepError as err:
            raise _raise(self.spec(), index, err) from None
        except (RuntimeError, ValueError, TypeError, IndexError, OverflowError) as err:  # from torch
            msg = " ".join(str(err).split())
            raise TransformError(
                f"{_label(self.spec(), index)}: failed on a tensor of shape "
                f"{shape_text(tuple(tensor.shape))}, dtype {_tensor_dtype_name(tensor)}: {msg}"
            ) from err


@dataclass(frozen=True)
class Same(Step):
    name: ClassVar[str] = "same"
    is_view: ClassVar[bool] = True

    def spec(self) -> str:
        return "same"

    def _infer(self, shape: Shape, dtype: str) -> tuple[Shape, str]:
        return shape, dtype

    def _apply(self, tensor: Any, allow_copy: bool) -> Any:
        return tensor


@dataclass(frozen=True)
class Transpose(Step):
    """``transpose`` (2-D only, ``dims=None``) or ``transpose(d0,d1)``."""

    dims: tuple[int, int] | None = None
    name: ClassVar[str] = "transpose"
    is_view: ClassVar[bool] = True

    def spec(self) -> str:
        return "transpose" if self.dims is None else f"transpose({_fmt_args(self.dims)})"

    def _resolve(self, shape: Shape) -> tuple[int, int]:
        if self.dims is None:
            if len(shape) != 2:
                raise _StepError(
                    f"expects 2 dims, got a tensor of shape {shape_text(shape)}",
                    hint="use transpose(d0,d1) to swap two dims of an N-D tensor",
                )
            return 0, 1
        d0, d1 = self.dims
        return _wrap_dim(d0, len(shape), shape), _wrap_dim(d1, len(shape), shape)

    def _infer(self, shape: Shape, dtype: str) -> tuple[Shape, str]:
        d0, d1 = self._resolve(shape)
        out = list(shape)
        if out:
            out[d0], out[d1] = out[d1], out[d0]
        return tuple(out), dtype

    def _apply(self, tensor: Any, allow_copy: bool) -> Any:
        d0, d1 = self._resolve(tuple(tensor.shape))
        return tensor.transpose(d0, d1)


@dataclass(frozen=True)
class Permute(Step):
    dims: tuple[int, ...]
    name: ClassVar[str] = "permute"
    is_view: ClassVar[bool] = True

    def spec(self) -> str:
        return f"permute({_fmt_args(self.dims)})"

    def _resolve(self, shape: Shape) -> tuple[int, ...]:
        rank = len(shape)
        if len(self.dims) != rank:
            raise _StepError(
                f"expects {len(self.dims)} dims, got a tensor of shape {shape_text(shape)}",
                hint="permute lists every dim of its input once",
            )
        dims = tuple(_wrap_dim(d, rank, shape) for d in self.dims)
        if sorted(dims) != list(range(rank)):
            repeated = sorted({d for d in dims if dims.count(d) > 1})
            raise _StepError(
                f"dims {shape_text(self.dims)} are not a permutation of 0..{rank - 1} "
                f"(repeated: {', '.join(map(str, repeated))}) for a tensor of shape "
                f"{shape_text(shape)}"
            )
        return dims

    def _infer(self, shape: Shape, dtype: str) -> tuple[Shape, str]:
        return tuple(shape[d] for d in self._resolve(shape)), dtype

    def _apply(self, tensor: Any, allow_copy: bool) -> Any:
        return tensor.permute(self._resolve(tuple(tensor.shape)))


@dataclass(frozen=True)
class Reshape(Step):
    shape: tuple[int, ...]
    name: ClassVar[str] = "reshape"
    is_view: ClassVar[bool] = True

    def spec(self) -> str:
        return f"reshape({_fmt_args(self.shape)})"

    def _infer(self, shape: Shape, dtype: str) -> tuple[Shape, str]:
        target = self.shape
        n = _numel(shape)
        wanted = shape_text(target)
        if any(d < -1 for d in target) or target.count(-1) > 1:
            raise _StepError(f"invalid target shape {wanted}: sizes must be >= 0, with at most one -1")
        known = _numel(tuple(d for d in target if d != -1))
        if -1 in target:
            if known == 0:
                if n == 0:
                    raise _StepError(
                        f"cannot reshape a tensor of shape {shape_text(shape)} (0 elements) "
                        f"into {wanted}: the -1 is ambiguous next to a 0",
                        hint="spell out every size for an empty tensor",
                    )
                raise _StepError(
                    f"cannot reshape a tensor of shape {shape_text(shape)} ({_elements(n)}) into {wanted} (0 elements)"
                )
            if n % known:
                raise _StepError(
                    f"cannot reshape a tensor of shape {shape_text(shape)} ({_elements(n)}) "
                    f"into {wanted}: {n} is not a multiple of {known}"
                )
            out = tuple(n // known if d == -1 else d for d in target)
        else:
            if known != n:
                raise _StepError(
                    f"cannot reshape a tensor of shape {shape_text(shape)} ({_elements(n)}) "
                    f"into {wanted} ({_elements(known)})"
                )
            out = target
        return out, dtype

    def _apply(self, tensor: Any, allow_copy: bool) -> Any:
        out, _ = self._infer(tuple(tensor.shape), "")
        try:
            return tensor.view(out)
        except RuntimeError:
            if allow_copy:
                return tensor.reshape(out)
            raise _StepError(
                f"a tensor of shape {shape_text(tuple(tensor.shape))} with strides "
                f"{shape_text(tuple(tensor.stride()))} cannot be viewed as {shape_text(out)} "
                "without a copy",
                hint="a tie needs a view: reshape before transposing or slicing, or copy instead of tie",
            ) from None


@dataclass(frozen=True)
class Slice(Step):
    """``slice(dim,start,stop)``; ``stop=None`` runs to the end."""

    dim: int
    start: int = 0
    stop: int | None = None
    name: ClassVar[str] = "slice"
    is_view: ClassVar[bool] = True

    def spec(self) -> str:
        args = (self.dim, self.start) if self.stop is None else (self.dim, self.start, self.stop)
        return f"slice({_fmt_args(args)})"

    def _resolve(self, shape: Shape) -> tuple[int, int, int]:
        if not shape:
            raise _StepError("cannot slice a 0-d tensor")
        dim = _wrap_dim(self.dim, len(shape), shape)
        size = shape[dim]

        def bound(value: int, what: str) -> int:
            if not -size <= value <= size:
                raise _StepError(
                    f"{what} {value} is out of range for dim {dim} of size {size} of a tensor "
                    f"of shape {shape_text(shape)} (expected {-size}..{size})"
                )
            return value + size if value < 0 else value

        start = bound(self.start, "start")
        stop = size if self.stop is None else bound(self.stop, "stop")
        return dim, start, max(0, stop - start)

    def _infer(self, shape: Shape, dtype: str) -> tuple[Shape, str]:
        dim, _, length = self._resolve(shape)
        out = list(shape)
        out[dim] = length
        return tuple(out), dtype

    def _apply(self, tensor: Any, allow_copy: bool) -> Any:
        dim, start, length = self._resolve(tuple(tensor.shape))
        return tensor.narrow(dim, start, length)


@dataclass(frozen=True)
class Cast(Step):
    dtype: str  # torch name without prefix
    name: ClassVar[str] = "cast"
    is_view: ClassVar[bool] = False

    def spec(self) -> str:
        return f"cast({self.dtype})"

    def _infer(self, shape: Shape, dtype: str) -> tuple[Shape, str]:
        return shape, self.dtype

    def _apply(self, tensor: Any, allow_copy: bool) -> Any:
        return tensor.to(dtypes.torch_dtype(self.dtype), copy=True)


# Floating types narrower than float32 are scaled in float32 and rounded back.
_WIDE_FLOATS = frozenset({"float32", "float64"})


@dataclass(frozen=True)
class Scale(Step):
    factor: float
    name: ClassVar[str] = "scale"
    is_view: ClassVar[bool] = False

    def spec(self) -> str:
        return f"scale({float(self.factor)!r})"

    def _infer(self, shape: Shape, dtype: str) -> tuple[Shape, str]:
        kind = _dtype_kind(dtype)
        if kind == "bool":
            raise _StepError("cannot scale a bool tensor", hint="cast to a floating dtype first")
        if kind in ("int", "uint"):
            if not float(self.factor).is_integer():
                raise _StepError(
                    f"cannot scale a tensor of dtype {dtype} by a non-integer factor {self.factor!r}",
                    hint="cast to a floating dtype first, or use an integer factor",
                )
            if kind == "uint" and self.factor < 0:
                raise _StepError(
                    f"cannot scale a tensor of dtype {dtype} by a negative factor {self.factor!r}",
                    hint="cast to a signed or floating dtype first",
                )
            bounds = _int_range(dtype)
            if bounds is not None and not bounds[0] <= int(self.factor) <= bounds[1]:
                raise _StepError(
                    f"cannot scale a tensor of dtype {dtype} by {self.factor!r}: the factor does not fit "
                    f"{dtype} ({bounds[0]}..{bounds[1]})",
                    hint="cast to a wider or floating dtype first",
                )
        return shape, dtype

    def _apply(self, tensor: Any, allow_copy: bool) -> Any:
        name = _tensor_dtype_name(tensor)
        kind = _dtype_kind(name)
        if kind in ("int", "uint"):
            return tensor * int(self.factor)
        if kind == "complex":
            if name == "complex32":
                return (tensor.to(dtypes.torch_dtype("complex64")) * self.factor).to(tensor.dtype)
            return tensor * self.factor
        if name in _WIDE_FLOATS:
            return tensor * self.factor
        return (tensor.float() * self.factor).to(tensor.dtype)


# ----------------------------------------------------------------------------- parsing

_STEP_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)
_NAMES = ("same", "transpose", "permute", "reshape", "slice", "cast", "scale")


def _split_args(raw: str | None) -> list[str]:
    if raw is None or not raw.strip():
        return []
    return [a.strip() for a in raw.split(",")]


def _arity(name: str, args: list[str], counts: tuple[int, ...], usage: str) -> None:
    if len(args) not in counts:
        raise _StepError(
            f"{name} takes {' or '.join(map(str, counts))} argument{'' if counts == (1,) else 's'}, got {len(args)}",
            hint=f"write {usage}",
        )


def _no_empty(args: list[str]) -> None:
    for i, a in enumerate(args, 1):
        if not a:
            raise _StepError(f"argument {i} is empty")


def _optional_int(text: str, position: int, what: str) -> int | None:
    if text == "" or text.lower() == "none":
        return None
    return _parse_int(text, position, what)


def _build(name: str, args: list[str]) -> Step:
    if name == "same":
        _arity(name, args, (0,), "same")
        return Same()
    if name == "transpose":
        _arity(name, args, (0, 2), "transpose or transpose(d0,d1)")
        _no_empty(args)
        if not args:
            return Transpose()
        d0, d1 = _parse_ints(args, "dim")
        return Transpose((d0, d1))
    if name in ("permute", "reshape") and len(args) > MAX_DIMS:
        raise _StepError(f"{name} takes at most {MAX_DIMS} arguments (a tensor has at most {MAX_DIMS} dims)")
    if name == "permute":
        _no_empty(args)
        return Permute(_parse_ints(args, "dim"))
    if name == "reshape":
        _no_empty(args)
        return Reshape(_parse_ints(args, "size"))
    if name == "slice":
        _arity(name, args, (2, 3), "slice(dim,start,stop) or slice(dim,start)")
        if not args[0]:
            raise _StepError("argument 1 (dim) is empty")
        dim = _parse_int(args[0], 1, "dim")
        start = _optional_int(args[1], 2, "start")
        stop = _optional_int(args[2], 3, "stop") if len(args) == 3 else None
        return Slice(dim, 0 if start is None else start, stop)
    if name == "cast":
        _arity(name, args, (1,), "cast(DTYPE), e.g. cast(bfloat16)")
        entry = dtypes.lookup(args[0])
        if entry is None:
            raise _StepError(f"unknown dtype {args[0]!r}; valid dtypes: {_valid_dtype_names()}")
        return Cast(entry.name)
    if name == "scale":
        _arity(name, args, (1,), "scale(FACTOR), e.g. scale(0.5)")
        try:
            factor = float(args[0])
        except ValueError:
            raise _StepError(f"argument 1 (factor) must be a number, got {args[0]!r}") from None
        if not math.isfinite(factor):
            raise _StepError(f"factor must be finite, got {args[0]!r}")
        return Scale(factor)
    close = difflib.get_close_matches(name, _NAMES, n=1)
    raise _StepError(
        f"unknown step {name!r}; valid steps: {', '.join(_NAMES)}",
        hint=f"did you mean {close[0]!r}?" if close else None,
    )


def _parse_one(text: Any, index: int | None) -> Step:
    if isinstance(text, Step):
        return text
    if not isinstance(text, str):
        raise TransformError(
            f"{'step' if index is None else f'step {index}'}: a step spec must be a string, got {type(text).__name__}"
        )
    try:
        return _parse_short(text) if len(text) <= _CACHED_SPEC_CHARS else _parse_text(text)
    except _StepError as err:
        raise _raise(" ".join(text.split()), index, err) from None


_CACHED_SPEC_CHARS = 64  # specs this short are parsed once per process: alias chains repeat them


def _parse_text(text: str) -> Step:
    match = _STEP_RE.match(text)
    if not text.strip():
        raise _StepError("empty step spec", hint="write e.g. transpose or cast(bfloat16)")
    if match is None or "(" in (match.group(2) or "") or ")" in (match.group(2) or ""):
        raise _StepError(
            "cannot parse; expected NAME or NAME(ARG,...), e.g. permute(2,0,1)"
            + ("; use parse() for a chain" if "->" in text else "")
        )
    return _build(match.group(1).lower(), _split_args(match.group(2)))


_parse_short = functools.lru_cache(maxsize=4096)(_parse_text)  # steps are frozen: sharing them is safe


def parse_step(text: str) -> Step:
    """Parse one step spec, e.g. ``"permute(2,0,1)"``. Raises ``TransformError``."""
    return _parse_one(text, None)


def chain_text(specs: Iterable[str]) -> str:
    """Step specs as ``str(transform)`` writes them: ``"transpose -> cast(bfloat16)"``, or
    ``"same"`` for none (for chains already held as specs, e.g. in JSON or alias records)."""
    return " -> ".join(specs) or "same"


def parse(specs: Any) -> Transform:
    """Parse a chain: ``None``/``[]`` (identity), a string, or an iterable of strings (or
    ``Step`` objects), one step each. A string may also hold a whole chain written as
    ``str(transform)`` does (``"transpose -> cast(bfloat16)"``). A ``Transform`` is
    returned as is."""
    if specs is None:
        return IDENTITY
    if isinstance(specs, Transform):
        return specs
    if isinstance(specs, (str, Step)):
        specs = [specs]
    try:
        items = list(specs)
    except TypeError:
        raise TransformError(f"a transform is a string or a list of step strings, got {type(specs).__name__}") from None
    texts: list[Any] = []
    for item in items:
        if isinstance(item, str) and "->" in item:
            texts.extend(item.split("->"))
        else:
            texts.append(item)
    return Transform(tuple(_parse_one(t, i) for i, t in enumerate(texts, 1)))


# ----------------------------------------------------------------------------- chains


@dataclass(frozen=True)
class Transform:
    """An ordered chain of steps; ``Transform(())`` is the identity."""

    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        for s in steps:
            if not isinstance(s, Step):
                raise TransformError(f"a transform holds Step objects, got {type(s).__name__}")
        object.__setattr__(self, "steps", tuple(s for s in steps if not isinstance(s, Same)))

    def specs(self) -> list[str]:
        """Canonical step specs, ``[]`` for the identity (the alias metadata form)."""
        return [s.spec() for s in self.steps]

    @property
    def is_identity(self) -> bool:
        return not self.steps

    @property
    def is_view(self) -> bool:
        """True when every step is a view step (a tie may use it)."""
        return all(s.is_view for s in self.steps)

    def tie_problem(self) -> str | None:
        """Why a tie cannot take this chain, or None: THE rule "a tie takes view steps only"
        (files, recipes and live modules all ask it here)."""
        if self.is_view:
            return None
        bad = ", ".join(s.spec() for s in self.steps if not s.is_view)
        return f"a tie takes view steps only ({VIEW_STEPS}); {bad} would need a copy"

    def infer(self, shape: tuple[int, ...], dtype: str) -> tuple[tuple[int, ...], str]:
        """Output shape and dtype of the whole chain; no data touched."""
        try:
            cur_shape, cur_dtype = _check_shape(shape), _resolve_dtype(dtype)
        except _StepError as err:
            raise TransformError(f"transform '{self}': {err.message}") from None
        for i, step in enumerate(self.steps, 1):
            cur_shape, cur_dtype = step._infer_at(cur_shape, cur_dtype, i)
        return cur_shape, cur_dtype

    def apply(self, tensor: Any, *, allow_copy: bool | None = None) -> Any:
        """Apply the chain to a ``torch.Tensor`` (any device). The whole chain is checked
        against the tensor's shape before any data is touched.

        ``allow_copy`` (default: true unless the chain is view-only) lets ``reshape`` copy
        a tensor that cannot be viewed; a tie must leave it false, a copy may set it."""
        if allow_copy is None:
            allow_copy = not self.is_view
        if not hasattr(tensor, "shape") or not hasattr(tensor, "dtype"):
            raise TransformError(f"transform '{self}': expects a torch.Tensor, got {type(tensor).__name__}")
        # Validate everything first, tolerating dtypes outside wsurgery's table.
        cur_shape, cur_dtype = tuple(tensor.shape), _tensor_dtype_name(tensor)
        for i, step in enumerate(self.steps, 1):
            try:
                cur_shape, cur_dtype = step._checked(cur_shape, cur_dtype)
            except _StepError as err:
                raise _raise(step.spec(), i, err) from None
        out = tensor
        for i, step in enumerate(self.steps, 1):
            out = step._apply_at(out, i, allow_copy)
        return out

    def then(self, other: Transform | Any) -> Transform:
        """``self`` first, then ``other`` (anything ``parse`` takes)."""
        return Transform(self.steps + parse(other).steps)

    def __str__(self) -> str:
        return chain_text(self.specs())


IDENTITY = Transform(())
