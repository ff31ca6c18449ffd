"""merge-lora against PEFT itself: adapters made with ``peft`` on tiny transformers models
(random, non-zero B), folded by wsurgery, compared with ``merge_and_unload()``."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency (pip install -e .[dev])")
peft = pytest.importorskip("peft", reason="peft is a dev dependency (pip install -e .[dev])")

import wsurgery  # noqa: E402
from wsurgery.errors import SurgeryError  # noqa: E402
from wsurgery.surgery.lora import merge_lora, pattern_key  # noqa: E402

from ..models import tiny_llama as _llama  # noqa: E402


def _gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _randomize_lora(model, seed: int) -> None:
    """PEFT starts B at zero: give every LoRA tensor random values, so the update is real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _make(tmp_path, model_fn, config, seed=1):
    """(base folder, adapter folder, PEFT's merged state dict, PEFT's merged model)."""
    base = model_fn()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    peft_model = peft.get_peft_model(model_fn(), config)
    _randomize_lora(peft_model, seed)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()
    return base_dir, adapter_dir, {k: v.detach().clone() for k, v in merged.state_dict().items()}, merged


def _assert_close_to_peft(ours: dict, theirs: dict) -> None:
    assert set(theirs) <= set(ours) | {k for k in theirs if k.endswith("lm_head.weight")}
    changed = 0
    for k, v in theirs.items():
        if k not in ours:
            continue
        o = ours[k]
        assert o.dtype == v.dtype, k
        # PEFT adds a float32 update to float32 weights; ours is float64 rounded once
        torch.testing.assert_close(o, v, rtol=2e-6, atol=2e-6, msg=k)
        changed += 1
    assert changed


def _logits(model, vocab: int):
    ids = torch.arange(12).reshape(2, 6) % vocab
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_llama_lora_equals_merge_and_unload_and_loads(tmp_path):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 3},
        alpha_pattern={"v_proj": 5},
        modules_to_save=["lm_head"],
    )
    base_dir, adapter_dir, theirs, peft_merged = _make(tmp_path, _llama, config)
    with wsurgery.open(base_dir) as base:
        result = merge_lora(base, [adapter_dir])
        out = tmp_path / "merged"
        result.save(out)
    ours = wsurgery.load_state_dict(out)
    _assert_close_to_peft(ours, theirs)
    # the update differs from the base: the test would fail with a no-op merge
    plain = wsurgery.load_state_dict(base_dir)
    assert not torch.allclose(plain["model.layers.1.mlp.down_proj.weight"], ours["model.layers.1.mlp.down_proj.weight"])
    assert not torch.equal(plain["lm_head.weight"], ours["lm_head.weight"])
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, 64), _logits(peft_merged, 64), rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    base_dir, adapter_dir, theirs, peft_merged = _make(tmp_path, _gpt2, config, seed=2)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with wsurgery.open(base_dir) as base:
        base.merge_lora(adapter_dir).save(tmp_path / "merged")
    ours = wsurgery.load_state_dict(tmp_path / "merged")
    _assert_close_to_peft(ours, theirs)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(reloaded, 50), _logits(peft_merged, 50), rtol=1e-5, atol=1e-5)


def test_embedding_adapter_and_rslora(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=["embed_tokens", "q_proj"])
    base_dir, adapter_dir, theirs, _ = _make(tmp_path, _llama, config, seed=3)
    names = wsurgery.open(adapter_dir / "adapter_model.safetensors").names()
    assert any(n.endswith("lora_embedding_A") for n in names)
    with wsurgery.open(base_dir) as base:
        merge_lora(base, adapter_dir).save(tmp_path / "merged.safetensors")
    ours = wsurgery.load_state_dict(tmp_path / "merged.safetensors")
    _assert_close_to_peft(ours, theirs)
    assert not torch.allclose(
        ours["model.embed_tokens.weight"], wsurgery.load_state_dict(base_dir)["model.embed_tokens.weight"]
    )


def test_conv2d_adapter(tmp_path):
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.point = torch.nn.Conv2d(8, 4, 1)

    base = Net()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    wsurgery.save_state_dict(sd, tmp_path / "base.safetensors")
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "point"]))
    _randomize_lora(model, 4)
    model.save_pretrained(tmp_path / "adapter")
    theirs = model.merge_and_unload().state_dict()
    with wsurgery.open(tmp_path / "base.safetensors") as b:
        merge_lora(b, tmp_path / "adapter").save(tmp_path / "out.safetensors")
    ours = wsurgery.load_state_dict(tmp_path / "out.safetensors")
    for k in ("conv.weight", "point.weight"):
        torch.testing.assert_close(ours[k], theirs[k], rtol=2e-6, atol=2e-6)
        assert not torch.equal(ours[k], sd[k])


