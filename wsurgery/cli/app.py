"""The typer application: one module per command, registered here."""

from __future__ import annotations

import signal

import typer

from . import convert, copy, inspect_cmd, tie, untie

app = typer.Typer(
    name="wsurgery",
    help="Weight surgery on PyTorch checkpoints: inspect, tie, copy, diff and convert, safely.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("inspect")(inspect_cmd.inspect)
app.command("tie")(tie.tie)
app.command("copy")(copy.copy)
app.command("untie")(untie.untie)
app.command("convert")(convert.convert)


def main() -> None:
    # A file-size limit must surface as an error on write (EFBIG, exit 5), not kill us.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    app()
