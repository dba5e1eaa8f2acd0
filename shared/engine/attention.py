"""Attention over the paged KV cache for a ragged step, with two interchangeable backends.

Each step the runner describes its chunks once (`Span`s); the backend turns that
into a small per-step object that every layer calls with its own q, k, v and
cache. The layers never see block tables or sequence boundaries.

Slot `b * block_size + i` of the cache is token `i` of block `b`. Each backend
picks the layout of a layer's cache (`head_major`):
- flash-attn reads `[num_blocks, block_size, kv_heads, head_dim]` in place;
- SDPA keeps `[kv_heads, slots, head_dim]`: a sequence on adjacent blocks is
  then a plain slice per head, read sequentially, a third faster on the CPU
  than the token-major layout.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

LayerCache = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values


@dataclass(frozen=True)
class Span:
    """One sequence's share of a step: `num_tokens` new tokens at positions `start` onwards."""

    start: int
    num_tokens: int
    block_table: Sequence[int]

    @property
    def context(self) -> int:
        return self.start + self.num_tokens


class AttentionStep(Protocol):
    """What a layer calls: store the new keys and values, attend over each sequence's whole context."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> torch.Tensor: ...


class AttentionBackend(Protocol):
    name: str
    head_major: bool

    def prepare(self, spans: Sequence[Span]) -> AttentionStep: ...


def slot_mapping(spans: Sequence[Span], block_size: int) -> list[int]:
    """The cache slot each new token's key and value go to, in batch order."""
    slots: list[int] = []
    for span in spans:
        for position in range(span.start, span.context):
            slots.append(span.block_table[position // block_size] * block_size + position % block_size)
    return slots


def context_slots(span: Span, block_size: int, device: torch.device) -> torch.Tensor | slice:
    """The slots of a sequence's whole context: a slice (no copy) when its blocks happen to be adjacent."""
    num_blocks = -(-span.context // block_size)
    table = tuple(span.block_table[:num_blocks])
    first = table[0]
    if table == tuple(range(first, first + num_blocks)):
        return slice(first * block_size, first * block_size + span.context)
    blocks = torch.tensor(table, dtype=torch.long, device=device)
    offsets = torch.arange(block_size, device=device)
    return (blocks[:, None] * block_size + offsets).flatten()[: span.context]


class SdpaAttention:
    """PyTorch's scaled_dot_product_attention, one call per sequence; runs anywhere, CPU included."""

    name = "sdpa"
    head_major = True

    def __init__(self, block_size: int, scale: float, device: torch.device) -> None:
        self.block_size = block_size
        self.scale = scale
        self.device = device

    def prepare(self, spans: Sequence[Span]) -> AttentionStep:
        plans: list[tuple[int, int, torch.Tensor | slice, torch.Tensor | None, bool]] = []
        begin = 0
        for span in spans:
            keys = context_slots(span, self.block_size, self.device)
            end = begin + span.num_tokens
            if span.num_tokens == 1 or span.start == 0:  # a decode sees everything; a fresh prompt is square
                plans.append((begin, end, keys, None, span.num_tokens > 1))
            else:  # a later chunk: causal, aligned to the end of its context
                positions = torch.arange(span.start, span.context, device=self.device)
                mask = torch.arange(span.context, device=self.device)[None, :] <= positions[:, None]
                plans.append((begin, end, keys, mask, False))
            begin = end
        slots = torch.tensor(slot_mapping(spans, self.block_size), dtype=torch.long, device=self.device)
        return _SdpaStep(slots, plans, self.scale)


class _SdpaStep:
    def __init__(
        self,
        slots: torch.Tensor,
        plans: list[tuple[int, int, torch.Tensor | slice, torch.Tensor | None, bool]],
        scale: float,
    ) -> None:
        self.slots = slots
        self.plans = plans
        self.scale = scale

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        k_cache, v_cache = cache  # [kv_heads, slots, head_dim]
        k_cache.index_copy_(1, self.slots, k.transpose(0, 1))
        v_cache.index_copy_(1, self.slots, v.transpose(0, 1))
        out = torch.empty_like(q)
        for begin, end, keys, mask, causal in self.plans:
            # [1, heads, tokens, head_dim]: the 4-D form is what selects the fused kernel on the CPU
            out[begin:end] = F.scaled_dot_product_attention(
                q[None, begin:end].transpose(1, 2),
                k_cache[None, :, keys],
                v_cache[None, :, keys],
                attn_mask=mask,
                is_causal=causal,
                scale=self.scale,
                enable_gqa=True,
            )[0].transpose(0, 1)
        return out


class FlashAttention:
    """flash-attn's varlen kernel: the whole ragged step in one call per layer.

    flash-attn reads the paged cache in place only when blocks hold a multiple
    of 256 tokens; with smaller blocks the context is gathered first.
    """

    name = "flash_attn"
    head_major = False

    def __init__(self, block_size: int, scale: float, device: torch.device) -> None:
        from flash_attn import flash_attn_varlen_func

        self.kernel = flash_attn_varlen_func
        self.block_size = block_size
        self.scale = scale
        self.device = device
        self.paged = block_size % 256 == 0

    def prepare(self, spans: Sequence[Span]) -> AttentionStep:
        def cumulative(lengths: list[int]) -> torch.Tensor:
            return torch.tensor([0, *lengths], dtype=torch.int32, device=self.device).cumsum(0, dtype=torch.int32)

        q_lens = [span.num_tokens for span in spans]
        k_lens = [span.context for span in spans]
        if self.paged:
            width = max(len(span.block_table) for span in spans)
            tables = [list(span.block_table) + [0] * (width - len(span.block_table)) for span in spans]
            keys: torch.Tensor | None = None
            block_table: torch.Tensor | None = torch.tensor(tables, dtype=torch.int32, device=self.device)
        else:
            parts = [context_slots(span, self.block_size, self.device) for span in spans]
            keys = torch.cat(
                [torch.arange(p.start, p.stop, device=self.device) if isinstance(p, slice) else p for p in parts]
            )
            block_table = None
        slots = torch.tensor(slot_mapping(spans, self.block_size), dtype=torch.long, device=self.device)
        return _FlashStep(
            self, slots, cumulative(q_lens), cumulative(k_lens), max(q_lens), max(k_lens), keys, block_table
        )


@dataclass
class _FlashStep:
    backend: FlashAttention
    slots: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    keys: torch.Tensor | None
    block_table: torch.Tensor | None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        k_cache, v_cache = cache  # [num_blocks, block_size, kv_heads, head_dim]
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        flat_k.index_copy_(0, self.slots, k)
        flat_v.index_copy_(0, self.slots, v)
        if self.block_table is not None:
            keys, values = k_cache, v_cache
        else:
            keys, values = flat_k[self.keys], flat_v[self.keys]
        return self.backend.kernel(
            q,
            keys,
            values,
            cu_seqlens_q=self.cu_q,
            cu_seqlens_k=self.cu_k,
            max_seqlen_q=self.max_q,
            max_seqlen_k=self.max_k,
            softmax_scale=self.backend.scale,
            causal=True,
            block_table=self.block_table,
        )


def flash_attn_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def select_backend(choice: str, block_size: int, scale: float, device: torch.device) -> AttentionBackend:
    """`auto` takes flash-attn when it is installed and the cache is on a GPU, else SDPA."""
    if choice == "flash_attn" or (choice == "auto" and flash_attn_available(device)):
        if not flash_attn_available(device):
            raise ValueError("the flash_attn backend needs a CUDA device and the flash-attn package")
        return FlashAttention(block_size, scale, device)
    if choice in ("auto", "sdpa"):
        return SdpaAttention(block_size, scale, device)
    raise ValueError(f"unknown attention backend {choice!r} (choose auto, sdpa or flash_attn)")
