"""Everything in a torch file is visible: tensors under integer keys and in lists are
flattened, what is not a tensor is listed, and every command that writes says what it
left out (the Resemblyzer checkpoint hid 32 Adam tensors under integer keys)."""

from __future__ import annotations

import json

import pytest
import torch

import wsurgery


def trainer_file(tmp_path):
    """A checkpoint the way a training script saves one: weights, Adam state under the
    parameters' integer ids, hyper-parameters, a step counter, a list of tensors."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g)
    state = {
        "weights": {"fc.weight": w, "fc.bias": torch.zeros(4)},
        "optimizer_state": {
            "state": {0: {"step": 7, "exp_avg": torch.ones(4, 3), "exp_avg_sq": torch.full((4, 3), 2.0)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}],
        },
        "ema": [torch.arange(3.0), torch.arange(4.0)],
        "step": 1234,
    }
    path = tmp_path / "trainer.pt"
    torch.save(state, path)
    return path


def test_integer_keys_and_lists_are_flattened_and_the_rest_is_listed(tmp_path):
    with wsurgery.open(trainer_file(tmp_path)) as c:
        names = set(c.keys())
        skipped = list(c.skipped)
    assert {"optimizer_state.state.0.exp_avg", "optimizer_state.state.0.exp_avg_sq", "ema.0", "ema.1"} <= names
    assert {"weights.fc.weight", "weights.fc.bias"} <= names
    # a container without tensors is one entry, not one per number in it
    assert "optimizer_state.param_groups: list" in skipped
    assert "optimizer_state.state.0.step: int" in skipped and "step: int" in skipped
    assert len(skipped) == 3


def test_convert_says_what_it_left_out_and_diff_agrees_with_the_input(tmp_path, cli):
    path = trainer_file(tmp_path)
    out = tmp_path / "t.safetensors"
    code, text, err = cli("convert", path, "-o", out, "--json")
    assert code == 0, err
    report = json.loads(text)
    assert "step: int" in report["skipped"] and report["stored"] == 6
    code, text, _ = cli("convert", path, "-o", out, "--force")
    assert "left out (not tensors): 3" in text and "step: int" in text
    assert wsurgery.diff(path, out).equal


def test_inspect_says_under_which_key_the_state_dict_was_found(tmp_path, cli):
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)
    code, text, _ = cli("inspect", path)
    assert code == 0 and "the entry 'state_dict' of the file" in text and "epoch: int" in text
    code, text, _ = cli("inspect", path, "--json")
    assert json.loads(text)["container"] == "state_dict"


def test_diff_counts_what_it_did_not_compare_on_each_side(tmp_path, cli):
    """A diff of a trainer file against its conversion is equal over tensors, and says
    which entries of each side were not tensors and so were not compared."""
    path = trainer_file(tmp_path)
    out = tmp_path / "t.safetensors"
    assert cli("convert", path, "-o", out)[0] == 0
    report = wsurgery.diff(path, out)
    assert report.equal and report.skipped_b == []
    assert sorted(report.skipped_a) == sorted(
        ["optimizer_state.param_groups: list", "optimizer_state.state.0.step: int", "step: int"]
    )
    code, text, _ = cli("diff", path, out, "--json")
    assert code == 0
    skipped = json.loads(text)["skipped"]
    assert len(skipped["a"]) == 3 and skipped["b"] == []
    # the swapped order moves them to B; a filter narrows them like the tensors
    assert len(wsurgery.diff(out, path).skipped_b) == 3
    narrowed = wsurgery.diff(path, out, filter="optimizer_state.*").skipped_a
    assert sorted(narrowed) == sorted(
        [
            "optimizer_state.state.0.step: int",
            "optimizer_state.param_groups: list",
        ]
    )
    code, text, _ = cli("diff", path, out)
    assert code == 0 and "not tensors, not compared, in A" in text and "step: int" in text


@pytest.mark.parametrize("key", ["model_state", "model_state_dict", "state_dict", "model", "module"])
def test_training_wrappers_are_unwrapped_and_named(tmp_path, cli, key):
    """Resemblyzer ships ``{"model_state": ..., "optimizer_state": ..., "step": ...}``:
    the state dict is the wrapped dict, and inspect says which key it came from."""
    path = tmp_path / "wrapped.pt"
    torch.save({key: {"fc.weight": torch.ones(2, 2)}, "optimizer_state": {"state": {}}, "step": 3}, path)
    with wsurgery.open(path) as c:
        assert c.keys() == ["fc.weight"] and c.container == key
    code, text, _ = cli("inspect", path, "--json")
    assert code == 0 and json.loads(text)["container"] == key
