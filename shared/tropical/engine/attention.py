"""Attention over the paged KV cache for a ragged step, with two interchangeable backends.

Each step the runner describes its chunks once (`Span`s); the backend turns that
into a small per-step object every layer uses to store its new keys and values
and to attend. The layers never see block tables or sequence boundaries.

A step may ask for the attention output of some `rows` only (the last layer
needs just the tokens whose logits are sampled); each such row is a one-token
query over its own context.

Slot `b * block_size + i` of the cache is token `i` of block `b`. Each backend
picks the layout of a layer's cache (`head_major`):
- flash-attn reads `[num_blocks, block_size, kv_heads, head_dim]` in place;
- SDPA keeps `[kv_heads, slots, head_dim]`: a sequence on adjacent blocks is
  then a plain slice per head, read sequentially, a third faster on the CPU
  than the token-major layout.

On a GPU the SDPA backend hands every one-token query of a step (the decodes
of a mixed step, all the rows of the last layer's narrowed step) to the paged
decode kernel in one call, instead of one SDPA launch per sequence.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from tropical.engine.paged_decode import PagedAttention, padded_tables, paged_decode

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
    @property
    def rows(self) -> torch.Tensor | None:
        """The batch rows whose queries `attend` takes; None: all."""

    def write(self, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> None:
        """Store the step's new keys and values [tokens, kv_heads, head_dim]."""

    def attend(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """Causal attention of q [rows, heads, head_dim] over each sequence's whole context."""


class AttentionBackend(Protocol):
    name: str
    head_major: bool

    def prepare(self, spans: Sequence[Span], rows: Sequence[int] | None = None) -> tuple[AttentionStep, AttentionStep | None]:
        """The step for every layer, and with `rows` the same step narrowed to those rows (for the last layer)."""


def slot_mapping(spans: Sequence[Span], block_size: int) -> list[int]:
    """The cache slot each new token's key and value go to, in batch order."""
    slots: list[int] = []
    for span in spans:
        for position in range(span.start, span.context):
            slots.append(span.block_table[position // block_size] * block_size + position % block_size)
    return slots


def row_spans(spans: Sequence[Span], rows: Sequence[int]) -> list[Span]:
    """Each row as a one-token span: its query sees its sequence up to and including itself."""
    owners: list[tuple[Span, int]] = [(span, span.start + i) for span in spans for i in range(span.num_tokens)]
    return [Span(owners[row][1], 1, owners[row][0].block_table) for row in rows]


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


def _rows_tensor(rows: Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    return None if rows is None else torch.tensor(rows, dtype=torch.long, device=device)


@dataclass(frozen=True)
class _Query:
    """One SDPA call: queries `begin:end` of the step over context `keys`, causal by `mask` or `causal`."""

    begin: int
    end: int
    keys: torch.Tensor | slice
    mask: torch.Tensor | None
    causal: bool


@dataclass(frozen=True)
class _DecodeGroup:
    """A step's one-token queries (`rows` of q), attended in one paged-decode call."""

    rows: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    kernel: PagedAttention
    block_size: int


class SdpaAttention:
    """PyTorch's scaled_dot_product_attention, one call per sequence; runs anywhere, CPU included.

    With a `decode_kernel` (on a GPU: `paged_decode`) one-token queries go to it together instead.
    """

    name = "sdpa"
    head_major = True

    def __init__(
        self, block_size: int, scale: float, device: torch.device, decode_kernel: PagedAttention | None = None
    ) -> None:
        self.block_size = block_size
        self.scale = scale
        self.device = device
        self.decode_kernel = decode_kernel

    def prepare(self, spans: Sequence[Span], rows: Sequence[int] | None = None) -> tuple[AttentionStep, AttentionStep | None]:
        slots = torch.tensor(slot_mapping(spans, self.block_size), dtype=torch.long, device=self.device)
        step = _SdpaStep(slots, *self._queries(spans), self.scale, None)
        if rows is None:
            return step, None
        narrowed = self._queries(row_spans(spans, rows))
        return step, _SdpaStep(slots, *narrowed, self.scale, _rows_tensor(rows, self.device))

    def _queries(self, spans: Sequence[Span]) -> tuple[list[_Query], _DecodeGroup | None]:
        queries: list[_Query] = []
        grouped: list[tuple[int, Span]] = []
        begin = 0
        for span in spans:
            end = begin + span.num_tokens
            if span.num_tokens == 1 and self.decode_kernel is not None:
                grouped.append((begin, span))
            elif span.num_tokens == 1 or span.start == 0:  # one query sees everything; a fresh prompt is square
                queries.append(_Query(begin, end, context_slots(span, self.block_size, self.device), None, span.num_tokens > 1))
            else:  # a later chunk: causal, aligned to the end of its context
                positions = torch.arange(span.start, span.context, device=self.device)
                mask = torch.arange(span.context, device=self.device)[None, :] <= positions[:, None]
                queries.append(_Query(begin, end, context_slots(span, self.block_size, self.device), mask, False))
            begin = end
        return queries, self._group(grouped)

    def _group(self, grouped: list[tuple[int, Span]]) -> _DecodeGroup | None:
        if not grouped or self.decode_kernel is None:  # nothing is grouped without a kernel
            return None
        tables = padded_tables([span.block_table[: -(-span.context // self.block_size)] for _, span in grouped])
        return _DecodeGroup(
            rows=torch.tensor([row for row, _ in grouped], dtype=torch.long, device=self.device),
            block_tables=tables.to(self.device),
            context_lens=torch.tensor([span.context for _, span in grouped], dtype=torch.int32, device=self.device),
            kernel=self.decode_kernel,
            block_size=self.block_size,
        )


@dataclass(frozen=True)
class _SdpaStep:
    slots: torch.Tensor
    queries: list[_Query]
    group: _DecodeGroup | None
    scale: float
    rows: torch.Tensor | None

    def write(self, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> None:
        k_cache, v_cache = cache  # [kv_heads, slots, head_dim]
        k_cache.index_copy_(1, self.slots, k.transpose(0, 1))
        v_cache.index_copy_(1, self.slots, v.transpose(0, 1))

    def attend(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        k_cache, v_cache = cache
        out = torch.empty_like(q)
        if (group := self.group) is not None:
            out[group.rows] = group.kernel(
                q[group.rows], k_cache, v_cache, group.block_tables, group.context_lens, self.scale, group.block_size
            )
        for query in self.queries:
            # [1, heads, tokens, head_dim]: the 4-D form is what selects the fused kernel on the CPU
            out[query.begin : query.end] = F.scaled_dot_product_attention(
                q[None, query.begin : query.end].transpose(1, 2),
                k_cache[None, :, query.keys],
                v_cache[None, :, query.keys],
                attn_mask=query.mask,
                is_causal=query.causal,
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
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]

        self.kernel = flash_attn_varlen_func
        self.block_size = block_size
        self.scale = scale
        self.device = device
        self.paged = block_size % 256 == 0

    def prepare(self, spans: Sequence[Span], rows: Sequence[int] | None = None) -> tuple[AttentionStep, AttentionStep | None]:
        slots = torch.tensor(slot_mapping(spans, self.block_size), dtype=torch.long, device=self.device)
        step = self._step(slots, spans, None)
        if rows is None:
            return step, None
        return step, self._step(slots, row_spans(spans, rows), _rows_tensor(rows, self.device))

    def _step(self, slots: torch.Tensor, queries: Sequence[Span], rows: torch.Tensor | None) -> _FlashStep:
        q_lens = [span.num_tokens for span in queries]
        k_lens = [span.context for span in queries]
        extra: dict[str, Any] = {}
        if self.paged:
            width = max((len(span.block_table) for span in queries), default=0)
            tables = [list(span.block_table) + [0] * (width - len(span.block_table)) for span in queries]
            extra["block_table"] = torch.tensor(tables, dtype=torch.int32, device=self.device)
            keys = None
        else:
            parts = [context_slots(span, self.block_size, self.device) for span in queries]
            ranges = [torch.arange(p.start, p.stop, device=self.device) if isinstance(p, slice) else p for p in parts]
            keys = torch.cat(ranges) if ranges else torch.empty(0, dtype=torch.long, device=self.device)
        return _FlashStep(
            kernel=self.kernel,
            slots=slots,
            keys=keys,
            rows=rows,
            arguments=dict(
                cu_seqlens_q=self._cumulative(q_lens),
                cu_seqlens_k=self._cumulative(k_lens),
                max_seqlen_q=max(q_lens, default=0),
                max_seqlen_k=max(k_lens, default=0),
                softmax_scale=self.scale,
                causal=True,  # aligned to the end of each context, as chunks need
                **extra,
            ),
        )

    def _cumulative(self, lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0, *lengths], dtype=torch.int32, device=self.device).cumsum(0, dtype=torch.int32)


@dataclass(frozen=True)
class _FlashStep:
    kernel: Any
    slots: torch.Tensor
    keys: torch.Tensor | None  # the gathered contexts' slots; None when the kernel reads blocks in place
    rows: torch.Tensor | None
    arguments: dict[str, Any]

    def write(self, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> None:
        for new, layer in zip((k, v), cache, strict=True):  # [num_blocks, block_size, kv_heads, head_dim]
            layer.view(-1, *layer.shape[2:]).index_copy_(0, self.slots, new)

    def attend(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        if q.shape[0] == 0:  # a step of prompt chunks none of which ends its prompt
            return q
        k_cache, v_cache = cache
        if self.keys is not None:
            k_cache = k_cache.view(-1, *k_cache.shape[2:])[self.keys]
            v_cache = v_cache.view(-1, *v_cache.shape[2:])[self.keys]
        return self.kernel(q, k_cache, v_cache, **self.arguments)


def flash_attn_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def select_backend(choice: str, block_size: int, scale: float, device: torch.device) -> AttentionBackend:
    """`auto` takes flash-attn when it is installed and the cache is on a GPU, else SDPA."""
    if choice == "flash_attn" or (choice == "auto" and flash_attn_available(device)):
        if not flash_attn_available(device):
            raise ValueError("the flash_attn backend needs a CUDA device and the flash-attn package")
        return FlashAttention(block_size, scale, device)
    if choice in ("auto", "sdpa"):
        return SdpaAttention(block_size, scale, device, paged_decode if device.type == "cuda" else None)
    raise ValueError(f"unknown attention backend {choice!r} (choose auto, sdpa or flash_attn)")
