"""What the module functions share: tie transforms, the ``TiedView`` parametrization,
the weight slots of a module (names as ``named_parameters`` gives them, a tied weight by
its attribute) and the errors naming them."""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import SurgeryError, TransformError, UnknownNameError
from ..selectors import close_matches
from ..transforms import IDENTITY, Transform
from ..transforms import parse as parse_transform

# ----------------------------------------------------------------------------- transforms


class WeightShareTransform(enum.Enum):
    """How a tied weight is computed from its source (NeMo's enum, values are step specs)."""

    SAME = "same"
    TRANSPOSE = "transpose"

    @classmethod
    def parse(cls, value: Any) -> WeightShareTransform:
        """A member from itself, its name or value in any case (``"SAME"``, ``"transpose"``,
        ``"WeightShareTransform.TRANSPOSE"``) or NeMo's integer values (0, 1)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            members = list(cls)
            if 0 <= value < len(members):
                return members[value]
        elif isinstance(value, str):
            key = value.strip().rsplit(".", 1)[-1].lower()
            for member in cls:
                if key == member.value:
                    return member
        choices = [m.name for m in cls]
        close = difflib.get_close_matches(str(value).upper(), choices, n=1)
        raise TransformError(
            f"unknown weight share transform {value!r}; valid: {', '.join(choices)}",
            hint=f"did you mean {close[0]}?" if close else None,
        )

    def specs(self) -> list[str]:
        """The transform step specs: ``[]`` for SAME, ``["transpose"]`` for TRANSPOSE."""
        return [] if self is WeightShareTransform.SAME else [self.value]

    @property
    def transform(self) -> Transform:
        return parse_transform(self.specs())


def _as_transform(value: Any) -> Transform:
    """A ``WeightShareTransform``, spec string, list of specs or ``Transform`` -> Transform."""
    if value is None:
        return IDENTITY
    if isinstance(value, WeightShareTransform):
        return value.transform
    if isinstance(value, str) and value.strip().lower().startswith("weightsharetransform."):
        return WeightShareTransform.parse(value).transform
    if isinstance(value, int) and not isinstance(value, bool):
        return WeightShareTransform.parse(value).transform
    return parse_transform(value)


# ----------------------------------------------------------------------------- the parametrization


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device:
        return False
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta and other storage-less tensors
        return False


class TiedView(nn.Module):
    """The parametrization of a weight tied with a view transform to a source Parameter.

    ``forward(original)`` returns ``transform(original)``; ``original`` is the source
    Parameter itself (see the module docstring for the invariants). ``source`` is the
    source's name in the module it was tied to, for messages and ``repr`` only. The tied
    weight's dtype and device are the source's (a view has no others), so ``.to()``,
    ``.half()`` or ``.cuda()`` on either module keep the tie.
    """

    def __init__(self, transform: Transform, source: str, shape: tuple[int, ...]):
        super().__init__()
        self.transform = transform
        self.source = source
        self.alias_shape = tuple(shape)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        out = self.transform.apply(original, allow_copy=False)
        if _shape(out) != self.alias_shape:
            raise SurgeryError(
                f"tied weight broken: the source {self.source!r} no longer fits.\n"
                f"tied shape: {self.alias_shape}\n"
                f"{self.transform}(source) shape: {_shape(out)} (source shape {_shape(original)})",
                hint="untie_weights() before changing the source's shape",
            )
        return out

    def specs(self) -> list[str]:
        return self.transform.specs()

    def extra_repr(self) -> str:
        return f"source={self.source!r}, transform='{self.transform}', shape={self.alias_shape}"


# ----------------------------------------------------------------------------- weight slots

_PARAM, _TIE, _PARAMETRIZED = "param", "tie", "parametrized"


@dataclass(frozen=True)
class _Slot:
    """One logical weight: ``owner.<attr>``, reached as ``name`` from the root module."""

    name: str
    owner: nn.Module
    attr: str
    kind: str  # _PARAM: owner._parameters[attr]; _TIE: our TiedView; _PARAMETRIZED: other

    @property
    def key(self) -> tuple[int, str]:
        return id(self.owner), self.attr

    @property
    def plist(self) -> Any:
        return plist_of(self.owner, self.attr)

    @property
    def param(self) -> nn.Parameter:
        """The Parameter of a plain slot, or the source of a tied one."""
        if self.kind == _PARAM:
            param = self.owner._parameters[self.attr]
            assert param is not None  # a plain slot holds a Parameter (see _walk)
            return param
        if self.kind == _TIE:
            return self.plist.original
        raise AssertionError(self.kind)

    @property
    def view(self) -> TiedView:
        return self.plist[0]

    def root(self) -> tuple[nn.Parameter, Transform] | None:
        """``(root Parameter, transform from it)``; None for a foreign parametrization."""
        if self.kind == _PARAM:
            return self.param, IDENTITY
        if self.kind == _TIE:
            return self.param, self.view.transform
        return None

    def value(self) -> torch.Tensor:
        """The weight's current value (a view for a tie; computed for a parametrization)."""
        if self.kind == _PARAM:
            return self.param
        return getattr(self.owner, self.attr)

    def originals(self) -> list[torch.Tensor]:
        """The trainable tensors behind the weight."""
        if self.kind != _PARAMETRIZED:
            return [self.param]
        plist = self.plist
        if plist.is_tensor:
            return [plist.original]
        return [getattr(plist, f"original{i}") for i in range(plist.ntensors)]


