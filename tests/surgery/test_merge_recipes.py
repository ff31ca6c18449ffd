"""The recipe steps merge and merge_lora, and the shipped merge recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import wsurgery  # noqa: E402
from wsurgery.errors import SurgeryError  # noqa: E402
from wsurgery.merging import round_once  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "recipes"


def _three(tmp_path):
    g = torch.Generator().manual_seed(5)
    paths = []
    for i in range(3):
        sd = {"w": torch.randn(6, 4, generator=g), "steps": torch.tensor([7])}
        wsurgery.save_state_dict(sd, tmp_path / f"c{i}.safetensors")
        paths.append(tmp_path / f"c{i}.safetensors")
    return paths


def test_average_last_three_example(tmp_path, cli):
    paths = _three(tmp_path)
    out = tmp_path / "avg.safetensors"
    code, _, err = cli("apply", EXAMPLES / "average_last_three.yaml", *map(str, paths), "-o", str(out))
    assert code == 0, err
    got = wsurgery.load_state_dict(out)
    ref = sum(wsurgery.load_state_dict(p)["w"].double() for p in paths) / 3
    assert torch.equal(got["w"], round_once(ref, "float32"))
    assert torch.equal(got["steps"], torch.tensor([7]))


def test_merge_step_uses_the_steps_before_it_and_checks_parameters(tmp_path):
    paths = _three(tmp_path)
    recipe = {
        "version": 1,
        "inputs": {"base": str(paths[0]), "a": str(paths[1]), "b": str(paths[2])},
        "steps": [
            {"merge": {"inputs": ["a", "b"], "method": "ties", "base": "base", "density": 0.5}},
            {"rename": {"pattern": "^w$", "to": "weight"}},
        ],
    }
    result = wsurgery.apply(recipe, out=tmp_path / "o.safetensors")
    assert result.steps == 2
    want = wsurgery.merge([paths[1], paths[2]], method="ties", base=paths[0], density=0.5).get_tensor("w")
    assert torch.equal(wsurgery.load_state_dict(tmp_path / "o.safetensors")["weight"], want)
    bad = {**recipe, "steps": [{"merge": {"inputs": ["a", "b"], "method": "ties", "density": 2, "bas": "x"}}]}
    with pytest.raises(SurgeryError) as err:
        wsurgery.apply(bad, out=tmp_path / "p.safetensors")
    text = str(err.value)
    assert "step 1" in text and "bas" in text
    bad = {**recipe, "steps": [{"merge": {"inputs": ["a", "b"], "method": "slerp", "t": 2}}]}
    with pytest.raises(SurgeryError, match="t must be in"):
        wsurgery.apply(bad, out=tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


def test_merge_lora_example(tmp_path, cli):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    m = peft.get_peft_model(
        transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    )
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    m.save_pretrained(tmp_path / "lora")
    ref = m.merge_and_unload().state_dict()
    code, _, err = cli(
        "apply",
        EXAMPLES / "merge_lora_adapter.yaml",
        str(tmp_path / "base"),
        str(tmp_path / "lora"),
        "-o",
        str(tmp_path / "merged"),
    )
    assert code == 0, err
    got = wsurgery.load_state_dict(tmp_path / "merged")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert got[name].dtype == torch.bfloat16
    assert torch.equal(got[name], ref[name].to(torch.bfloat16))
