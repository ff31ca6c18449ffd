"""What the command line says about a write is what the output holds: the kind of folder,
the entries left out, the stored tensors and aliases; flags where the library names its
parameters; hints that run; help texts that describe the selector the options take."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch

import wsurgery
from tests.conftest import FIXTURES


def _folder_with_config(tmp_path):
    """A model folder (config.json + model.safetensors) of the tiny LM, whose head is untied."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((FIXTURES / "tiny_lm.safetensors").read_bytes())
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_torch_shards_are_called_torch_shards(tmp_path, cli):
    out = tmp_path / "out"
    src = FIXTURES / "tiny_lm.safetensors"
    code, text, err = cli("convert", src, "-o", out, "--format", "torch", "--max-shard-size", "4KB")
    assert code == 0, err
    shards = sorted(p.name for p in out.glob("pytorch_model-*.bin"))
    assert len(shards) > 1 and not list(out.glob("*.safetensors"))
    assert "a folder of torch shards" in text and "safetensors" not in text


def test_a_structured_torch_output_keeps_the_entries_it_does_not_list_as_left_out(tmp_path, cli):
    src = FIXTURES / "lightning.ckpt"
    with wsurgery.open(src) as c:
        not_tensors = list(c.skipped)
    assert "epoch: int" in not_tensors
    out = tmp_path / "x.ckpt"
    code, text, err = cli("convert", src, "-o", out)
    assert code == 0, err
    kept = torch.load(out, weights_only=False)
    assert "epoch" in kept and "global_step" in kept
    assert "left out" not in text
    code, text, err = cli("convert", src, "-o", out, "--force", "--json")
    assert code == 0, err
    assert json.loads(text)["skipped"] == []


def test_a_flat_torch_output_lists_every_entry_it_leaves_out(tmp_path, cli):
    src = FIXTURES / "lightning.ckpt"
    with wsurgery.open(src) as c:
        not_tensors = list(c.skipped)
    out = tmp_path / "x.pt"
    code, text, err = cli("convert", src, "-o", out, "--flat")
    assert code == 0, err
    assert "epoch" not in torch.load(out, weights_only=False)
    assert f"left out (not tensors): {len(not_tensors)}" in text
    code, text, err = cli("convert", src, "-o", out, "--flat", "--force", "--json")
    assert json.loads(text)["skipped"] == not_tensors


def test_what_a_structure_cannot_carry_is_what_is_listed_as_left_out(tmp_path, cli):
    src = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3, "extra": {(1, 2): 3}}, src)
    out = tmp_path / "odd2.ckpt"
    code, text, err = cli("convert", src, "-o", out, "--json")
    assert code == 0, err
    kept = torch.load(out, weights_only=False)
    assert kept["epoch"] == 3 and kept["extra"] == {}
    skipped = json.loads(text)["skipped"]
    assert len(skipped) == 1 and "(1, 2)" in skipped[0]
    code, text, err = cli("convert", src, "-o", out, "--force")
    assert "left out (not tensors): 1" in text and "epoch" not in text


def test_the_summary_counts_a_tie_written_as_values_as_stored(tmp_path, cli):
    src = _folder_with_config(tmp_path)
    out = tmp_path / "tied"
    code, text, err = cli("tie", src, "--src", "layers.0.norm.weight", "--dst", "layers.1.norm.weight", "-o", f"{out}/")
    assert code == 0, err
    with wsurgery.open(out) as c:
        stored, aliases = len(c.stored), len(c.aliases)
    assert (stored, aliases) == (15, 0)  # the tie went out as values: transformers would not restore it
    assert f"{stored} stored tensors" in text and "0 aliases" in text
    assert "layers.1.norm.weight = " not in text


def test_notes_name_the_flags_not_the_library_parameters(tmp_path, cli):
    src = _folder_with_config(tmp_path)
    out = tmp_path / "tied"
    code, text, err = cli("tie", src, "--src", "layers.0.norm.weight", "--dst", "layers.1.norm.weight", "-o", f"{out}/")
    assert code == 0, err
    assert "--keep-aliases keeps them as aliases" in text and "keep_aliases" not in text
    code, text, err = cli("convert", FIXTURES / "lightning.ckpt", "-o", tmp_path / "x.ckpt", "--json")
    assert code == 0, err
    assert json.loads(text)["notes"] == ["the input's structure kept (--flat writes a flat state dict)"]


def test_a_note_reads_in_library_words_and_carries_its_parameter():
    from wsurgery.io.options import Note

    note = Note("the input's structure kept ({option} writes a flat state dict)", option="flat", kind="structure")
    assert str(note) == "the input's structure kept (flat writes a flat state dict)"
    assert json.loads(json.dumps([note])) == [str(note)]
    assert note.render(lambda p: "--" + p) == "the input's structure kept (--flat writes a flat state dict)"


def test_an_unknown_diff_filter_hints_commands_that_run(cli, tmp_path):
    a, b = FIXTURES / "tiny_lm.safetensors", FIXTURES / "tiny_lm.pt"
    code, _, err = cli("diff", a, b, "--filter", "nosuch")
    assert code == 3
    commands = re.findall(r"`(wsurgery inspect [^`]*)`", err)
    assert len(commands) == 2, err
    for command in commands:
        args = shlex.split(command)[1:]
        assert cli(*args)[0] == 0, command


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("diff", "--filter"),
        ("inspect", "--filter"),
        ("cast", "--only"),
        ("cast", "--except"),
        ("merge", "--only"),
        ("drop", "NAME..."),
        ("keep", "NAME..."),
    ],
)
def test_selector_help_says_name_prefix_or_glob(cli, command, option):
    code, text, _ = cli(command, "--help")
    assert code == 0
    text = _one_line(re.sub(r"[│╭╮╰╯─]", " ", text))
    at = text.rindex(option)  # in the options panel, after the usage line and the example
    said = text[at : at + 200]
    assert "exact" in said and "module prefix" in said and "glob" in said, said


def test_a_refused_rename_pattern_is_shown_as_typed(cli, tmp_path):
    code, _, err = cli("rename", FIXTURES / "tiny_lm.safetensors", r"(a)\1", "b", "-o", tmp_path / "r.safetensors")
    assert code == 4
    assert r"'(a)\1'" in err and "\\\\" not in err
