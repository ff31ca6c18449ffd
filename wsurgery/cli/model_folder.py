"""What ``inspect`` says about a model folder: its config's ``tie_word_embeddings`` against
the file's head and embedding (warnings on stderr), and what a folder output carries."""

from __future__ import annotations

import sys

from ..model import Checkpoint
from .common import safe


def tie_report(c: Checkpoint):
    """The ``wsurgery.io.hf_config.TieReport`` of a Hugging Face folder, or None for anything else."""
    folder = c.model_folder
    if folder is None or folder.config is None:
        return None
    from ..io.hf_config import check_ties

    return check_ties(c, folder.config)


def json_keys(c: Checkpoint, report) -> dict:
    """``config`` (null unless a Hugging Face folder), ``files`` and ``warnings`` for --json."""
    folder = c.model_folder
    if folder is None:
        return {}
    out: dict = {"files": list(folder.files)}
    if report is not None:
        config = folder.config
        out["config"] = {
            "model_type": config.get("model_type"),
            "architectures": config.get("architectures"),
            **{k: v for k, v in report.to_dict().items() if k != "warnings"},
        }
        out["warnings"] = list(report.warnings)
    return out


def print_report(con, c: Checkpoint, report) -> None:
    """The folder's config line, the files an output carries, and warnings on stderr."""
    folder = c.model_folder
    if folder is None:
        return
    if report is not None:
        value = report.config_value
        said = "not set (true by default)" if value is None else str(value).lower()
        model = folder.config.get("model_type")
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
    if folder.files:
        con.print(safe(f"other files (carried by a folder output): {', '.join(folder.files)}"), markup=False)
    for line in report.warnings if report is not None else ():
        sys.stderr.write(f"warning: {safe(line)}\n")