def test_two_adapters_with_weights(tmp_path):
    base = _llama()
    base.save_pretrained(tmp_path / "base")
    dirs = []
    for i in range(2):
        m = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]))
        _randomize_lora(m, 10 + i)
        m.save_pretrained(tmp_path / f"a{i}")
        dirs.append(tmp_path / f"a{i}")
    # PEFT's reference: both adapters loaded, each merged with its weight as a scaled copy
    ref = _llama()
    pm = peft.PeftModel.from_pretrained(ref, dirs[0], adapter_name="a0")
    pm.load_adapter(dirs[1], adapter_name="a1")
    pm.add_weighted_adapter(["a0", "a1"], [0.5, 2.0], "both", combination_type="cat")
    pm.set_adapter("both")
    theirs = pm.merge_and_unload(adapter_names=["both"]).state_dict()
    with wsurgery.open(tmp_path / "base") as b:
        merge_lora(b, dirs, [0.5, 2.0]).save(tmp_path / "out.safetensors")
    ours = wsurgery.load_state_dict(tmp_path / "out.safetensors")
    _assert_close_to_peft(ours, dict(theirs))


def test_pattern_key_follows_peft():
    from peft.utils.other import get_pattern_key

    patterns = ["q_proj", "layers.1.self_attn.k_proj", "mlp\\..*_proj"]
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.up_proj",
        "xq_proj",
    ]:
        want = get_pattern_key(patterns, module)
        got = pattern_key(patterns, module)
        assert (got or module) == want


def test_adapter_that_does_not_fit_lists_every_module(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    _, adapter_dir, _, _ = _make(tmp_path, _llama, config)
    other = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    other.save_pretrained(tmp_path / "other")
    with wsurgery.open(tmp_path / "other") as b, pytest.raises(SurgeryError) as err:
        merge_lora(b, adapter_dir)
    text = str(err.value)
    assert "layers.0.self_attn.q_proj" in text and "layers.1.self_attn.v_proj" in text  # fits nor exists
    assert len(err.value.problems) == 4


@pytest.mark.parametrize("kind", ["IA3", "LOHA"])
def test_other_adapter_types_refused_by_name(tmp_path, cli, kind):
    base_dir = tmp_path / "base"
    _llama().save_pretrained(base_dir)
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": kind, "target_modules": ["q_proj"]}))
    wsurgery.save_state_dict({"x": torch.zeros(1)}, ad / "adapter_model.safetensors")
    code, _, err = cli("merge-lora", str(base_dir), str(ad), "-o", str(tmp_path / "out.safetensors"))
    assert code == 4 and kind in err
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_merge_lora_misfit_writes_nothing(tmp_path, cli):
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"])
    _, adapter_dir, _, _ = _make(tmp_path, _llama, config)
    _gpt2().save_pretrained(tmp_path / "gpt2")
    code, _, err = cli("merge-lora", str(tmp_path / "gpt2"), str(adapter_dir), "-o", str(tmp_path / "out"))
    assert code == 4 and "q_proj" in err
    assert not (tmp_path / "out").exists()


def test_cli_merge_lora_folder(tmp_path, cli):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    base_dir, adapter_dir, theirs, _ = _make(tmp_path, _llama, config, seed=7)
    code, out, err = cli("merge-lora", str(base_dir), str(adapter_dir), "-o", str(tmp_path / "merged"), "--json")
    assert code == 0, err
    assert json.loads(out)["schema"] == "wsurgery.merge-lora/1"
    assert (tmp_path / "merged" / "config.json").exists()
    _assert_close_to_peft(wsurgery.load_state_dict(tmp_path / "merged"), theirs)


@pytest.mark.parametrize(
    "model_fn, targets", [(_llama, ["q_proj", "v_proj", "down_proj"]), (_gpt2, ["c_attn", "c_fc"])]
)
def test_dora_equals_merge_and_unload(tmp_path, model_fn, targets):
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, use_dora=True)
    base_dir, adapter_dir, theirs, _ = _make(tmp_path, model_fn, config, seed=9)
    names = wsurgery.open(adapter_dir / "adapter_model.safetensors").names()
    assert any(n.endswith("lora_magnitude_vector") for n in names)
    with wsurgery.open(base_dir) as base:
        merge_lora(base, adapter_dir).save(tmp_path / "merged.safetensors")
    _assert_close_to_peft(wsurgery.load_state_dict(tmp_path / "merged.safetensors"), theirs)


def test_bin_adapter_and_a_base_saved_from_the_inner_model(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    base = _llama()
    inner = {k: v.clone() for k, v in base.model.state_dict().items()}  # layers.0..., no "model." prefix
    wsurgery.save_state_dict(inner, tmp_path / "inner.safetensors")
    pm = peft.get_peft_model(_llama(), config)
    _randomize_lora(pm, 12)
    pm.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").exists()
    theirs = pm.merge_and_unload().model.state_dict()
    with wsurgery.open(tmp_path / "inner.safetensors") as b:
        merge_lora(b, tmp_path / "adapter").save(tmp_path / "out.safetensors")
    ours = wsurgery.load_state_dict(tmp_path / "out.safetensors")
    _assert_close_to_peft(ours, dict(theirs))
    assert not torch.equal(ours["layers.0.mlp.up_proj.weight"], inner["layers.0.mlp.up_proj.weight"])
