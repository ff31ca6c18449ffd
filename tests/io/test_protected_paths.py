"""One rule for every path wsurgery writes: never an input, never a file inside an input
folder, never a non-regular file; nothing is written when refused."""

from __future__ import annotations

import os

import pytest

import wsurgery
from tests.conftest import sha256
from wsurgery.errors import OutputError
from wsurgery.io.destination import check_file_target, check_report_target


def test_report_into_a_dcp_folder_is_refused(fixtures, cli):
    a = fixtures / "tiny_lm_dcp"
    before = sha256(a)
    code, _, err = cli("diff", a, fixtures / "tiny_lm.safetensors", "--html", a / ".metadata")
    assert code == 5, err
    assert sha256(a) == before


def test_report_over_a_shard_is_refused(fixtures, cli):
    s = fixtures / "tiny_lm_sharded"
    shard = sorted(s.glob("*.safetensors"))[0]
    before = sha256(s)
    code, _, err = cli("diff", s, fixtures / "tiny_lm.safetensors", "--html", shard)
    assert code == 5, err
    assert sha256(s) == before
    index = next(s.glob("*.index.json"))
    code, _, _ = cli("diff", index, fixtures / "tiny_lm.safetensors", "--html", s / "new-report.html")
    assert code == 5
    assert not (s / "new-report.html").exists()


def test_report_through_a_link_to_an_input_is_refused(fixtures, tmp_path):
    link = tmp_path / "report.html"
    os.symlink(fixtures / "tiny_lm.safetensors", link)
    with pytest.raises(OutputError) as e:
        check_report_target(link, [str(fixtures / "tiny_lm.safetensors")])
    assert e.value.reason == "protected"


def test_report_at_a_device_is_refused():
    with pytest.raises(OutputError) as e:
        check_report_target("/dev/null", ["a.safetensors"])
    assert e.value.reason == "not_regular"


def test_checkpoint_output_inside_an_input_folder_is_refused(fixtures):
    s = fixtures / "tiny_lm_sharded"
    before = sha256(s)
    with wsurgery.open(s) as ckpt:
        for target in (s / "model.safetensors", s / "other.pt"):
            with pytest.raises(OutputError) as e:
                ckpt.save(target, overwrite=True)
            assert e.value.reason == "protected"
    assert sha256(s) == before
    shard = sorted(s.glob("*.safetensors"))[0]
    with pytest.raises(OutputError):  # even where replacing the input is allowed
        check_file_target(shard, [str(s)], overwrite=True, replace_input=True)


def test_inspect_of_a_config_file_names_its_folder(tmp_path, cli):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    code, _, err = cli("inspect", tmp_path / "config.json")
    assert code == 3
    assert "model config" in err and str(tmp_path) in err and "weight_map" not in err
