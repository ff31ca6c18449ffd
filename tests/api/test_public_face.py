"""``import wsurgery`` shows the public face only, and what its functions return or raise
is importable from it."""

from __future__ import annotations

import subprocess
import sys
import types

import wsurgery


def test_dir_shows_no_internal_modules():
    modules = {n for n in dir(wsurgery) if isinstance(getattr(wsurgery, n), types.ModuleType)}
    assert modules == {"distributed", "testing"}
    for name in ("api", "model", "io", "errors", "surgery", "compare", "cli", "selectors"):
        assert name not in dir(wsurgery)


def test_results_and_errors_are_exported():
    from wsurgery.compare import CheckReport, DiffReport
    from wsurgery.io.options import SaveResult, WriteOptions
    from wsurgery.surgery.recipe import ApplyResult

    assert wsurgery.DiffReport is DiffReport and wsurgery.CheckReport is CheckReport
    assert wsurgery.ApplyResult is ApplyResult
    assert wsurgery.SaveResult is SaveResult and wsurgery.WriteOptions is WriteOptions
    for name in ("InputError", "OutputError", "UsageError", "SurgeryError", "UnknownNameError", "DistributedError"):
        assert issubclass(getattr(wsurgery, name), wsurgery.WsurgeryError)
    assert set(wsurgery.__all__) <= set(dir(wsurgery))


def test_import_stays_free_of_torch_and_numpy_reports():
    code = "import sys, wsurgery; print('torch' in sys.modules, 'wsurgery.compare' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_open_returns_the_facade_and_verbs_keep_it(tmp_path):
    import torch

    wsurgery.save_state_dict({"a": torch.ones(2, 3), "b": torch.zeros(2, 3)}, tmp_path / "m.safetensors")
    with wsurgery.open(tmp_path / "m.safetensors") as ckpt:
        assert type(ckpt) is wsurgery.Checkpoint
        out = ckpt.tie("a", "b").rename("^a$", "x").drop("b").cast("float16")
        assert type(out) is wsurgery.Checkpoint and out.names() == ["x"]
        saved = out.save(tmp_path / "o.safetensors")
    assert saved.to_dict() == {
        "output": str(tmp_path / "o.safetensors"),
        "format": "safetensors",
        "stored": 1,
        "bytes": 12,
        "aliases": [],
    }


def test_checkpoint_is_immutable(tmp_path):
    import dataclasses

    import pytest
    import torch

    wsurgery.save_state_dict({"a": torch.ones(2)}, tmp_path / "m.safetensors")
    with wsurgery.open(tmp_path / "m.safetensors") as ckpt:
        with pytest.raises(dataclasses.FrozenInstanceError):
            ckpt.metadata = {}  # type: ignore[misc]
        other = ckpt.evolve(metadata={"k": "v"})
        assert type(other) is wsurgery.Checkpoint and other.metadata == {"k": "v"} and "k" not in ckpt.metadata


def test_every_public_name_has_a_home():
    assert sorted(wsurgery.__all__) == sorted(wsurgery._WHERE)
