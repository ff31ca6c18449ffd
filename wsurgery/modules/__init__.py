"""Weight sharing on live ``torch.nn.Module`` objects: copy, tie, freeze, save and load.

This is the API that NeMo 0.x documented for its neural modules, built as documented:

* :func:`get_weights` / :func:`set_weights` copy values. ``get_weights`` returns detached
  clones, so later updates to the module never reach the returned dict (and writing into
  the dict never reaches the module); ``set_weights`` copies into the existing Parameters
  (same objects, same dtype and device), accepts any subset of names, and checks every name
  and shape before it writes anything.
* :func:`tie_weights` makes weights of ``module`` *be* weights of ``other``: one value, one
  gradient, one optimizer state.

  - ``WeightShareTransform.SAME`` (no transform): ``module``'s attribute is replaced by
    ``other``'s ``Parameter`` object, so both modules hold the same Parameter.
  - ``WeightShareTransform.TRANSPOSE`` and every other *view* transform of
    :mod:`wsurgery.transforms` (``transpose(d0,d1)``, ``permute``, ``reshape``, ``slice``):
    a parametrization (:func:`torch.nn.utils.parametrize.register_parametrization`) computes
    ``module``'s weight as a view of ``other``'s one Parameter. Non-view steps (``cast``,
    ``scale``) make a new tensor and are refused for a tie; copy with ``set_weights``.

* :func:`freeze` / :func:`unfreeze` switch ``requires_grad``; :func:`tied_weights` lists the
  ties inside one module; :func:`save_module` / :func:`load_module` write and read
  safetensors that store each tied weight once and record its ties, so that loading
  re-creates them.
* :class:`WeightSharing` is a mixin giving an ``nn.Module`` subclass NeMo's method names.

Names are the dotted names of ``named_parameters()``, with one change: a parametrized
weight is named as its attribute (``head.weight``), never by torch's internal
``head.parametrizations.weight.original``, so a module keeps its names whether or not it
is tied. Names that reach one tensor under two module paths (a shared submodule, a SAME
tie) are all listed, as ``named_parameters(remove_duplicate=False)`` does.

Invariants of a tied view
-------------------------
A weight ``owner.<attr>`` tied with a view transform ``T`` to a source Parameter ``S``
(the name ``<alias>`` below) satisfies, from the moment :func:`tie_weights` returns:

1. ``owner.parametrizations[attr]`` is a ``ParametrizationList`` holding exactly one
   parametrization, a :class:`TiedView` that records ``T`` and the alias's shape.
2. ``owner.parametrizations[attr].original is S``: the source Parameter object itself, not
   a copy and not a second Parameter over the same storage. ``module.parameters()``
   therefore yields ``S`` (deduplicated against ``other.parameters()`` by identity, as torch
   does for any shared Parameter), gradients of a loss on either side accumulate in
   ``S.grad``, and an optimizer keeps a single state for it.
3. ``TiedView.forward(S) == T(S)`` is a view of ``S`` (it shares ``S``'s storage) with the
   recorded shape, and ``S``'s dtype and device. The values therefore always agree, with no
   copy, and converting either module (``.to()``, ``.half()``, ``.cuda()``) keeps the tie.

``S`` is always a *root*: a plain Parameter of its owner, never itself a tied view. Tying
to a tied weight composes the transforms onto that weight's root. Breaking the invariants
from outside (appending a parametrization, replacing ``original``, resizing ``S`` in place)
is detected where ties are used (the parametrization's forward, :func:`tied_weights`,
:func:`save_module`) and reported as a ``SurgeryError`` that prints both values.

``TiedView`` has no ``right_inverse``: ``owner.weight = tensor`` on a tied weight is refused
by torch (it would otherwise replace the source's storage). Write values with
:func:`set_weights`, which writes through the view into the source, or untie first with
:func:`untie_weights`.

A tie is made after the module is built and before its optimizer is: SAME replaces the
Parameter object an optimizer created earlier would hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .persistence import LoadResult, load_module, save_module
from .slots import TiedView, WeightShareTransform
from .ties import tie_weights, tied_weights, untie_weights
from .weights import freeze, get_weights, set_weights, unfreeze

__all__ = [
    "LoadResult",
    "TiedView",
    "WeightShareTransform",
    "WeightSharing",
    "freeze",
    "get_weights",
    "load_module",
    "save_module",
    "set_weights",
    "tie_weights",
    "tied_weights",
    "unfreeze",
    "untie_weights",
]


# ----------------------------------------------------------------------------- the mixin


class WeightSharing:
    """Mixin for ``nn.Module`` subclasses: NeMo's weight-sharing methods.

    ``class Decoder(WeightSharing, nn.Module): ...`` gains ``get_weights()``,
    ``set_weights(weights)``, ``tie_weights_with(module, weight_names,
    name2name_and_transform)``, ``untie_weights(names)``, ``tied_weights()``,
    ``freeze(names)`` and ``unfreeze(names)``, which call this module's functions.
    """

    def get_weights(self) -> dict[str, torch.Tensor]:
        return get_weights(self)  # type: ignore[arg-type]

    def set_weights(self, weights: Mapping[str, Any]) -> None:
        set_weights(self, weights)  # type: ignore[arg-type]

    def tie_weights_with(
        self,
        module: nn.Module,
        weight_names: Iterable[str] | str | None = None,
        name2name_and_transform: Mapping[str, Any] | None = None,
    ) -> None:
        tie_weights(self, module, weight_names, name2name_and_transform)  # type: ignore[arg-type]

    def untie_weights(self, names: Iterable[str] | str | None = None) -> list[str]:
        return untie_weights(self, names)  # type: ignore[arg-type]

    def tied_weights(self) -> dict[str, tuple[str, list[str]]]:
        return tied_weights(self)  # type: ignore[arg-type]

    def freeze(self, names: Iterable[str] | str | None = None) -> None:
        freeze(self, names)  # type: ignore[arg-type]

    def unfreeze(self, names: Iterable[str] | str | None = None) -> None:
        unfreeze(self, names)  # type: ignore[arg-type]
