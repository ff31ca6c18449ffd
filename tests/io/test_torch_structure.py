"""A torch file written from a torch file keeps the input's structure: containers, keys,
numbers, strings, bools and None where they were, tensors in place, following the
surgery (a dropped tensor leaves its container, a renamed one moves); flat writes the
flat state dict."""

from __future__ import annotations

import torch

import wsurgery


def _trainer(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "model_state": {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.randn(4, generator=g)},
        "optimizer_state": {
            "state": {0: {"step": 7, "exp_avg": torch.ones(4, 3)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "nesterov": False, "params": [0, 1]}],
        },
        "step": 1234,
        "name": "run-1",
        "best": None,
    }
    path = tmp_path / "trainer.pt"
    torch.save(state, path)
    return path, state


def _load(path):
    return torch.load(path, weights_only=True)


def test_a_cast_keeps_the_structure_of_a_training_checkpoint(tmp_path, cli):
    path, state = _trainer(tmp_path)
    out = tmp_path / "out.pt"
    code, text, err = cli("cast", path, "bfloat16", "-o", out)
    assert code == 0, err
    got = _load(out)
    assert set(got) == set(state)
    assert got["step"] == 1234 and got["name"] == "run-1" and got["best"] is None
    assert got["optimizer_state"]["param_groups"] == state["optimizer_state"]["param_groups"]
    assert got["optimizer_state"]["state"][0]["step"] == 7
    assert torch.equal(got["optimizer_state"]["state"][0]["exp_avg"], torch.ones(4, 3))  # not a model tensor
    w = got["model_state"]["fc.weight"]
    assert w.dtype == torch.bfloat16 and torch.equal(w, state["model_state"]["fc.weight"].to(torch.bfloat16))
    assert "structure kept" in text


def test_drop_and_rename_follow_the_surgery(tmp_path):
    path, state = _trainer(tmp_path)
    with wsurgery.open(path) as c:
        c.drop("fc.bias").rename("fc.weight", "head.weight").save(tmp_path / "out.pt")
    got = _load(tmp_path / "out.pt")
    assert set(got["model_state"]) == {"head.weight"}
    assert torch.equal(got["model_state"]["head.weight"], state["model_state"]["fc.weight"])
    assert got["step"] == 1234


def test_lightning_keeps_epoch_step_and_hyper_parameters(fixtures, tmp_path, cli):
    src = fixtures / "lightning.ckpt"
    out = tmp_path / "out.ckpt"
    code, _, err = cli("convert", src, "-o", out)
    assert code == 0, err
    before, after = torch.load(src, weights_only=False), _load(out)
    for key in ("epoch", "global_step", "hyper_parameters", "pytorch-lightning_version"):
        assert after[key] == before[key], key
    assert set(after["state_dict"]) == set(before["state_dict"])


def test_flat_writes_the_flat_state_dict(tmp_path, cli):
    path, _ = _trainer(tmp_path)
    out = tmp_path / "flat.pt"
    code, _, err = cli("convert", path, "-o", out, "--flat")
    assert code == 0, err
    got = _load(out)
    assert set(got) == {"fc.weight", "fc.bias"}


def test_shared_containers_stay_shared_and_cycles_are_named(tmp_path):
    shared = [1, 2, 3]
    state = {"state_dict": {"w": torch.ones(2)}, "a": shared, "b": shared, "loop": {}}
    state["loop"]["self"] = state["loop"]
    path = tmp_path / "in.pt"
    torch.save(state, path)
    with wsurgery.open(path) as c:
        saved = c.save(tmp_path / "out.pt")
    got = _load(tmp_path / "out.pt")
    assert got["a"] == [1, 2, 3] and got["a"] is got["b"] and got["loop"] == {}
    assert any("reference cycle" in n for n in saved.notes)
