"""Owns the tensors: the model on its device, the KV cache, and the forward of one scheduled batch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import accumulate

import torch

from tropical.engine.attention import Span, select_backend
from tropical.engine.config import EngineConfig
from tropical.engine.decode_graphs import DecodeGraphs
from tropical.engine.kv_cache import KvCache, bytes_per_block
from tropical.engine.models import CausalLM
from tropical.engine.scheduler import ScheduledChunk

log = logging.getLogger(__name__)

CPU_KV_BYTES = 1 << 30
GPU_MEMORY_SHARE = 0.9  # of what is free once the weights are loaded; the rest is for activations

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(config: EngineConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class ModelRunner:
    def __init__(self, model: CausalLM, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        model_config = model.config
        per_block = bytes_per_block(model_config, config.block_size, dtype)
        num_blocks = config.num_kv_blocks or max(1, self._kv_budget(config) // per_block)
        self.attention = select_backend(config.attention, config.block_size, model_config.head_dim**-0.5, device)
        self.kv = KvCache(
            model_config, num_blocks, config.block_size, dtype, device, head_major=self.attention.head_major
        )
        self.decode: DecodeGraphs | None = None  # decode-only steps out of static buffers, replayed as CUDA graphs
        if device.type == "cuda" and not config.enforce_eager:
            max_context = model.rope.cos.shape[0]
            self.decode = DecodeGraphs(model, self.kv, max_batch=config.max_num_seqs, max_context=max_context, capture=True)
        log.info(
            "attention: %s; decode: %s", self.attention.name, "CUDA graphs" if self.decode is not None else "eager"
        )

    def _kv_budget(self, config: EngineConfig) -> int:
        if config.kv_cache_bytes is not None:
            return config.kv_cache_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * GPU_MEMORY_SHARE)
        return CPU_KV_BYTES

    @torch.inference_mode()
    def run(self, chunks: Sequence[ScheduledChunk], *, all_logits: bool = False) -> torch.Tensor:
        """Logits of each sampling chunk's last token, in order ([n, vocab]); of every token with `all_logits`."""
        if self.decode is not None and self.decode.takes(chunks):  # one token per chunk: every row is sampled
            return self.decode.run(chunks)
        tokens = [t for c in chunks for t in c.token_ids]
        positions = [p for c in chunks for p in range(c.start, c.start + len(c.token_ids))]
        spans = [Span(c.start, len(c.token_ids), c.block_table) for c in chunks]
        rows: list[int] | None = None
        if not all_logits:
            ends = accumulate(len(c.token_ids) for c in chunks)
            rows = [end - 1 for end, c in zip(ends, chunks) if c.sample]
            if len(rows) == len(tokens):  # a decode-only step needs every row anyway
                rows = None
        step, last = self.attention.prepare(spans, rows)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, torch.tensor(positions, device=self.device), step, self.kv.layers, last)
        return self.model.logits(hidden)
