"""No input byte ever changes: every writing command (and diff's HTML report), over every
input kind, with its output beside the input and aimed into it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

_LM = ("layers.0.attn.out.weight", "layers.1.attn.out.weight", "layers.{i}.attn.out.weight", None)
KINDS = {
    # kind: (how to make it, two tensors of one 2-d shape, a per-layer template, a stacked tensor)
    "file": ("tiny_lm.safetensors", *_LM),
    "sharded": ("tiny_lm_sharded", *_LM),
    "model-folder": (None, *_LM),
    "dcp": ("tiny_lm_dcp", *_LM),
    "nemo2": (
        "nemo2_tiny",
        "module.embedding.word_embeddings.weight",
        "module.output_layer.weight",
        None,
        "module.decoder.layers.self_attention.linear_proj.weight",
    ),
}  # fmt: skip


def _hashes(path) -> dict:
    out = {}
    paths = [path] if os.path.isfile(path) else [os.path.join(t, f) for t, _, fs in os.walk(path) for f in fs]
    for p in paths:
        with open(p, "rb") as f:
            out[os.path.relpath(p, path) if p != path else "."] = hashlib.sha256(f.read()).hexdigest()
    return out


def _input(kind: str, fixtures, tmp_path):
    what = KINDS[kind][0]
    if what is not None:
        return fixtures / what
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(fixtures / "tiny_lm.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _commands(kind: str, src, recipe) -> list[list]:
    _, a, b, template, stacked = KINDS[kind]
    cmds = [
        ["tie", src, "--src", a, "--dst", b],
        ["copy", src, "--src", a, "--dst", b],
        ["untie", src],
        ["rename", src, a, "renamed.weight"],
        ["drop", src, a],
        ["keep", src, a],
        ["cast", src, "bfloat16"],
        ["concat", src, "--src", a, "--src", b, "--dst", "joined.weight", "--new"],
        ["split", src, "--src", a, "--dst", "p.weight", "--dst", "q.weight", "--sizes", "4,4", "--new"]
        if kind != "nemo2"
        else ["split", src, "--src", a, "--dst", "p.weight", "--dst", "q.weight", "--sizes", "16,16", "--new"],
        ["apply", recipe, src],
        ["convert", src],
    ]
    if template is not None:
        cmds.append(["stack", src, "--src", template, "--dst", "stacked.weight", "--new"])
    if stacked is not None:
        cmds.append(["unstack", src, "--src", stacked, "--dst", "unstacked.{i}.weight", "--new"])
    return cmds


@pytest.mark.parametrize("kind", list(KINDS))
def test_no_command_changes_an_input_byte(kind, fixtures, tmp_path, cli):
    src = _input(kind, fixtures, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\nsteps:\n  - cast: {dtype: bfloat16}\n")
    before = _hashes(src)
    listing = sorted(os.listdir(src)) if os.path.isdir(src) else None
    other = fixtures / "tiny_lm.safetensors"
    inside = src if os.path.isdir(src) else None
    out = tmp_path / "out"
    for i, cmd in enumerate(_commands(kind, src, recipe)):
        targets = [out / f"{i}.safetensors", out / f"{i}-folder/", out / f"{i}.pt", src]
        if inside is not None:
            targets += [inside / "evil.safetensors", inside / f"{i}/", *(inside / n for n in before if n != ".")]
        for target in targets:
            out.mkdir(exist_ok=True)
            code, _, err = cli(*cmd, "-o", target, "--force")
            assert code in (0, 3, 4, 5), (cmd, target, code, err)
            if target == targets[0]:  # the plain output is written: the command ran
                assert code == 0, (cmd, err)
            assert _hashes(src) == before, (cmd, target, err)
        shutil.rmtree(out)
    report_targets = [tmp_path / "r.html", src] + ([inside / ".metadata", inside / "r.html"] if inside else [])
    for target in report_targets:
        code, _, err = cli("diff", src, other, "--html", target)
        assert code in (0, 1, 2, 5), (target, err)
        assert _hashes(src) == before, target
    assert listing == (sorted(os.listdir(src)) if inside else None)  # nothing added inside either
