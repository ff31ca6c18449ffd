"""A Hugging Face model folder as input (read as a whole, its config checked against the
file's ties) and folder outputs (weights plus every other file, config kept true)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import wsurgery
from wsurgery.errors import InputError, OutputError
from wsurgery.io.writer import TMP_SUFFIX

from ..conftest import sha256

VOCAB, DIM = 16, 4
OTHER_FILES = {
    "tokenizer.json": '{"model": {"vocab": {"a": 0}}}\n',
    "tokenizer_config.json": '{"model_max_length": 8}',
    "special_tokens_map.json": "{}",
    "generation_config.json": '{\n  "bos_token_id": 1\n}\n',
    "README.md": "# tiny\n",
    "training_args.bin": "not weights",
}


def weights(tied: str = "equal", head: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A llama-like state dict: the head equal to the embedding, different, or absent."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(VOCAB, DIM, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, DIM, generator=g),
        "model.norm.weight": torch.ones(DIM),
    }
    if head:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone() if tied == "equal" else torch.randn(VOCAB, DIM)
    return sd


def hf_folder(
    path: Path,
    sd: dict,
    *,
    tie: bool | None = True,
    as_: str = "safetensors",
    arch: str = "LlamaForCausalLM",
    extra: dict | None = None,
) -> Path:
    path.mkdir(parents=True)
    config = {"architectures": [arch], "model_type": "llama", "hidden_size": DIM, "vocab_size": VOCAB}
    if tie is not None:
        config["tie_word_embeddings"] = tie
    config.update(extra or {})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, text in OTHER_FILES.items():
        (path / name).write_text(text)
    if as_ == "safetensors":
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    elif as_ == "bin":
        torch.save(sd, path / "pytorch_model.bin")
    else:
        wsurgery.save_state_dict(sd, path / "tmp.safetensors")
        with wsurgery.open(path / "tmp.safetensors") as c:
            c.save(path / "shards", max_shard_size=300)
        for f in (path / "shards").iterdir():
            f.rename(path / f.name)
        (path / "shards").rmdir()
        (path / "tmp.safetensors").unlink()
    return path


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def no_leftovers(folder: Path) -> bool:
    return not [n for n in os.listdir(folder) if n.endswith(TMP_SUFFIX)]


# --- input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_", ["safetensors", "bin", "sharded"])
def test_a_model_folder_is_read_as_a_whole(tmp_path, cli, as_):
    folder = hf_folder(tmp_path / "m", weights(), as_=as_)
    with wsurgery.open(folder) as c:
        assert set(c.names()) == set(weights())
        assert c.model_folder.config["model_type"] == "llama"
        assert c.model_folder.files == sorted(["config.json", *OTHER_FILES])
    code, stdout, stderr = cli("inspect", folder)
    assert code == 0 and stderr == "", stderr
    assert "config.json: model_type=llama, tie_word_embeddings=true; lm_head.weight is stored" in stdout
    assert "(values equal to the embedding's)" in stdout
    code, stdout, _ = cli("inspect", folder, "--json")
    obj = json.loads(stdout)
    assert obj["config"]["tie_word_embeddings"] is True and obj["config"]["head"] == "lm_head.weight"
    assert obj["config"]["embedding"] == "model.embed_tokens.weight" and obj["config"]["equal"] is True
    assert obj["warnings"] == [] and "tokenizer.json" in obj["files"]


def test_a_folder_prefers_safetensors_like_transformers(tmp_path):
    folder = hf_folder(tmp_path / "m", weights())
    torch.save({"other": torch.zeros(1)}, folder / "pytorch_model.bin")
    with wsurgery.open(folder) as c:
        assert "other" not in c.names() and c.format == "safetensors"


def test_config_says_tied_but_the_head_differs(tmp_path, cli):
    folder = hf_folder(tmp_path / "m", weights(tied="different"), tie=True)
    code, stdout, stderr = cli("inspect", folder)
    assert code == 0
    assert stderr.startswith("warning: config.json says tie_word_embeddings=true, but lm_head.weight is stored")
    assert "differ from model.embed_tokens.weight" in stderr and "transformers will replace" in stderr
    code, stdout, stderr = cli("inspect", folder, "--json")
    assert code == 0 and stderr == ""
    (warning,) = json.loads(stdout)["warnings"]
    assert "max abs diff" in warning and json.loads(stdout)["config"]["equal"] is False


def test_config_not_set_means_tied(tmp_path, cli):
    folder = hf_folder(tmp_path / "m", weights(tied="different"), tie=None)
    code, stdout, stderr = cli("inspect", folder)
    assert "tie_word_embeddings=not set (true by default)" in stdout
    assert "tie_word_embeddings=true (not set: the default), but lm_head.weight" in stderr


@pytest.mark.parametrize("how", ["absent", "alias"])
def test_config_says_untied_but_there_is_no_head(tmp_path, cli, how):
    sd = weights(head=how != "absent")
    folder = tmp_path / "m"
    if how == "alias":  # the head stored only as an alias record
        hf_folder(folder, weights(head=False), tie=False)
        with wsurgery.open(folder / "model.safetensors") as c:
            c.copy("model.embed_tokens.weight", "lm_head.weight", new=True).tie(
                "model.embed_tokens.weight", "lm_head.weight"
            ).save(folder / "model.safetensors", overwrite=True)
    else:
        hf_folder(folder, sd, tie=False)
    code, stdout, stderr = cli("inspect", folder)
    assert code == 0
    assert stderr.startswith("warning: config.json says tie_word_embeddings=false, but lm_head.weight is ")
    assert "transformers will initialize lm_head.weight randomly" in stderr


def test_no_warning_when_config_and_file_agree(tmp_path, cli):
    cases = [
        (weights(head=False), True),  # tied: no head stored
        (weights(tied="different"), False),  # untied: the head stored
        (weights(head=False), None),  # default tied, no head
    ]
    for i, (sd, tie) in enumerate(cases):
        folder = hf_folder(tmp_path / f"m{i}", sd, tie=tie)
        code, _, stderr = cli("inspect", folder)
        assert code == 0 and stderr == "", (tie, stderr)
    # a model class without a head needs none
    folder = hf_folder(tmp_path / "base", weights(head=False), tie=False, arch="LlamaModel")
    assert cli("inspect", folder)[2] == ""


def test_architecture_families_find_their_head_and_embedding(tmp_path):
    from wsurgery.io.hf_config import head_and_embedding

    assert head_and_embedding({"model_type": "gpt2"}, ["transformer.wte.weight", "lm_head.weight"]) == (
        "lm_head.weight",
        "transformer.wte.weight",
    )
    assert head_and_embedding({"model_type": "gpt_neox"}, ["gpt_neox.embed_in.weight"]) == (
        "embed_out.weight",
        "gpt_neox.embed_in.weight",
    )
    assert head_and_embedding({}, ["enc.word_embeddings.weight", "x"]) == (
        "lm_head.weight",
        "enc.word_embeddings.weight",
    )


def test_a_config_that_is_not_json_is_an_input_error(tmp_path, cli):
    folder = hf_folder(tmp_path / "m", weights())
    (folder / "config.json").write_text("{not json")
    code, _, stderr = cli("inspect", folder)
    assert code == 3 and "config.json: not valid JSON" in stderr
    with pytest.raises(InputError):
        wsurgery.open(folder)


# --- output -----------------------------------------------------------------------------------


def test_folder_output_carries_the_other_files_and_keeps_the_config_true(tmp_path, cli):
    src = hf_folder(tmp_path / "m", weights(), tie=False)
    (src / "original").mkdir()
    torch.save({"x": torch.zeros(1)}, src / "original" / "consolidated.00.pth")
    torch.save({"x": torch.zeros(1)}, src / "pytorch_model.bin")  # old weights: never carried
    torch.save({"x": torch.zeros(1)}, src / "adapter_model.bin")
    out = tmp_path / "tied"
    code, stdout, stderr = cli(
        "tie", src, "--src", "model.embed_tokens.weight", "--dst", "lm_head.weight", "--verify", "-o", out
    )
    assert code == 0, stderr
    assert (
        "a folder with model.safetensors" in stdout
        and "not carried (not files of the model folder): original/" in stdout
    )
    assert "config.json: tie_word_embeddings false -> true" in stdout
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *OTHER_FILES])
    for name in OTHER_FILES:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert config_of(out) == {**config_of(src), "tie_word_embeddings": True}
    assert list(config_of(out)) == list(config_of(src))  # key order kept
    assert wsurgery.load(out).aliases["lm_head.weight"].source == "model.embed_tokens.weight"
    assert cli("inspect", out)[2] == "" and no_leftovers(tmp_path)

    # untied again: the config says false, written as a torch file this time
    back = tmp_path / "untied"
    code, stdout, stderr = cli("untie", out, "-o", back, "--format", "torch", "--json")
    assert code == 0, stderr
    obj = json.loads(stdout)
    assert obj["folder"] is True and obj["format"] == "torch"
    assert obj["config"] == {"tie_word_embeddings": {"from": True, "to": False}}
    assert sorted(os.listdir(back)) == sorted(["config.json", "pytorch_model.bin", *OTHER_FILES])
    assert config_of(back)["tie_word_embeddings"] is False
    sd = torch.load(back / "pytorch_model.bin", weights_only=True)
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


def test_a_config_that_is_already_true_is_copied_byte_for_byte(tmp_path, cli):
    for i, tie in enumerate([True, None]):
        src = hf_folder(tmp_path / f"m{i}", weights(), tie=tie)
        out = tmp_path / f"out{i}"
        code, stdout, stderr = cli(
            "tie", src, "--src", "model.embed_tokens.weight", "--dst", "lm_head.weight", "-o", out
        )
        assert code == 0, stderr
        assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
        assert "config.json:" not in stdout


def test_a_stored_head_with_no_key_sets_false(tmp_path, cli):
    src = hf_folder(tmp_path / "m", weights(tied="different"), tie=None)
    out = tmp_path / "out"
    code, _, stderr = cli("drop", src, "model.norm.weight", "-o", out)
    assert code == 0, stderr
    assert config_of(out)["tie_word_embeddings"] is False


def test_no_head_leaves_the_config(tmp_path, cli):
    src = hf_folder(tmp_path / "m", weights(), tie=True)
    out = tmp_path / "out"
    code, _, stderr = cli("drop", src, "lm_head.weight", "-o", out)
    assert code == 0, stderr
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()


def test_a_multimodal_text_config_is_where_the_key_is(tmp_path, cli):
    src = hf_folder(tmp_path / "m", weights(), tie=None, extra={"text_config": {"tie_word_embeddings": True}})
    out = tmp_path / "out"
    code, _, stderr = cli("convert", src, "-o", out)
    assert code == 0, stderr
    cfg = config_of(out)
    assert cfg["text_config"]["tie_word_embeddings"] is False and "tie_word_embeddings" not in cfg


def test_sharded_folder_output_from_a_model_folder(tmp_path, cli):
    src = hf_folder(tmp_path / "m", weights(tied="different"), tie=False, as_="bin")
    out = tmp_path / "out"
    code, stdout, stderr = cli("convert", src, "-o", out, "--max-shard-size", "300", "--json")
    assert code == 0, stderr
    obj = json.loads(stdout)
    assert len(obj["shards"]) > 1 and obj["files"] == sorted(["config.json", *OTHER_FILES])
    names = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in names and "pytorch_model.bin" not in names
    assert set(sorted(["config.json", *OTHER_FILES])) <= set(names)
    assert set(wsurgery.load(out).names()) == set(weights())


def test_a_file_output_from_a_model_folder_is_one_file(tmp_path, cli):
    src = hf_folder(tmp_path / "m", weights())
    code, _, stderr = cli("convert", src, "-o", tmp_path / "one.safetensors")
    assert code == 0, stderr
    assert set(load_file(tmp_path / "one.safetensors")) == set(weights())
    code, _, stderr = cli("convert", src)  # the default: <folder>.safetensors beside it
    assert code == 0, stderr and (tmp_path / "m.safetensors").is_file()


def test_in_place_on_a_model_folder_replaces_it_whole(tmp_path, cli):
    src = hf_folder(tmp_path / "m", weights(), tie=False, as_="sharded")
    code, _, stderr = cli("tie", src, "--src", "model.embed_tokens.weight", "--dst", "lm_head.weight", "-o", src)
    assert code == 5 and "--in-place" in stderr
    code, stdout, stderr = cli(
        "tie", src, "--src", "model.embed_tokens.weight", "--dst", "lm_head.weight", "--in-place"
    )
    assert code == 0, stderr
    assert sorted(os.listdir(src)) == sorted(["config.json", "model.safetensors", *OTHER_FILES])
    assert config_of(src)["tie_word_embeddings"] is True
    assert wsurgery.load(src).aliases["lm_head.weight"].source == "model.embed_tokens.weight"
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_an_existing_output_folder_needs_overwrite_and_survives_a_failure(tmp_path, cli, monkeypatch):
    src = hf_folder(tmp_path / "m", weights())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, _, stderr = cli("convert", src, "-o", out)
    assert code == 5 and "exists" in stderr and "--force" in stderr
    before = sha256(out)

    from wsurgery.io import hf as hf_files

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_files.shutil, "copyfileobj", broken)
    code, _, stderr = cli("convert", src, "-o", out, "--force")
    assert code == 5 and "No space left on device" in stderr
    assert sha256(out) == before and no_leftovers(tmp_path)
    monkeypatch.undo()
    code, _, stderr = cli("convert", src, "-o", out, "--force")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "tokenizer.json").exists()
    assert no_leftovers(tmp_path)


def test_library_folder_output(tmp_path):
    src = hf_folder(tmp_path / "m", weights(tied="different"), tie=True)
    with wsurgery.open(src) as c:
        r = c.untie().save(tmp_path / "out")
    assert r.files == sorted(["config.json", *OTHER_FILES]) and r.config == {
        "tie_word_embeddings": {"from": True, "to": False}
    }
    with wsurgery.open(src) as c:
        r = c.save(tmp_path / "dir/", format="torch")
    assert r.format == "torch" and (tmp_path / "dir" / "pytorch_model.bin").is_file()
    with pytest.raises(OutputError) as info:
        wsurgery.convert(src, src)
    assert info.value.reason == "is_input"
