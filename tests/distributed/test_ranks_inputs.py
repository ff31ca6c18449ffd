"""Ranks that see different inputs: two "nodes" on one host, each rank in its own folder
holding the same relative paths. Before any work the ranks compare what they see; a
difference is exit 6 on every rank, naming it. Loopback only, a free port, bounded time."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import wsurgery
from wsurgery import distributed

from ..distributed.test_scale_out import launch, wsurgery_argv

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="loopback interface 'lo'"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def _state(seed: int, names=("w", "v")) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(8, 4, generator=g) for n in names}


def launch_in(folders: list[Path], *args) -> list[dict]:
    """Run ``wsurgery ARGS`` as one rank per folder, each rank in its own folder."""
    return launch(wsurgery_argv(*args), world=len(folders), timeout=60, cwds=folders)


def two_nodes(tmp_path: Path, a0: dict, a1: dict, b: dict) -> list[Path]:
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node, a in zip(nodes, (a0, a1), strict=True):
        node.mkdir()
        wsurgery.save_state_dict(a, node / "a.safetensors")
        wsurgery.save_state_dict(b, node / "b.safetensors")
    return nodes


def test_different_names_on_one_rank_fail_every_rank_with_exit_6(tmp_path):
    nodes = two_nodes(tmp_path, _state(0), _state(0, names=("w", "u")), _state(0))
    runs = launch_in(nodes, "diff", "a.safetensors", "b.safetensors", "--json")
    assert [r["code"] for r in runs] == [6, 6], runs
    error = json.loads(runs[0]["stdout"])["error"]  # --json: the error is the one object rank 0 prints
    assert (error["kind"], error["exit_code"]) == ("distributed", 6)
    assert error["message"] == (
        "rank 1 sees other inputs than rank 0: a.safetensors: tensor 'v': float32 [8, 4] on rank 0, absent on rank 1"
    )
    assert runs[1]["stdout"] == ""


def test_same_names_other_values_fail_every_rank_with_exit_6(tmp_path):
    """Same names, dtypes and shapes, other values: the files' digests differ."""
    nodes = two_nodes(tmp_path, _state(0), _state(1), _state(0))
    runs = launch_in(nodes, "diff", "a.safetensors", "b.safetensors", "--json")
    assert [r["code"] for r in runs] == [6, 6], runs
    message = json.loads(runs[0]["stdout"])["error"]["message"]
    assert "rank 1 sees other inputs than rank 0: a.safetensors: file a.safetensors:" in message, message
    assert "header digest" in message


def test_the_same_inputs_in_two_folders_agree(tmp_path):
    nodes = two_nodes(tmp_path, _state(0), _state(0), _state(0))
    runs = launch_in(nodes, "diff", "a.safetensors", "b.safetensors", "--json")
    assert [r["code"] for r in runs] == [0, 0], runs
    assert json.loads(runs[0]["stdout"])["equal"] is True
    assert runs[1]["stdout"] == ""


def test_first_difference_names_the_first_fact():
    a = [("input 1", "x"), ("x: tensor 'w'", "float32 [2]"), ("x: tensor 'v'", "float32 [2]")]
    assert distributed.first_difference(a, a) is None
    assert distributed.first_difference(a, a[:2]) == "x: tensor 'v': float32 [2] on rank 0, absent here"
    assert distributed.first_difference(a[:2], a) == "x: tensor 'v': absent on rank 0, float32 [2] here"
    b = [a[0], ("x: tensor 'w'", "float16 [2]"), a[2]]
    assert distributed.first_difference(a, b) == "x: tensor 'w': float32 [2] on rank 0, float16 [2] here"


def test_local_workers_share_the_node(monkeypatch):
    from wsurgery.partition import node_share, usable_cores

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.local_workers() == max(1, usable_cores() // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1000")
    assert distributed.local_workers() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert distributed.local_workers() == usable_cores()
    assert (node_share(16, 2), node_share(2, 4), node_share(None, 1)) == (8, 1, 1)
