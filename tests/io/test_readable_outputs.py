"""A written file is readable: an output whose safetensors header (or sharded index)
passes what readers accept is refused before anything is written (exit 4).

Names are bounded well under the readers' 100 MB (``limits.MAX_NAMES_BYTES``), so these
tests lower the writer's limits to reach them with names a verb may still make."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import wsurgery
from wsurgery.errors import SurgeryError

LIMIT = 12_000  # the readers' limit as these tests set it (bytes)


@pytest.fixture(autouse=True)
def small_limits(monkeypatch):
    monkeypatch.setattr("wsurgery.io.writer.MAX_HEADER_SIZE", LIMIT)
    monkeypatch.setattr("wsurgery.io.sharded_writer.MAX_INDEX_SIZE", LIMIT)


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(2, generator=g) for i in range(4)}, path)
    return path


def _long_names(ckpt, length: int):
    out = ckpt
    for i, name in enumerate(ckpt.keys()):
        out = out.rename(name, f"{i}" + "x" * length)
    return out


def test_a_header_past_the_readers_limit_is_refused_and_nothing_written(small, tmp_path):
    out = tmp_path / "out.safetensors"
    with wsurgery.open(small) as ckpt:
        renamed = _long_names(ckpt, LIMIT // 4 + 10)
        with pytest.raises(SurgeryError, match="header"):
            renamed.save(out)
        with pytest.raises(SurgeryError, match="header"):
            renamed.save(tmp_path / "shards", max_shard_size="1GB")
    assert sorted(os.listdir(tmp_path)) == ["small.safetensors"]


def test_shards_keep_every_header_readable(small, tmp_path):
    """Names that fit shards of one tensor each still make an index past the limit."""
    with wsurgery.open(small) as ckpt:
        renamed = _long_names(ckpt, LIMIT // 3)
        with pytest.raises(SurgeryError, match="header"):
            renamed.save(tmp_path / "one.safetensors")
        with pytest.raises(SurgeryError, match="index"):
            renamed.save(tmp_path / "shards", max_shard_size=1)
    assert sorted(os.listdir(tmp_path)) == ["small.safetensors"]
