"""The fast path (``wsurgery.cli.fastpath``) against click, its oracle.

A command line the fast path accepts must be one click accepts, and the command must get
exactly the keyword arguments typer would give it (values and types). Command lines are
generated from each command's own vocabulary (its options, short names, ``--opt=value``
forms, positional values) with noise (unknown options, ``--``, ``-h``, values starting
with ``-``, numbers that do not parse or are out of range, repeated options, flags given
a value, paths click refuses). Typer builds its command from the very declarations the
fast path reads, so the click parameters must also be those of the snapshot taken while
the commands declared them with typer's objects.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import shlex
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.click_params import snapshot
from tests.project.test_readme import _command_examples
from wsurgery.cli import app as app_module
from wsurgery.cli.app import COMMANDS, command_function
from wsurgery.cli.fastpath import parse, table

HERE = Path(__file__).resolve().parent


def test_typer_sees_the_click_parameters_it_always_saw():
    """Every command's click parameters (names, option strings, flags, types, defaults,
    help, metavars, ...) as the snapshot holds them."""
    expected = json.loads((HERE / "click_params.json").read_text())
    got = json.loads(json.dumps(snapshot()))
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name


# --- click, recording what the command would be called with -------------------------------


class Recorded:
    """The keyword arguments a command was called with, one dict a call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []


@functools.cache
def _click_command(name: str):
    """The typer-built command of ``name`` whose function records its keyword arguments."""
    fn = command_function(name)
    recorded = Recorded()

    @functools.wraps(fn)  # the same signature (``__wrapped__``, ``__signature__``)
    def recorder(**kwargs):
        recorded.calls.append(kwargs)
        return 0

    real = app_module.command_function
    app_module.command_function = lambda n: recorder if n == name else real(n)
    try:
        group = typer.main.get_command(app_module.build_app([name]))
    finally:
        app_module.command_function = real
    return group, recorded


def click_kwargs(name: str, args: list[str]) -> dict | None:
    """What typer calls command ``name`` with for ``args``; None where click refuses them
    (or prints help)."""
    group, recorded = _click_command(name)
    recorded.calls.clear()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            group.main(args=[name, *args], prog_name="wsurgery", standalone_mode=False)
        except typer.Exit:
            pass
        except Exception as exc:  # click's usage errors
            if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
                raise
    assert len(recorded.calls) <= 1
    return recorded.calls[0] if recorded.calls else None


def typed(value):
    """A value with its type spelled out (``1`` and ``1.0``, ``'a'`` and ``Path('a')``
    differ; NaN equals NaN)."""
    if isinstance(value, list):
        return ["list", [typed(v) for v in value]]
    if isinstance(value, tuple):
        return ["tuple", [typed(v) for v in value]]
    if isinstance(value, float) and math.isnan(value):
        return ["float", "nan"]
    return [type(value).__name__, repr(value)]


def assert_agrees(name: str, args: list[str]) -> bool:
    """Whether the fast path took ``args``; when it did, click took them too, with the same
    keyword arguments."""
    fast = parse(command_function(name), list(args))
    if fast is None:
        return False
    clicked = click_kwargs(name, list(args))
    assert clicked is not None, f"fast path accepted what click refuses: {name} {shlex.join(args)}"
    assert {k: typed(v) for k, v in fast.items()} == {k: typed(v) for k, v in clicked.items()}, (
        f"{name} {shlex.join(args)}"
    )
    return True


# --- the vocabulary of a command --------------------------------------------------------


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """Paths for path values: a file, a folder, one that does not exist."""
    root = tmp_path_factory.mktemp("fastpath")
    (root / "m.safetensors").write_bytes(b"")
    (root / "folder").mkdir()
    return {"file": str(root / "m.safetensors"), "folder": str(root / "folder"), "missing": str(root / "no.pt")}


