"""wsurgery.testing.assert_checkpoint_equal: passes, fails with a short summary of the
worst tensors, and takes every criterion diff takes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import wsurgery
from wsurgery.testing import assert_checkpoint_equal


def model(seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.fixture
def saved(tmp_path):
    m = model()
    path = tmp_path / "ref.safetensors"
    wsurgery.save_state_dict(m.state_dict(), path)
    return m, path


def test_equal_checkpoints_pass_and_return_the_report(saved):
    m, path = saved
    report = assert_checkpoint_equal(m, path)
    assert report.equal and report.same == 4
    assert_checkpoint_equal(path, m.state_dict())
    wsurgery.testing.assert_checkpoint_equal(m, path)  # reachable from `import wsurgery`


def test_the_message_names_the_worst_tensors_first(saved):
    m, path = saved
    with torch.no_grad():
        m[0].weight.mul_(1.001)  # small drift
        m[2].weight.add_(1.0)  # large drift
        m[2].bias[0] = float("nan")
    with pytest.raises(AssertionError) as e:
        assert_checkpoint_equal(m, path)
    lines = str(e.value).splitlines()
    assert lines[0] == "checkpoints differ (atol 0, rtol 0): 3 changed, 0 only in actual, 0 only in expected, 1 same"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["2.bias", "2.weight", "0.weight"]  # by rel_l2
    assert "rel_l2 inf" in lines[1] and "1 of 2 elements differ" in lines[1]
    assert ("rel_l2 0.000999" in lines[3] or "rel_l2 0.001" in lines[3]) and "cosine 1" in lines[3]
    with pytest.raises(AssertionError) as e:
        assert_checkpoint_equal(m, path, shown=1, msg="after one step")
    lines = str(e.value).splitlines()
    assert lines[0] == "after one step" and lines[-1] == "  ... and 2 more changed"


def test_thresholds_and_tolerances(saved):
    m, path = saved
    with torch.no_grad():
        m[0].weight.mul_(1.001)
    assert_checkpoint_equal(m, path, max_rel_l2=1e-2)
    assert_checkpoint_equal(m, path, min_cosine=0.9999)
    assert_checkpoint_equal(m, path, rtol=1e-2)
    with pytest.raises(AssertionError, match=r"max_rel_l2 1e-05"):
        assert_checkpoint_equal(m, path, max_rel_l2=1e-5)
    with pytest.raises(AssertionError, match=r"atol 1e-09, rtol 0, max_rel_l2 0.01"):
        assert_checkpoint_equal(m, path, max_rel_l2=1e-2, atol=1e-9)  # both must hold


def test_structure_changes_come_first_and_sides_are_named(saved, tmp_path):
    m, path = saved
    other = {k: v.clone() for k, v in m.state_dict().items()}
    other["0.weight"] = torch.zeros(8, 5)
    other["2.bias"] = other["2.bias"].double()
    other["extra.\x1b[31mred"] = torch.ones(1)
    del other["0.bias"]
    with pytest.raises(AssertionError) as e:
        assert_checkpoint_equal(m, other)
    text = str(e.value)
    lines = text.splitlines()
    assert lines[1] == "  0.weight: shape (8, 4) vs (8, 5)"
    assert lines[2].startswith("  2.bias: dtype float32 vs float64, rel_l2 0")
    assert "only in actual: 0.bias" in text
    assert "only in expected: extra.\\u001b[31mred" in text  # control characters escaped


def test_ignore_ties_and_filter(tmp_path):
    emb = torch.randn(6, 3)
    tied, untied = tmp_path / "tied.safetensors", tmp_path / "untied.safetensors"
    wsurgery.save_state_dict({"embed.weight": emb, "head.weight": emb}, tied)
    save_file({"embed.weight": emb, "head.weight": emb.clone()}, str(untied))
    with pytest.raises(AssertionError, match=r"head.weight: alias \(tie"):
        assert_checkpoint_equal(tied, untied)
    assert_checkpoint_equal(tied, untied, ignore_ties=True)
    assert_checkpoint_equal(tied, untied, filter="embed.*")


def test_errors_are_not_assertion_errors(saved):
    m, _ = saved
    with pytest.raises(wsurgery.UsageError):
        assert_checkpoint_equal(m, m, max_rel_l2=-1)
    with pytest.raises(wsurgery.InputError):
        assert_checkpoint_equal(m, "missing.safetensors")
