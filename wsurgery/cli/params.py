"""The commands' parameters as data, without typer.

A command declares each parameter as ``Annotated[T, Opt("--name", "-n", help=...)]`` or
``Annotated[T, Arg(metavar=..., help=...)]``: :class:`Opt` and :class:`Arg` hold exactly
the arguments ``typer.Option`` and ``typer.Argument`` take, and nothing else. Two readers
use them:

- :func:`for_typer` gives typer the command with each declaration made the typer object it
  stands for, so typer (click) builds the very parameters it always did: help screens and
  every usage error are typer's;
- :mod:`wsurgery.cli.fastpath` runs a well-formed command line without importing typer.
"""

from __future__ import annotations

from typing import Any


class _Declaration:
    """A parameter's declaration: option names and typer's keyword arguments, frozen."""

    __slots__ = ("decls", "kwargs")
    decls: tuple[str, ...]
    kwargs: dict[str, Any]

    def __init__(self, *decls: str, **kwargs: Any) -> None:
        object.__setattr__(self, "decls", decls)
        object.__setattr__(self, "kwargs", kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __repr__(self) -> str:
        said = [repr(d) for d in self.decls] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{type(self).__name__}({', '.join(said)})"


class Opt(_Declaration):
    """An option: ``typer.Option(*decls, **kwargs)``."""

    __slots__ = ()

    def typer(self):
        import typer

        return typer.Option(*self.decls, **self.kwargs)


class Arg(_Declaration):
    """A positional argument: ``typer.Argument(**kwargs)``."""

    __slots__ = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def typer(self):
        import typer

        return typer.Argument(**self.kwargs)


def declaration(annotation: Any) -> tuple[Any, _Declaration | None]:
    """``(T, its Opt or Arg)`` of ``Annotated[T, Opt(...)]``; ``(annotation, None)`` for a
    plain annotation. More than one declaration is refused, as typer refuses it."""
    metadata = getattr(annotation, "__metadata__", None)
    if metadata is None:
        return annotation, None
    found = [m for m in metadata if isinstance(m, _Declaration)]
    if len(found) > 1:
        raise TypeError(f"more than one declaration in {annotation!r}")
    return annotation.__origin__, (found[0] if found else None)


def for_typer(fn):
    """``fn`` as typer's callback: its signature with each :class:`Opt` or :class:`Arg` made
    the ``typer.Option`` or ``typer.Argument`` it stands for; the exit code ``fn`` returns
    raised as ``typer.Exit`` (so the code holds in click's standalone mode too)."""
    import functools
    import inspect
    from typing import Annotated

    import typer

    sig = inspect.signature(fn, eval_str=True)
    params = []
    for p in sig.parameters.values():
        annotation = p.annotation
        metadata = getattr(annotation, "__metadata__", None)
        if metadata is not None and any(isinstance(m, _Declaration) for m in metadata):
            made = tuple(m.typer() if isinstance(m, _Declaration) else m for m in metadata)
            annotation = Annotated[(annotation.__origin__, *made)]
        params.append(p.replace(annotation=annotation))

    @functools.wraps(fn)
    def callback(*args, **kwargs):
        raise typer.Exit(fn(*args, **kwargs) or 0)

    callback.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return callback
