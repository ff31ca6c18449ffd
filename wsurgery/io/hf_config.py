"""Hugging Face model folders: ``tie_word_embeddings`` against the ties and values of the file.

transformers ties the output head to the input embedding when the config's
``tie_word_embeddings`` is true (its default when the key is absent): it then loads the
embedding and makes the head the same tensor, whatever the file stores under the head's
name. When it is false, it loads the head from the file, and a head the file does not
store is initialized randomly. So the config and the file disagree when:

- the config ties, and the file stores a head whose values differ from the embedding's
  (the head's values are silently replaced by the embedding's), or ties the head with a
  transform (a transposed tie is no tie transformers knows);
- the config does not tie, and the file stores no head (absent, or in safetensors only an
  alias record, which transformers does not read).

The names of the head and the embedding come from the config's architecture family,
heuristically (``lm_head.weight``, ``embed_out.weight``; ``model.embed_tokens.weight``,
``transformer.wte.weight``, ...). Values are compared only when both are stored and the
config ties them: the check is otherwise headers only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..model import Checkpoint

KEY = "tie_word_embeddings"

# model_type -> the head's name, where it is not lm_head.weight
_HEAD_BY_TYPE = {
    "gpt_neox": "embed_out.weight",
    "gpt_neox_japanese": "embed_out.weight",
    "bert": "cls.predictions.decoder.weight",
    "roberta": "lm_head.decoder.weight",
    "xlm-roberta": "lm_head.decoder.weight",
    "camembert": "lm_head.decoder.weight",
    "internlm2": "output.weight",
}
_HEADS = (
    "lm_head.weight",
    "embed_out.weight",
    "output.weight",
    "lm_head.decoder.weight",
    "cls.predictions.decoder.weight",
    "language_model.lm_head.weight",
    "model.lm_head.weight",
)
_EMBEDDINGS = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight",
    "transformer.word_embeddings.weight",
    "shared.weight",
    "model.shared.weight",
    "bert.embeddings.word_embeddings.weight",
    "roberta.embeddings.word_embeddings.weight",
    "model.tok_embeddings.weight",
    "tok_embeddings.weight",
    "embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "wte.weight",
)
_EMBEDDING_ENDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
# architectures (class names) that have an output head to tie
_HEAD_CLASSES = (
    "ForCausalLM",
    "LMHeadModel",
    "ForMaskedLM",
    "ForConditionalGeneration",
    "ForPreTraining",
    "WithLMHead",
)


def _section(config: dict) -> dict:
    """Where ``tie_word_embeddings`` lives: the top level, or a multimodal ``text_config``."""
    text = config.get("text_config")
    if KEY not in config and isinstance(text, dict) and KEY in text:
        return text
    return config


def configured(config: dict) -> bool | None:
    """``tie_word_embeddings`` as the config says it (None: not set, or not a bool)."""
    value = _section(config).get(KEY)
    return value if isinstance(value, bool) else None


def _has_head_class(config: dict) -> bool:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs:
        return True  # unknown: assume a model with a head
    return any(isinstance(a, str) and a.endswith(_HEAD_CLASSES) for a in archs)


def head_and_embedding(config: dict, names) -> tuple[str, str | None]:
    """The head's name (present or expected) and the embedding's (None if none is found)."""
    names = list(names)
    present = set(names)
    model_type = config.get("model_type")
    head = _HEAD_BY_TYPE.get(model_type) if isinstance(model_type, str) else None
    if head is None:
        head = next((h for h in _HEADS if h in present), None)
    if head is None:
        head = next((n for n in names if n.endswith("lm_head.weight")), "lm_head.weight")
    embedding = next((e for e in _EMBEDDINGS if e in present), None)
    if embedding is None:
        embedding = next((n for n in names if n.endswith(_EMBEDDING_ENDINGS) and n != head), None)
    return head, embedding


@dataclass
class TieReport:
    """The config's ``tie_word_embeddings`` and what the file holds.

    Attributes:
        config_value: as ``config.json`` says it (None: not set; transformers assumes true).
        head, embedding: the names found (``embedding`` None when none was found).
        file: ``"tied"`` (the head is the embedding, no transform), ``"stored"`` (a
            tensor of its own), ``"alias"`` (an alias of something else, or transformed),
            ``"absent"``.
        equal: for a stored head with a tying config, whether its values equal the
            embedding's (None when not compared).
        warnings: each disagreement, one line each.
    """

    config_value: bool | None
    head: str
    embedding: str | None
    file: str
    equal: bool | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            KEY: self.config_value,
            "head": self.head,
            "embedding": self.embedding,
            "file": self.file,
            "equal": self.equal,
            "warnings": list(self.warnings),
        }


def _file_state(ckpt: Checkpoint, head: str, embedding: str | None) -> str:
    if embedding is not None and head in ckpt.stored and embedding in ckpt.aliases:
        e = ckpt.aliases[embedding]  # tied the other way round (a torch file read by name)
        return "tied" if e.transform.is_identity and e.source == head else "stored"
    if head in ckpt.aliases:
        a = ckpt.aliases[head]
        emb_source = embedding
        if embedding is not None and embedding in ckpt.aliases:
            e = ckpt.aliases[embedding]
            emb_source = e.source if e.transform.is_identity else None
        return "tied" if a.transform.is_identity and a.source == emb_source else "alias"
    return "stored" if head in ckpt.stored else "absent"


def check_ties(ckpt: Checkpoint, config: dict, *, compare: bool = True) -> TieReport:
    """Compare ``config``'s ``tie_word_embeddings`` with ``ckpt``'s head and embedding.

    Args:
        compare: read the head and the embedding to compare their values, when both are
            stored and the config ties them.
    """
    head, embedding = head_and_embedding(config, ckpt.names())
    value = configured(config)
    ties = True if value is None else value
    state = _file_state(ckpt, head, embedding)
    report = TieReport(value, head, embedding, state)
    said = f"config.json says {KEY}={'true' if ties else 'false'}"
    if value is None:
        said += " (not set: the default)"
    if ties and state == "alias":
        a = ckpt.aliases[head]
        report.warnings.append(
            f"{said}, but {head} is {a.transform}({a.source}), not the embedding {embedding}: "
            f"transformers will make {head} the embedding itself"
        )
    elif ties and state == "stored" and embedding is not None and compare:
        report.equal, detail = _same_values(ckpt, embedding, head)
        if not report.equal:
            report.warnings.append(
                f"{said}, but {head} is stored with values that differ from {embedding} ({detail}): "
                f"transformers will replace {head} with {embedding}"
            )
    elif not ties and head not in ckpt.stored and _has_head_class(config):
        # an alias in a torch file is shared storage that loads as a tensor; in safetensors
        # it is a metadata record that transformers does not read
        if state == "absent" or ckpt.format.startswith("safetensors"):
            what = "not in the file" if state == "absent" else "not stored in the file (only an alias record)"
            report.warnings.append(f"{said}, but {head} is {what}: transformers will initialize {head} randomly")
    return report


def _same_values(ckpt: Checkpoint, a: str, b: str) -> tuple[bool, str]:
    from .. import lookup

    sa, sb = lookup.entry(ckpt, a), lookup.entry(ckpt, b)
    if tuple(sa.shape) != tuple(sb.shape):
        return False, f"shapes {tuple(sa.shape)} and {tuple(sb.shape)}"
    if sa.dtype != sb.dtype:
        return False, f"dtypes {sa.dtype} and {sb.dtype}"
    ta, tb = ckpt.get_tensor(a), ckpt.get_tensor(b)
    same = ta == tb
    if ta.is_floating_point() or ta.is_complex():
        same |= ta.isnan() & tb.isnan()  # NaN in the same place is the same value
    if bool(same.all()):
        return True, ""
    if ta.dtype.is_floating_point:
        diff = float((ta.double() - tb.double()).abs().nan_to_num(float("inf")).max())
        return False, f"max abs diff {diff:g}"
    return False, "values differ"


def wanted(ckpt: Checkpoint, config: dict) -> bool | None:
    """``tie_word_embeddings`` true to ``ckpt``'s ties: true when the head is the embedding
    (a tie without transform), false when the head is stored or tied otherwise, None when
    there is no head."""
    head, embedding = head_and_embedding(config, ckpt.names())
    state = _file_state(ckpt, head, embedding)
    return None if state == "absent" else state == "tied"


def config_for_output(ckpt: Checkpoint, config: dict) -> tuple[dict | None, dict]:
    """The config to write beside ``ckpt``'s weights: None when it stays as it is, else the
    changed config; and the change (``{"tie_word_embeddings": {"from": x, "to": y}}``)."""
    want = wanted(ckpt, config)
    if want is None:
        return None, {}
    value = configured(config)
    if value == want or (value is None and want):  # not set means true
        return None, {}
    out = json.loads(json.dumps(config))  # a deep copy that keeps the key order
    section = _section(out)
    section[KEY] = want
    return out, {KEY: {"from": value, "to": want}}


def dump_config(config: dict) -> bytes:
    """``config.json`` as transformers writes it: two-space indent, a final newline."""
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
