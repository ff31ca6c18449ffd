"""Sharded torch checkpoints (``pytorch_model.bin.index.json`` and its shards): read as
transformers writes them, written so that transformers loads them; transformers is the
oracle. Hostile indexes are refused with one input error."""

from __future__ import annotations

import json
import os

import pytest
import torch

import wsurgery
from wsurgery.errors import InputError

transformers = pytest.importorskip("transformers")

INDEX = "pytorch_model.bin.index.json"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_gpt2(seed: int = 0):
    """A tiny GPT-2 (tied head and embedding), its weights seeded."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=64)
    return transformers.GPT2LMHeadModel(config).eval()


def save_sharded_by_transformers(model, folder) -> None:
    model.save_pretrained(folder, safe_serialization=False, max_shard_size="20KB")


def test_reads_a_folder_transformers_sharded(tmp_path):
    model = tiny_gpt2()
    save_sharded_by_transformers(model, tmp_path / "hf")
    shards = sorted(n for n in os.listdir(tmp_path / "hf") if n.endswith(".bin"))
    assert len(shards) > 1 and INDEX in os.listdir(tmp_path / "hf")
    expected = model.state_dict()
    for target in (tmp_path / "hf", tmp_path / "hf" / INDEX):
        with wsurgery.open(target) as ckpt:
            assert ckpt.format == "torch-sharded"
            got = ckpt.state_dict()
            written = json.loads((tmp_path / "hf" / INDEX).read_text())["weight_map"]
            assert set(got) == set(written)
            for name in got:
                assert torch.equal(got[name], expected[name]), name


def test_written_shards_load_in_transformers(tmp_path):
    model = tiny_gpt2(seed=1)
    model.save_pretrained(tmp_path / "hf")  # one safetensors file and config.json
    out = tmp_path / "out"
    code = wsurgery.convert(tmp_path / "hf", out, format="torch", max_shard_size="20KB")
    assert code.format == "torch" and code.shards is not None and len(code.shards) > 1
    assert code.shards[0] == f"pytorch_model-00001-of-{len(code.shards):05d}.bin"
    assert "config.json" in os.listdir(out) and INDEX in os.listdir(out)
    assert not any(n.endswith(".safetensors") for n in os.listdir(out))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out, use_safetensors=False).eval()
    want = model.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, want[name]), name
    ids = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_round_trip_keeps_ties_within_a_shard(tmp_path):
    w = torch.randn(8, 4)
    sd = {"embed.weight": w, "head.weight": w, "other": torch.randn(300)}
    wsurgery.save_state_dict(sd, tmp_path / "m.safetensors")
    with wsurgery.open(tmp_path / "m.safetensors") as ckpt:
        saved = ckpt.save(tmp_path / "out", format="torch", max_shard_size=200)
    assert len(saved.shards or []) == 2
    with wsurgery.open(tmp_path / "out") as back:
        assert set(back.aliases) == {"head.weight"}
        assert wsurgery.diff(back, sd).equal


def test_cli_writes_torch_shards(tmp_path, cli):
    wsurgery.save_state_dict({"a": torch.randn(64, 64), "b": torch.randn(64, 64)}, tmp_path / "m.safetensors")
    code, stdout, stderr = cli(
        "convert", tmp_path / "m.safetensors", "-o", tmp_path / "out", "--format", "torch", "--max-shard-size", "20KB"
    )
    assert code == 0, stderr
    assert sorted(os.listdir(tmp_path / "out")) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        INDEX,
    ]
    assert wsurgery.diff(tmp_path / "out", tmp_path / "m.safetensors").equal


def _sharded(tmp_path):
    model = tiny_gpt2(seed=2)
    save_sharded_by_transformers(model, tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / INDEX).read_text())
    return tmp_path / "hf", index


def _write_index(folder, index) -> None:
    (folder / INDEX).write_text(json.dumps(index))


def test_a_shard_outside_the_folder_is_refused(tmp_path, cli):
    folder, index = _sharded(tmp_path)
    name = next(iter(index["weight_map"]))
    first = index["weight_map"][name]
    os.rename(folder / first, tmp_path / first)
    for n, s in index["weight_map"].items():
        if s == first:
            index["weight_map"][n] = f"../{first}"
    _write_index(folder, index)
    with pytest.raises(InputError, match="leaves the checkpoint's folder"):
        wsurgery.open(folder / INDEX)
    code, _, stderr = cli("inspect", folder / INDEX)
    assert code == 3 and "leaves the checkpoint's folder" in stderr


@pytest.mark.parametrize("how", ["moved", "missing", "extra"])
def test_index_and_shards_must_agree(tmp_path, cli, how):
    folder, index = _sharded(tmp_path)
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    if how == "moved":
        index["weight_map"][name] = shards[1]
    elif how == "missing":
        index["weight_map"]["not.a.tensor"] = shards[0]
    else:
        del index["weight_map"][name]
    _write_index(folder, index)
    with pytest.raises(InputError, match="weight_map|does not list"):
        wsurgery.open(folder)
    code, _, stderr = cli("inspect", folder)
    assert code == 3 and stderr.startswith("error:"), stderr
