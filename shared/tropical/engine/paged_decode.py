"""Decode attention over the paged KV cache, read in place, with shapes fixed by the batch.

A decode step gives every sequence one query token; its keys and values sit in
the cache's blocks wherever the block manager put them. Gathering them into a
contiguous copy first costs more than the attention itself (the copy is the
step's largest memory traffic after the weights), so on a GPU a Triton kernel
walks each sequence's block table and reads the blocks where they are.

The kernel splits each context into partitions (flash-decoding) so that a
small batch still keeps every SM busy; a second kernel merges the partitions'
softmax pieces. Each sequence sizes its own partitions from its length (at
least PARTITION tokens, at most MAX_PARTITIONS of them), so the grid depends
only on the batch size and the widest block table, never on the contexts'
lengths: a CUDA graph captured once per batch size replays it for any contexts.

`paged_decode_reference` computes the same thing with plain PyTorch (gather,
mask, SDPA): the CPU's path and the kernel's test oracle. Without a GPU the
kernel still runs, slowly, in Triton's interpreter (`TRITON_INTERPRET=1`),
which is how CI checks it.

Caches are given as `[kv_heads, slots, head_dim]` views (any strides): slot
`b * block_size + i` is token `i` of block `b`, in either of the engine's
layouts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

PARTITION = 256  # fewest context tokens per program: B=1 at 1k context still spreads over 4 programs per KV head
MAX_PARTITIONS = 16  # most programs per (sequence, KV head); longer contexts get longer partitions
TILE = 64  # tokens per inner iteration
MIN_DOT = 16  # tl.dot needs every dimension to be at least this

# q, k_cache, v_cache, block_tables, context_lens, scale, block_size -> out: either implementation
PagedAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, int], torch.Tensor]


def padded_tables(tables: Sequence[Sequence[int]]) -> torch.Tensor:
    """Host int32 [len(tables), widest], each row zero-padded: row by row through numpy, 8x faster than per-row tensors."""
    host = np.zeros((len(tables), max((len(t) for t in tables), default=0)), dtype=np.int32)
    for row, table in enumerate(tables):
        host[row, : len(table)] = table
    return torch.from_numpy(host)


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """q [B, heads, dim] over each row's first `context_lens[b]` cached tokens -> [B, heads, dim]."""
    offsets = torch.arange(block_size, device=q.device)
    slots = (block_tables.long()[:, :, None] * block_size + offsets).flatten(1)  # [B, width * block_size]
    visible = torch.arange(slots.shape[1], device=q.device)[None, :] < context_lens[:, None].long()
    # slots past a context may never have been written: whatever bits they hold (NaN too) must not reach the sum
    hidden = ~visible[:, None, :, None]
    keys = k_cache[:, slots].transpose(0, 1).masked_fill(hidden, 0.0)  # [B, kv_heads, S, dim]
    values = v_cache[:, slots].transpose(0, 1).masked_fill(hidden, 0.0)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], keys, values, attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out[:, :, 0, :]


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """The Triton kernels: same contract as `paged_decode_reference`; every context must be at least 1."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[0]
    group = heads // kv_heads
    # a plain argument, not a constant of the kernel: steps of many widths share one compiled kernel
    partitions = min(MAX_PARTITIONS, -(-block_tables.shape[1] * block_size // PARTITION))
    kernels = _kernels()
    m = torch.empty((batch, heads, partitions), dtype=torch.float32, device=q.device)
    total = torch.empty_like(m)
    acc = torch.empty((batch, heads, partitions, dim), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    dim_p = max(MIN_DOT, _power_of_two(dim))
    kernels.partition[(batch, kv_heads, partitions)](
        q, k_cache, v_cache, block_tables, context_lens, m, total, acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0), m.stride(0), m.stride(1), acc.stride(0), acc.stride(1), acc.stride(2),
        scale, partitions,
        GROUP=group, GROUP_P=max(MIN_DOT, _power_of_two(group)), DIM=dim, DIM_P=dim_p, BLOCK_SIZE=block_size,
        PARTITION=PARTITION, TILE=TILE, IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    kernels.merge[(batch, heads)](
        m, total, acc, context_lens, out,
        m.stride(0), m.stride(1), acc.stride(0), acc.stride(1), acc.stride(2), out.stride(0), out.stride(1),
        partitions,
        DIM=dim, DIM_P=dim_p, PARTITION=PARTITION, TILE=TILE,
    )  # fmt: skip
    return out


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()



class _Kernels(NamedTuple):
    partition: Any
    merge: Any


@functools.cache
def _kernels() -> _Kernels:
    """Compiled on first use, so that importing the engine never needs Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def partition(
        Q, K, V, TABLES, LENS, M, TOTAL, ACC,
        stride_qb, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
        stride_tb, stride_mb, stride_mh, stride_ab, stride_ah, stride_ap,
        scale, partitions,
        GROUP: tl.constexpr, GROUP_P: tl.constexpr, DIM: tl.constexpr, DIM_P: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, PARTITION: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One (sequence, KV head, partition): the group's queries over one partition of the context."""
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        part = tl.program_id(2)
        length = tl.load(LENS + row)
        span = tl.maximum(PARTITION, tl.cdiv(tl.cdiv(length, partitions), TILE) * TILE)
        start = part * span
        if start < length:
            end = tl.minimum(start + span, length)
            g = tl.arange(0, GROUP_P)
            d = tl.arange(0, DIM_P)
            heads = kv_head * GROUP + g
            live = (g < GROUP)[:, None] & (d < DIM)[None, :]
            q = tl.load(Q + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=live, other=0.0)
            m_i = tl.full((GROUP_P,), float("-inf"), tl.float32)
            l_i = tl.zeros((GROUP_P,), tl.float32)
            acc = tl.zeros((GROUP_P, DIM_P), tl.float32)
            for first in range(start, end, TILE):
                position = first + tl.arange(0, TILE)
                valid = position < end
                block = tl.load(TABLES + row * stride_tb + position // BLOCK_SIZE, mask=valid, other=0)
                slot = block.to(tl.int64) * BLOCK_SIZE + position % BLOCK_SIZE
                readable = valid[:, None] & (d < DIM)[None, :]
                k = tl.load(K + kv_head * stride_kh + slot[:, None] * stride_ks + d[None, :], mask=readable, other=0.0)
                v = tl.load(V + kv_head * stride_vh + slot[:, None] * stride_vs + d[None, :], mask=readable, other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = tl.where(valid[None, :], s * scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.exp(s - m_new[:, None])
                alpha = tl.exp(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
            mine = g < GROUP
            tl.store(M + row * stride_mb + heads * stride_mh + part, m_i, mask=mine)
            tl.store(TOTAL + row * stride_mb + heads * stride_mh + part, l_i, mask=mine)
            target = ACC + row * stride_ab + heads[:, None] * stride_ah + part * stride_ap + d[None, :]
            tl.store(target, acc, mask=live)

    @triton.jit
    def merge(
        M, TOTAL, ACC, LENS, OUT,
        stride_mb, stride_mh, stride_ab, stride_ah, stride_ap, stride_ob, stride_oh,
        partitions,
        DIM: tl.constexpr, DIM_P: tl.constexpr, PARTITION: tl.constexpr, TILE: tl.constexpr,
    ):  # fmt: skip
        """One (sequence, head): the live partitions' pieces weighed by their maxima into one softmax."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        length = tl.load(LENS + row)
        parts = tl.cdiv(length, tl.maximum(PARTITION, tl.cdiv(tl.cdiv(length, partitions), TILE) * TILE))
        base = row * stride_mb + head * stride_mh
        peak = tl.full((), float("-inf"), tl.float32)
        for part in range(0, parts):
            peak = tl.maximum(peak, tl.load(M + base + part))
        d = tl.arange(0, DIM_P)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((DIM_P,), tl.float32)
        for part in range(0, parts):
            weight = tl.exp(tl.load(M + base + part) - peak)
            total += weight * tl.load(TOTAL + base + part)
            piece = ACC + row * stride_ab + head * stride_ah + part * stride_ap + d
            acc += weight * tl.load(piece, mask=d < DIM, other=0.0)
        target = OUT + row * stride_ob + head * stride_oh + d
        tl.store(target, (acc / total).to(OUT.dtype.element_ty), mask=d < DIM)

    return _Kernels(partition, merge)
