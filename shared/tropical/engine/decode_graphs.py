"""Decode steps with fixed shapes, captured as one CUDA graph per batch-size bucket.

A small decode step is bound by kernel launches, not by memory: a Llama-3-8B
step launches hundreds of kernels whose own work is microseconds each. A CUDA
graph replays them all as one launch. A graph fixes its tensors' shapes and
addresses, so the step here works out of static buffers: the batch is padded
up to its bucket, the block tables to the widest a sequence can have, and the
attention is the paged decode kernel, whose grid depends on nothing else.

Padding rows compute a token nobody reads: they store their key and value in
the cache's scratch block (no sequence is given it) and attend to that slot
alone.

Prefill and mixed steps stay eager: their shapes change every step, and their
matmuls are large enough that launches do not dominate.

Without CUDA (`capture=False`) the same static step runs eagerly; on the CPU
its attention is `paged_decode_reference`. That is how the step's bookkeeping
is tested where there is no GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from tropical.engine.attention import LayerCache
from tropical.engine.kv_cache import KvCache
from tropical.engine.models import CausalLM
from tropical.engine.paged_decode import PagedAttention, padded_tables, paged_decode, paged_decode_reference
from tropical.engine.scheduler import ScheduledChunk

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, then every multiple of 8, up to and including `max_batch`: a step pads by at most 7 rows."""
    sizes = [size for size in (1, 2, 4) if size < max_batch] + list(range(8, max_batch, 8))
    return (*sizes, max_batch)


@dataclass(frozen=True)
class PagedDecodeStep:
    """The attention of a static decode step: every row one token, over its own context in the paged cache."""

    rows: ClassVar[None] = None  # every row's query is attended
    slots: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    scale: float
    block_size: int
    head_major: bool
    attention: PagedAttention

    def _by_head(self, layer: torch.Tensor) -> torch.Tensor:
        """`[kv_heads, slots, head_dim]` over the cache's own memory, whichever its layout."""
        return layer if self.head_major else layer.flatten(0, 1).transpose(0, 1)

    def write(self, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> None:
        for new, layer in zip((k, v), cache, strict=True):
            self._by_head(layer).index_copy_(1, self.slots, new.transpose(0, 1))

    def attend(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        k_cache, v_cache = (self._by_head(layer) for layer in cache)
        return self.attention(q, k_cache, v_cache, self.block_tables, self.context_lens, self.scale, self.block_size)


class DecodeGraphs:
    """Runs decode-only steps of up to `max_batch` sequences out of static buffers, replayed from graphs when captured."""

    def __init__(
        self,
        model: CausalLM,
        kv: KvCache,
        *,
        max_batch: int,
        max_context: int,
        capture: bool,
        attention: PagedAttention | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.block_size = kv.block_size
        self.max_batch = max_batch
        self.width = -(-max_context // self.block_size)
        self.buckets = bucket_sizes(max_batch)
        device = kv.data.device
        if attention is None:
            attention = paged_decode if device.type == "cuda" else paged_decode_reference
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_batch, self.width, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self._pad(0, max_batch)
        scale = model.config.head_dim**-0.5
        self.steps = {
            size: PagedDecodeStep(
                self.slots[:size], self.block_tables[:size], self.context_lens[:size],
                scale, self.block_size, kv.head_major, attention,
            )  # fmt: skip
            for size in self.buckets
        }
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()

    def takes(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """A step this can run: only decodes (one sampled token each), few enough, none past the widest table."""
        return 0 < len(chunks) <= self.max_batch and all(
            len(c.token_ids) == 1 and c.sample and c.start < self.width * self.block_size for c in chunks
        )

    @torch.inference_mode()
    def run(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """Logits [len(chunks), vocab]; on a GPU they are the graph's output, valid until the next step."""
        n = len(chunks)
        size = next(size for size in self.buckets if size >= n)
        self._fill(chunks)
        self._pad(n, size)
        if size in self.graphs:
            graph, logits = self.graphs[size]
            graph.replay()
            return logits[:n]
        return self._forward(size)[:n]

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.steps[size], self.kv.layers)
        return self.model.logits(hidden)

    def _fill(self, chunks: Sequence[ScheduledChunk]) -> None:
        """Two host-to-device copies; the tables only as wide as the widest in this step."""
        n = len(chunks)
        block_size = self.block_size
        tables = [c.block_table[: c.start // block_size + 1] for c in chunks]
        host_tables = padded_tables(tables)
        starts = [c.start for c in chunks]
        rows = torch.tensor(
            [
                [c.token_ids[0] for c in chunks],
                starts,
                [table[-1] * block_size + start % block_size for table, start in zip(tables, starts, strict=True)],
                [start + 1 for start in starts],
            ],
            dtype=torch.long,
        ).to(self.input_ids.device)
        self.input_ids[:n] = rows[0]
        self.positions[:n] = rows[1]
        self.slots[:n] = rows[2]
        self.context_lens[:n] = rows[3]
        self.block_tables[:n, : host_tables.shape[1]] = host_tables.to(self.block_tables.device)

    def _pad(self, n: int, size: int) -> None:
        """Rows `n` to `size`: token 0 at position 0, stored in and attending to the scratch block's first slot."""
        scratch = self.kv.scratch_block
        self.input_ids[n:size] = 0
        self.positions[n:size] = 0
        self.slots[n:size] = scratch * self.block_size
        self.context_lens[n:size] = 1
        self.block_tables[n:size, 0] = scratch

    def _capture(self) -> None:
        """Largest bucket first, so the graphs share one memory pool sized by it; warm-up runs compile the kernels."""
        started = time.perf_counter()
        pool = None
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for size in self.buckets:
                    self._forward(size)
            torch.cuda.current_stream().wait_stream(side)
            for size in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(size)
                pool = graph.pool()
                self.graphs[size] = (graph, logits)
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s in %.1f s", list(self.buckets), time.perf_counter() - started)