def _values(param, places: dict[str, str], noisy: bool) -> st.SearchStrategy[str]:
    kind = type(param.type).__name__
    noise = st.sampled_from(["-x", "--json", "-", "", "-1", "x=y", "--"])
    if "Int" in kind:
        good = st.integers(-5, 70).map(str) | st.sampled_from([" 2", "1_0", "+3", "07"])
        bad = st.sampled_from(["1.5", "x", "", "1e3", "nan", " -1"])
    elif "Float" in kind:
        good = st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr) | st.sampled_from(
            ["0", "1e-3", "2", " 0.5", "nan", "inf", "1_0.5", "0.0"]
        )
        bad = st.sampled_from(["x", "", "1,5", "-0.5", "-1e-9", "-inf", " -0.5", "\t-1"])  # " -1": float() takes it
    elif "Path" in kind:
        good = st.sampled_from([*places.values(), "out/", "a b.pt", "ü.safetensors", "x=y.pt"])
        bad = st.sampled_from(["", "-"])
    else:
        good = st.sampled_from(["a", "layers.0.weight", "layers.{i}.w", "ü", "a b", "x=y", "0", "auto", "cuda:1"])
        bad = st.sampled_from(["", "*.weight"])
    return st.one_of(good, good, good, bad, noise) if noisy else good


@st.composite
def command_lines(draw, name: str, places: dict[str, str]) -> list[str]:
    """A command line of ``name``: its arguments and a random choice of its options, in a
    random order, each option in one of its spellings; half of them with noise."""
    group, _ = _click_command(name)
    cmd = group.commands[name]
    noisy = draw(st.booleans())
    units: list[list[str]] = []
    for p in cmd.params:
        values = _values(p, places, noisy)
        if p.param_type_name == "argument":
            fixed = [1, 1, 1, 1, 0, 2] if noisy else [1]
            count = draw(st.integers(0, 3)) if p.nargs == -1 else draw(st.sampled_from(fixed))
            units += [[draw(values)] for _ in range(count)]
            continue
        if not (p.required or draw(st.booleans())):
            continue
        repeats = draw(st.integers(1, 3)) if p.multiple else draw(st.sampled_from([1, 1, 1, 1, 1, 2] if noisy else [1]))
        for _ in range(repeats):
            if p.is_flag:
                opt = draw(st.sampled_from(p.opts + p.secondary_opts))
                units.append([f"{opt}={draw(values)}"] if noisy and not draw(st.integers(0, 4)) else [opt])
                continue
            opt = draw(st.sampled_from(p.opts))
            value = draw(values)
            forms = ["apart", "apart", "equals", "attached", "last"] if noisy else ["apart", "equals"]
            form = draw(st.sampled_from(forms))
            if form == "equals":
                units.append([f"{opt}={value}"])
            elif form == "attached":
                units.append([opt + value])
            elif form == "last":
                units.append([opt])  # no value after it when it ends the line
            else:
                units.append([opt, value])
    noise = st.sampled_from(["--", "-h", "--help", "--bogus", "-qf", "-fq", "-", "--jso", "--no-json", "--src="])
    units += [[draw(noise)] for _ in range(draw(st.sampled_from([0, 1, 2] if noisy else [0])))]
    order = draw(st.permutations(range(len(units))))
    return [token for i in order for token in units[i]]


@pytest.mark.parametrize("name", list(COMMANDS))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_what_the_fast_path_takes_click_takes_with_the_same_arguments(name, places, data):
    args = data.draw(command_lines(name, places), label="args")
    assert_agrees(name, args)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_fast_path_takes_the_usual_command_lines(name, places):
    """Not a fast path that declines everything: a line of the command's required
    parameters, each option once, is taken (and agrees with click)."""
    group, _ = _click_command(name)
    args: list[str] = []
    for p in group.commands[name].params:
        kind = type(p.type).__name__
        value = places["file"] if "Path" in kind else "1" if "Int" in kind or "Float" in kind else "a"
        if p.param_type_name == "argument":
            args += [value] * (2 if p.nargs == -1 else 1)
        elif p.is_flag:
            args.append(p.opts[0])
        else:
            args += [p.opts[-1], value]
    assert assert_agrees(name, args), shlex.join([name, *args])


