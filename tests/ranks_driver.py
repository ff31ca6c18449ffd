"""One rank of a multi-process test: runs wsurgery commands in this process, one after the
other, as ``torchrun`` would run one each (every command joins the process group from
the environment and leaves it), and records what each printed and returned.

    python tests/ranks_driver.py COMMANDS.json RESULTS_PREFIX

COMMANDS.json: a list of argument lists. Writes RESULTS_PREFIX.<rank>.json: a list of
``{"argv", "code", "stdout", "stderr"}``. One interpreter per rank for many commands:
torch is imported once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys


def main(commands_path: str, prefix: str) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import typer.main

    from wsurgery.cli.app import app

    cmd = typer.main.get_command(app)
    with open(commands_path) as f:
        commands = json.load(f)
    results = []
    for argv in commands:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cmd.main(args=argv, prog_name="wsurgery", standalone_mode=False)
        results.append({"argv": argv, "code": code or 0, "stdout": out.getvalue(), "stderr": err.getvalue()})
    with open(f"{prefix}.{os.environ['RANK']}.json", "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    code = main(*sys.argv[1:])
    # Leave as the console script does (os._exit, no interpreter teardown): tearing down the
    # process group kept for the process (its atexit hook) can race with the other rank's
    # gloo threads and abort ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
