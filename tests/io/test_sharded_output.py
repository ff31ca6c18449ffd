"""Sharded output: Hugging Face layout, alias records per shard and in the index, atomic folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import wsurgery
from wsurgery.aliases import ALIASES_KEY
from wsurgery.errors import UsageError
from wsurgery.io.sharded_writer import parse_size, plan_shards
from wsurgery.io.writer import WriteItem


def _items(*sizes):
    return [WriteItem(f"t{i}", "uint8", (n,), n, None) for i, n in enumerate(sizes)]


@pytest.mark.parametrize(
    "text,value",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1024", 1024),
        ("1.5kb", 1500),
        ("7 MiB", 7 << 20),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "GB"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_plan_shards_greedy_and_oversized_tensor_alone():
    shards = plan_shards(_items(40, 50, 20, 200, 10), 100)
    assert [[i.name for i in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert [[i.name for i in s] for s in plan_shards([], 10)] == [[]]


def test_convert_max_shard_size_writes_hf_layout_with_aliases(fixtures, cli):
    out = fixtures / "out"
    code, stdout, stderr = cli(
        "convert", fixtures / "shared_storage.pt", "--max-shard-size", "600", "-o", out, "--json"
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["shards"] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"bias", "embedding.weight", "encoder.weight"}  # stored tensors only
    assert index["metadata"]["total_size"] == (8 + 32 * 8 + 16 * 8) * 4
    table = json.loads(index["metadata"][ALIASES_KEY])
    assert set(table) == {"projection.weight", "decoder.weight"}
    for shard in report["shards"]:
        with safe_open(out / shard, "pt") as f:
            keys, meta = set(f.keys()), f.metadata()
        mine = json.loads(meta.get(ALIASES_KEY, "{}"))
        assert all(rec["source"] in keys for rec in mine.values())  # each shard records its own sources' aliases
        if "embedding.weight" in keys:
            assert meta["projection.weight"] == "embedding.weight"
    back = wsurgery.load_state_dict(out)
    orig = torch.load(fixtures / "shared_storage.pt", weights_only=True)
    for k, v in orig.items():
        assert torch.equal(back[k], v)
    assert back["decoder.weight"].untyped_storage().data_ptr() == back["encoder.weight"].untyped_storage().data_ptr()


def test_sharded_output_refuses_existing_folder_without_force(fixtures, cli):
    out = fixtures / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, stderr = cli("convert", fixtures / "tiny_lm.safetensors", "--max-shard-size", "2KB", "-o", out)
    assert code == 5 and "--force" in stderr
    assert (out / "keep.txt").exists()
    code, _, stderr = cli("convert", fixtures / "tiny_lm.safetensors", "--max-shard-size", "2KB", "-o", out, "--force")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists()
    assert load_file(fixtures / "tiny_lm.safetensors").keys() == wsurgery.load_state_dict(out).keys()
    assert not [p for p in fixtures.iterdir() if p.name.endswith(".wsurgery-tmp")]


def test_sharded_round_trip_is_byte_identical_per_tensor(fixtures, cli):
    out = fixtures / "out"
    code, _, stderr = cli("convert", fixtures / "tiny_lm.safetensors", "--max-shard-size", "3KB", "-o", out)
    assert code == 0, stderr
    a = load_file(fixtures / "tiny_lm.safetensors")
    b = wsurgery.load_state_dict(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(out.glob("model-*.safetensors"))) >= 2


def test_bad_shard_size_is_usage_error(fixtures, cli):
    code, _, stderr = cli("convert", fixtures / "tiny_lm.pt", "--max-shard-size", "lots", "-o", fixtures / "o")
    assert code == 2 and "invalid size" in stderr
    assert not (fixtures / "o").exists()


def test_surgery_commands_write_shards_too(fixtures, cli):
    out = fixtures / "tied"
    code, stdout, stderr = cli(
        "tie",
        fixtures / "tiny_lm.safetensors",
        "--src",
        "embedding.weight",
        "--dst",
        "projection.weight",
        "--max-shard-size",
        "2KB",
        "-o",
        out,
        "--json",
    )
    assert code == 0, stderr
    assert len(json.loads(stdout)["shards"]) >= 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "projection.weight" not in index["weight_map"]
    sd = wsurgery.load_state_dict(out)
    assert sd["projection.weight"].data_ptr() == sd["embedding.weight"].data_ptr()
    code, stdout, stderr = cli("untie", out, "--max-shard-size", "2KB", "-o", fixtures / "plain", "--json")
    assert code == 0, stderr
    index = json.loads((fixtures / "plain" / "model.safetensors.index.json").read_text())
    assert "projection.weight" in index["weight_map"]
