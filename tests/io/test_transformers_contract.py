"""A model-folder output loads in transformers' from_pretrained as written: ties it does
not restore are stored as values (unless keep_aliases), and the config fields the
weights decide (dtype, layer count, tie_word_embeddings) are true to them. transformers
is the oracle; the models are built here, tiny and seeded (no hub)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _bert(folder):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _llama(folder, layers: int = 3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _load(cls, folder, **kw):
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kw)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set()), info
    return model


def test_a_tie_of_two_layers_loads_with_equal_weights(tmp_path, cli):
    src = _bert(tmp_path / "minilm")
    out = tmp_path / "shared"
    code, text, err = cli("tie", src, "--src", "encoder.layer.0", "--dst", "encoder.layer.1", "-o", f"{out}/")
    assert code == 0, err
    assert "ties written as values" in text
    model = _load(transformers.BertModel, out)
    sd = model.state_dict()
    for name, value in sd.items():
        if name.startswith("encoder.layer.1."):
            assert torch.equal(value, sd[name.replace("layer.1.", "layer.0.")]), name
    code, text, err = cli("inspect", out)
    assert code == 0 and "alias" not in err


def test_a_dry_run_reports_what_the_folder_write_stores(tmp_path, cli):
    """The dry run of a folder output says what the write will store (the ties as
    values), not the plan's aliases: its counts and notes are the write's."""
    src = _bert(tmp_path / "minilm")
    out = tmp_path / "shared"
    args = ["tie", src, "--src", "encoder.layer.0", "--dst", "encoder.layer.1", "-o", f"{out}/"]
    code, dry, err = cli(*args, "--dry-run", "--json")
    assert code == 0, err
    assert not out.exists()
    code, real, err = cli(*args, "--json")
    assert code == 0, err
    dry, real = json.loads(dry), json.loads(real)
    for key in ("stored", "aliases", "aliases_as_values"):
        assert dry[key] == real[key], key
    assert dry["aliases"] == [] and len(dry["aliases_as_values"]) == 16
    assert any("ties written as values" in n for n in dry["notes"])
    code, text, err = cli(*args, "--dry-run")
    assert code == 0, err
    assert "0 aliases" in text and "ties written as values" in text


def test_keep_aliases_keeps_them_and_inspect_warns(tmp_path, cli):
    src = _bert(tmp_path / "minilm")
    out = tmp_path / "kept"
    code, _, err = cli(
        "tie", src, "--src", "encoder.layer.0", "--dst", "encoder.layer.1", "-o", f"{out}/", "--keep-aliases"
    )
    assert code == 0, err
    import wsurgery

    with wsurgery.open(out) as c:
        assert "encoder.layer.1.output.dense.weight" in c.aliases
    code, _, err = cli("inspect", out)
    assert code == 0 and "from_pretrained" in err and "encoder.layer.1" in err


def test_a_cast_sets_the_dtype_that_auto_loads(tmp_path, cli):
    src = _llama(tmp_path / "llama")
    out = tmp_path / "bf16"
    code, text, err = cli("cast", src, "bfloat16", "-o", f"{out}/")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    key = "dtype" if "dtype" in config else "torch_dtype"
    assert config[key] == "bfloat16" and f"config.json: {key} float32 -> bfloat16" in text
    model = _load(transformers.LlamaForCausalLM, out, dtype="auto")
    assert model.dtype == torch.bfloat16
    ref = transformers.LlamaForCausalLM.from_pretrained(src).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, ref[name].to(torch.bfloat16)), name


def test_a_layer_drop_updates_the_layer_count(tmp_path, cli):
    src = _llama(tmp_path / "llama")
    out = tmp_path / "two"
    code, text, err = cli("drop", src, "model.layers.2", "-o", f"{out}/")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert "config.json: num_hidden_layers 3 -> 2" in text
    model = _load(transformers.LlamaForCausalLM, out)
    ref = transformers.LlamaForCausalLM.from_pretrained(src).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, ref[name]), name


def test_a_gap_in_the_layers_is_a_warning_not_a_wrong_count(tmp_path, cli):
    src = _llama(tmp_path / "llama")
    out = tmp_path / "gap"
    code, text, err = cli("drop", src, "model.layers.1", "-o", f"{out}/")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert "numbered 0, 2" in text
