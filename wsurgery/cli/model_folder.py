"""What ``inspect`` says about a model folder: its config's ``tie_word_embeddings`` against
the file's head and embedding (warnings on stderr), and the files a folder output carries."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .text import safe

if TYPE_CHECKING:
    from ..inspection import Inspection


def print_report(con, found: Inspection) -> None:
    """The folder's config line, the files an output carries, and warnings on stderr."""
    if found.files is None:
        return
    report = found.ties
    if report is not None:
        value = report.config_value
        said = "not set (true by default)" if value is None else str(value).lower()
        model = (found.config or {}).get("model_type")
        state = {
            "tied": f"{report.head} is tied to {report.embedding}",
            "stored": f"{report.head} is stored",
            "alias": f"{report.head} is an alias",
            "absent": f"no {report.head}",
        }[report.file]
        if report.equal is not None:
            state += " (values equal to the embedding's)" if report.equal else " (values differ from the embedding's)"
        kind = f"model_type={model}, " if isinstance(model, str) else ""
        con.print(safe(f"config.json: {kind}tie_word_embeddings={said}; {state}"), markup=False)
    if found.files:
        con.print(safe(f"other files (carried by a folder output): {', '.join(found.files)}"), markup=False)
    for line in found.warnings:
        sys.stderr.write(f"warning: {safe(line)}\n")
