"""Small transformers models for the tests that use transformers itself as the oracle,
built by seeded factories (no hub access)."""

from __future__ import annotations

from typing import Any


def tiny_llama(seed: int = 0, *, tie: bool = False) -> Any:
    """A two-layer Llama-like causal LM (vocab 64, width 32, grouped-query attention), its
    weights drawn from ``torch.manual_seed(seed)``, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).eval()
