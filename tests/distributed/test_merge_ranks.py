"""merge under two ranks (torchrun's environment, gloo over loopback): the shards split by
bytes are the bytes one process writes, and rank 0 prints what one process prints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import wsurgery  # noqa: E402

from ..conftest import sha256  # noqa: E402
from ..distributed.test_scale_out import LAUNCH_TIMEOUT, launch, rank_env, wsurgery_argv  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="loopback interface 'lo'"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def test_merge_under_two_ranks_is_the_merge_of_one(tmp_path):
    g = torch.Generator().manual_seed(3)
    paths = []
    for i in range(3):
        sd = {f"layers.{j}.w": torch.randn(64, 32, generator=g).to(torch.bfloat16) for j in range(6)}
        wsurgery.save_state_dict(sd, tmp_path / f"c{i}.safetensors")
        paths.append(tmp_path / f"c{i}.safetensors")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()

    def argv(where):
        out = tmp_path / where / "merged"
        return wsurgery_argv("merge", *paths, "--weights", "1,2,3", "-o", out, "--max-shard-size", "10KB", "--json")

    env = rank_env(0, 1, 0)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key)
    one = subprocess.run(argv("one"), env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert one.returncode == 0, one.stderr
    two = launch(argv("two"))
    assert [r["code"] for r in two] == [0, 0], [r["stderr"] for r in two]
    assert two[1]["stdout"] == ""
    assert json.loads(two[0]["stdout"].replace("/two/", "/one/")) == json.loads(one.stdout)
    assert len(json.loads(one.stdout)["shards"]) > 2
    assert sha256(tmp_path / "two" / "merged") == sha256(tmp_path / "one" / "merged")