def test_every_readme_example_takes_the_fast_path():
    """The command lines users copy run without typer, with click's arguments."""
    examples = [shlex.split(line)[1:] for line in _command_examples()]
    assert len(examples) >= 30
    declined = [shlex.join(args) for args in examples if not assert_agrees(args[0], args[1:])]
    assert not declined, declined


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("inspect", ["m.safetensors", "-h"]),
        ("inspect", ["--help", "m.safetensors"]),
        ("inspect", ["m.safetensors", "--bogus"]),
        ("inspect", ["m.safetensors", "--jso"]),  # an abbreviation
        ("inspect", ["m.safetensors", "--json=1"]),  # a flag given a value
        ("inspect", ["m.safetensors", "--json", "--json"]),
        ("inspect", ["--", "m.safetensors"]),
        ("inspect", ["-", "m.safetensors"]),
        ("inspect", []),
        ("inspect", ["a", "b"]),
        ("diff", ["a", "b", "--atol", "-1"]),
        ("diff", ["a", "b", "--atol", "x"]),
        ("diff", ["a", "b", "--rtol", " -1"]),  # no leading "-", still negative
        ("diff", ["a", "b", "-qf"]),
        ("diff", ["a", "b", "--filter", "-x"]),
        ("tie", ["m.pt", "--src", "a"]),  # --dst is required
        ("tie", ["m.pt", "--src", "a", "--dst", "b", "-ob.pt"]),
        ("tie", ["m.pt", "--src", "a", "--dst", "b", "-o=b.pt"]),
        ("split", ["m.pt", "--src", "a", "--dst", "b", "--sizes", "1", "--dim", "1.5"]),
        ("merge", []),
    ],
)
def test_it_declines_what_it_is_not_sure_of(name, args):
    assert parse(command_function(name), args) is None


def test_a_path_click_refuses_is_declined(places):
    """``--html`` takes no folder: an existing folder there is click's error."""
    assert parse(command_function("diff"), ["a", "b", "--html", places["folder"]]) is None
    assert parse(command_function("diff"), ["a", "b", "--html", places["missing"]]) is not None


def test_the_table_is_typers_reading_of_the_declarations():
    """Each parameter as the fast path reads it (option strings, flag constants, list,
    required, default) is the click parameter typer made of it."""
    for name in COMMANDS:
        params, options = table(command_function(name))
        group, _ = _click_command(name)
        click_params = group.commands[name].params
        assert [p.name for p in params] == [p.name for p in click_params], name
        for ours, theirs in zip(params, click_params, strict=True):
            assert ours.option == (theirs.param_type_name == "option"), (name, ours.name)
            assert ours.required == theirs.required, (name, ours.name)
            assert ours.many == (theirs.multiple or theirs.nargs == -1), (name, ours.name)
            assert (ours.kind is bool) == bool(getattr(theirs, "is_flag", False)), (name, ours.name)
            if ours.option:
                mine = sorted(o for o, (p, _) in options.items() if p is ours)
                assert mine == sorted(theirs.opts + theirs.secondary_opts), (name, ours.name)
            if not ours.required:
                assert ours.default == theirs.default, (name, ours.name)


def test_shell_completion_and_odd_arguments_are_typers(monkeypatch):
    from wsurgery.cli.app import _run_fast

    monkeypatch.setenv("_WSURGERY_COMPLETE", "bash_source")
    assert _run_fast(["inspect", "m.safetensors"]) is None
    monkeypatch.delenv("_WSURGERY_COMPLETE")
    assert _run_fast(["inspect", Path("m.safetensors")]) is None  # type: ignore[list-item]
    assert _run_fast(["inspec", "m.safetensors"]) is None
