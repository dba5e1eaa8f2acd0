"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over flat ragged batches.

A batch is one flat run of tokens from many sequences ([T, hidden]); only
attention needs to know where one sequence ends, and it learns that from the
per-step AttentionStep. The families differ by flags in ModelConfig: q/k/v
biases (Qwen2), per-head q/k RMSNorm (Qwen3), tied embeddings.

The last layer's attention output and MLP matter only for tokens whose logits
are wanted; given an AttentionStep narrowed to those rows it computes only them
(every token still stores its keys and values), about a tenth of a prefill.

q, k and v share one projection and gate and up another: two large matmuls
instead of five small ones per layer. The loader splits and joins the
checkpoint's separate matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tropical.engine.attention import AttentionStep, LayerCache
from tropical.engine.config import ModelConfig
from tropical.engine.models.rope import RotaryEmbedding, rotate

Rotation = tuple[torch.Tensor, torch.Tensor]  # cos, sin of every token in the step


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in fp32 and scale in the model's dtype, in the reference's order, so bf16 agrees too."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, rotation: Rotation, attention: AttentionStep, cache: LayerCache) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        attention.write(rotate(k, *rotation), v, cache)
        if attention.rows is not None:
            q = q[attention.rows]
            rotation = (rotation[0][attention.rows], rotation[1][attention.rows])
        out = attention.attend(rotate(q, *rotation), cache)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotation: Rotation, attention: AttentionStep, cache: LayerCache) -> torch.Tensor:
        """[T, hidden] -> [T, hidden], or [rows, hidden] when `attention` is narrowed to rows."""
        out = self.self_attn(self.input_layernorm(x), rotation, attention, cache)
        x = out + (x if attention.rows is None else x[attention.rows])
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config, max_positions)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionStep,
        caches: list[LayerCache],
        last: AttentionStep | None = None,
    ) -> torch.Tensor:
        """Hidden states of a flat ragged batch, before the final norm: [T, hidden], or [rows, hidden] of `last`.

        `last`, for the last layer, is the same step narrowed to the rows that need logits.
        """
        x = self.embed_tokens(input_ids)
        rotation = self.rope(positions, x.dtype)
        final = len(self.layers) - 1
        for i, (layer, cache) in enumerate(zip(self.layers, caches, strict=True)):
            x = layer(x, rotation, last if i == final and last is not None else attention, cache)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits, only for the rows that need them (the last token of each finished span)."""
        return self.lm_head(self.norm(hidden))
