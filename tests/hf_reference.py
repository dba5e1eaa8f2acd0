"""Small Hugging Face reference models of each supported family, with seeded weights, for equivalence tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: two heads share each KV head
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

FAMILIES = {
    # llama3 rope scaling with a short original context, so the scaling changes the logits in these tests
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            **COMMON,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    ),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False)),  # q/k norms
}


def build_reference(family: str, seed: int = 0) -> PreTrainedModel:
    """Every weight random (biases and norm scales too), so a misplaced tensor cannot go unnoticed."""
    torch.manual_seed(seed)
    model = FAMILIES[family]().float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)
    return model


def save_reference(model: PreTrainedModel, path: Path, *, sharded: bool = False) -> Path:
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "5GB")
    return path


@torch.no_grad()
def reference_logits(model: PreTrainedModel, token_ids: list[int]) -> torch.Tensor:
    """Logits at every position of one unpadded sequence, [len, vocab]."""
    return model(torch.tensor([token_ids], device=model.device)).logits[0].float()
