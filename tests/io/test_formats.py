"""Loading every format into a Checkpoint, ties from shared storage, and writing back."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

import wsurgery
from wsurgery.aliases import ALIASES_KEY
from wsurgery.errors import InputError
from wsurgery.lookup import entry
from wsurgery.selectors import select


def lm(seed=0, vocab=12, dim=4):
    g = torch.Generator().manual_seed(seed)
    return {
        "embedding.weight": torch.randn(vocab, dim, generator=g),
        "layer.weight": torch.randn(dim, dim, generator=g),
        "projection.weight": torch.randn(vocab, dim, generator=g),
    }


class TiedLM(torch.nn.Module):
    def __init__(self, vocab=12, dim=4):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, dim)
        self.layer = torch.nn.Linear(dim, dim, bias=False)
        self.projection = torch.nn.Linear(dim, vocab, bias=False)
        self.projection.weight = self.embedding.weight


def test_load_every_fixture_format(fixtures):
    pt = wsurgery.load(fixtures / "tiny_lm.pt")
    st = wsurgery.load(fixtures / "tiny_lm.safetensors")
    sharded = wsurgery.load(fixtures / "tiny_lm_sharded")
    index = wsurgery.load(fixtures / "tiny_lm_sharded" / "model.safetensors.index.json")
    assert (pt.format, st.format, sharded.format, index.format) == (
        "torch-zip",
        "safetensors",
        "safetensors-sharded",
        "safetensors-sharded",
    )
    assert pt.names() == st.names() == sharded.names() == index.names()
    for name in pt.names():
        assert torch.equal(pt.tensor(name), st.tensor(name))
        assert torch.equal(st.tensor(name), sharded.tensor(name))


def test_format_comes_from_bytes_not_name(fixtures):
    (fixtures / "tiny_lm.pt").rename(fixtures / "weird.safetensors")
    (fixtures / "tiny_lm.safetensors").rename(fixtures / "weird.bin")
    assert wsurgery.load(fixtures / "weird.safetensors").format == "torch-zip"
    assert wsurgery.load(fixtures / "weird.bin").format == "safetensors"


def test_names_are_naturally_sorted(tmp_path):
    sd = {f"layers.{i}.w": torch.zeros(1) for i in (10, 2, 1)}
    save_file(sd, tmp_path / "m.safetensors")
    assert wsurgery.load(tmp_path / "m.safetensors").names() == ["layers.1.w", "layers.2.w", "layers.10.w"]


def test_lazy_load_reads_no_tensor_data(tmp_path, monkeypatch):
    save_file(lm(), tmp_path / "m.safetensors")
    from wsurgery.io.safetensors import SafetensorsFile

    def boom(*a, **k):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(SafetensorsFile, "read_into", boom)
    monkeypatch.setattr(SafetensorsFile, "raw", boom)
    c = wsurgery.load(tmp_path / "m.safetensors")
    assert c.shape_dtype("embedding.weight") == ((12, 4), "float32")


def test_shared_storage_pt_reads_as_ties(fixtures):
    c = wsurgery.load(fixtures / "shared_storage.pt")
    assert set(c.stored) == {"embedding.weight", "encoder.weight", "bias"}
    assert c.aliases["projection.weight"].record() == {"source": "embedding.weight", "transform": []}
    assert c.aliases["decoder.weight"].record() == {"source": "encoder.weight", "transform": ["transpose"]}
    assert torch.equal(c.tensor("decoder.weight"), c.tensor("encoder.weight").t())


def test_overlap_that_is_not_a_view_is_an_error(tmp_path):
    base = torch.arange(12.0)
    torch.save({"a": base[:8], "b": base[4:]}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match=r"'a'.*'b'.*overlap"):
        wsurgery.load(tmp_path / "bad.pt")


def test_disjoint_slices_of_one_storage_stay_independent(tmp_path):
    base = torch.arange(12.0)
    torch.save({"a": base[:6], "b": base[6:]}, tmp_path / "ok.pt")
    c = wsurgery.load(tmp_path / "ok.pt")
    assert set(c.stored) == {"a", "b"} and not c.aliases
    c.save(tmp_path / "ok.safetensors")
    out = load_file(tmp_path / "ok.safetensors")
    assert torch.equal(out["b"], torch.arange(6.0, 12.0))


def test_lightning_ckpt_yields_state_dict_and_reports_skipped(fixtures):
    c = wsurgery.load(fixtures / "lightning.ckpt")
    assert c.container == "state_dict"
    assert "model.embedding.weight" in c
    assert any(s.startswith("epoch") for s in c.skipped)
    assert any(s.startswith("optimizer_states") for s in c.skipped)


@pytest.mark.parametrize("key", ["model", "module"])
def test_state_dict_under_model_or_module(tmp_path, key):
    torch.save({key: lm(), "step": 5}, tmp_path / "c.pt")
    c = wsurgery.load(tmp_path / "c.pt")
    assert c.container == key and "layer.weight" in c


def test_legacy_torch_format(tmp_path):
    sd = lm()
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    c = wsurgery.load(tmp_path / "legacy.pt")
    assert c.format == "torch-legacy"
    assert torch.equal(c.tensor("layer.weight"), sd["layer.weight"])


def test_save_state_dict_records_ties_and_load_restores_views(tmp_path):
    sd = lm()
    sd["projection.weight"] = sd["embedding.weight"]
    sd["layer_t"] = sd["layer.weight"].t()
    wsurgery.save_state_dict(sd, tmp_path / "t.safetensors", metadata={"note": "hi"})
    with safe_open(tmp_path / "t.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["embedding.weight", "layer.weight"]
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["note"] == "hi"
    assert meta["projection.weight"] == "embedding.weight"  # the save_model convention
    assert "layer_t" not in meta  # never for a transformed tie
    assert json.loads(meta[ALIASES_KEY]) == {
        "layer_t": {"source": "layer.weight", "transform": ["transpose"]},
        "projection.weight": {"source": "embedding.weight", "transform": []},
    }
    back = wsurgery.load_state_dict(tmp_path / "t.safetensors")
    assert back["projection.weight"].data_ptr() == back["embedding.weight"].data_ptr()
    assert back["layer_t"].untyped_storage().data_ptr() == back["layer.weight"].untyped_storage().data_ptr()
    assert torch.equal(back["layer_t"], sd["layer.weight"].t())
    back["layer.weight"][0, 1] = 42.0
    assert back["layer_t"][1, 0] == 42.0


def test_output_loads_with_safetensors_and_into_tied_module(tmp_path):
    torch.manual_seed(0)
    m = TiedLM()
    wsurgery.save_state_dict(m.state_dict(), tmp_path / "m.safetensors")
    flat = load_file(tmp_path / "m.safetensors")
    assert "projection.weight" not in flat  # stored once
    fresh = TiedLM()
    missing, unexpected = load_model(fresh, tmp_path / "m.safetensors")
    assert not missing and not unexpected
    assert torch.equal(fresh.projection.weight, m.embedding.weight)
    assert fresh.projection.weight is fresh.embedding.weight


def test_save_model_files_read_as_ties(tmp_path):
    torch.manual_seed(1)
    m = TiedLM()
    save_model(m, str(tmp_path / "hf.safetensors"))
    c = wsurgery.load(tmp_path / "hf.safetensors")
    assert len(c.aliases) == 1
    ((name, alias),) = c.aliases.items()
    assert alias.specs == []
    assert {name, alias.source} == {"embedding.weight", "projection.weight"}


def test_save_is_deterministic(tmp_path):
    sd = lm()
    sd["projection.weight"] = sd["embedding.weight"]
    wsurgery.save_state_dict(sd, tmp_path / "a.safetensors")
    wsurgery.save_state_dict(dict(reversed(list(sd.items()))), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_written_header_is_aligned_and_valid(tmp_path):
    sd = {
        "h": torch.ones(3, dtype=torch.float16),
        "d": torch.ones(5, dtype=torch.float64),
        "b": torch.ones(1, dtype=torch.bool),
    }
    wsurgery.save_state_dict(sd, tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header["d"]["data_offsets"][0] == 0  # widest dtype first: every tensor aligned
    out = load_file(tmp_path / "x.safetensors")
    for k, v in sd.items():
        assert torch.equal(out[k], v)


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.uint8, torch.bool],
)
def test_round_trip_every_common_dtype(tmp_path, dtype):
    t = (torch.arange(24) % 3).reshape(2, 3, 4).to(dtype)
    wsurgery.save_state_dict(
        {"t": t, "s": torch.tensor(7).to(dtype), "e": torch.zeros(0, 3, dtype=dtype)}, tmp_path / "x.safetensors"
    )
    back = wsurgery.load_state_dict(tmp_path / "x.safetensors")
    assert torch.equal(back["t"], t) and back["t"].dtype == dtype
    assert back["s"].shape == () and back["e"].shape == (0, 3)


def test_sharded_index_metadata_aliases_are_read(tmp_path):
    sd = lm()
    folder = tmp_path / "sh"
    folder.mkdir()
    save_file({"embedding.weight": sd["embedding.weight"]}, folder / "a.safetensors")
    save_file({"layer.weight": sd["layer.weight"]}, folder / "b.safetensors")
    table = {"projection.weight": {"source": "embedding.weight", "transform": []}}
    index = {
        "metadata": {"total_size": 1, ALIASES_KEY: json.dumps(table)},
        "weight_map": {"embedding.weight": "a.safetensors", "layer.weight": "b.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    c = wsurgery.load(folder)
    assert c.aliases["projection.weight"].source == "embedding.weight"
    assert torch.equal(c.tensor("projection.weight"), sd["embedding.weight"])


def test_unknown_name_lists_close_matches(fixtures):
    c = wsurgery.load(fixtures / "tiny_lm.safetensors")
    for look_up in (lambda n: entry(c, n), c.get_tensor, lambda n: select(c.names(), n)):
        with pytest.raises(InputError) as err:
            look_up("embeding.weight")
        assert "embedding.weight" in err.value.candidates


def test_module_prefix_selects_every_tensor_under_it(fixtures):
    c = wsurgery.load(fixtures / "tiny_lm.safetensors")
    names = select(c.names(), "layers.0.attn")
    assert names == ["layers.0.attn.out.weight", "layers.0.attn.qkv.bias", "layers.0.attn.qkv.weight"]
    assert select(c.names(), "layers.0.attn.out.weight") == ["layers.0.attn.out.weight"]