def _param(owner: nn.Module, attr: str) -> nn.Parameter:
    """``owner``'s Parameter ``attr``, which the caller knows is there."""
    param = owner._parameters[attr]
    assert param is not None
    return param


def _buffer(owner: nn.Module, attr: str) -> torch.Tensor:
    """``owner``'s buffer ``attr``, which the caller knows is there."""
    buf = owner._buffers[attr]
    assert buf is not None
    return buf


def plist_of(owner: nn.Module, attr: str) -> Any:
    """``owner.parametrizations[attr]`` (a ``ParametrizationList``), typed loosely: torch
    types ``parametrizations`` through ``Module.__getattr__``."""
    return cast(Any, owner).parametrizations[attr]


def _is_tie(owner: nn.Module, attr: str) -> bool:
    plist = plist_of(owner, attr)
    return len(plist) == 1 and isinstance(plist[0], TiedView) and plist.is_tensor


def _walk(module: nn.Module, prefix: str = "") -> Iterator[_Slot]:
    """Every logical weight, in ``named_parameters`` order, duplicates included."""
    for attr, p in module._parameters.items():
        if p is not None:
            yield _Slot(prefix + attr, module, attr, _PARAM)
    parametrized = parametrize.is_parametrized(module)
    if parametrized:
        for attr in cast(Any, module).parametrizations:
            kind = _TIE if _is_tie(module, attr) else _PARAMETRIZED
            yield _Slot(prefix + attr, module, attr, kind)
    for child_name, child in module._modules.items():
        if child is None or (parametrized and child_name == "parametrizations"):
            continue
        yield from _walk(child, f"{prefix}{child_name}.")


def _slots(module: nn.Module) -> dict[str, _Slot]:
    _require_module(module)
    return {s.name: s for s in _walk(module)}


def _walk_buffers(module: nn.Module, prefix: str = "") -> Iterator[_Slot]:
    """Persistent buffers (the ones ``state_dict`` holds), duplicates included."""
    for attr, b in module._buffers.items():
        if b is not None and attr not in module._non_persistent_buffers_set:
            yield _Slot(prefix + attr, module, attr, "buffer")
    parametrized = parametrize.is_parametrized(module)
    for child_name, child in module._modules.items():
        if child is None or (parametrized and child_name == "parametrizations"):
            continue
        yield from _walk_buffers(child, f"{prefix}{child_name}.")


def _require_module(module: Any) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")


def _describe(module: nn.Module) -> str:
    return parametrize.type_before_parametrizations(module).__name__


# ----------------------------------------------------------------------------- errors


def _unknown(name: str, known: Iterable[str], where: str) -> str:
    close = close_matches(known, name)
    text = f"no weight {name!r} in {where}"
    if close:
        text += f" (did you mean {', '.join(repr(c) for c in close)}?)"
    return text


def _raise_problems(action: str, unknown: list[str], misfit: list[str], hint: str | None = None) -> None:
    """One error listing every problem: ``SurgeryError`` when any is a misfit, else
    ``UnknownNameError``. The problems are also on the error as ``.problems``."""
    problems = unknown + misfit
    if not problems:
        return
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    text = f"{action}: {count}: " + "; ".join(problems)
    if misfit:
        raise SurgeryError(text, problems=problems, hint=hint)
    err = UnknownNameError(
        unknown[0],
        message=text,
        hint=hint or "names are those of named_parameters(); parametrized weights by their attribute",
    )
    err.problems = problems  # type: ignore[attr-defined]
    raise err
