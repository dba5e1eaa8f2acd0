"""An engine that computes nothing: each step lasts what the latency model predicts for it.

With it the live system runs at the timing of a GPU cluster on a CPU machine.
It is the model engine's bookkeeping (requests, KV in tokens, plans and their
refusals, the default FCFS planner) with an emulated runner:
- a step of B decodes over Σctx KV tokens and prompt chunks [(a, b)] takes
  `LatencyModel.step_time(B, Σctx, chunks)`, a decode of a sequence with n
  tokens so far counting n (as the simulator does), times a seeded residual
  factor (`LatencyModel.noise_factor`) when `noise` is on;
- the token sampled at position p of request r is a hash of (seed, r, p) into
  the vocabulary, so a run is reproducible and engines sharing a seed continue
  each other's sequences after a KV handoff; stop tokens, `ignore_eos` and
  `max_tokens` act as on the model engine;
- its KV export is one token-major tensor of shape [2, 1, tokens, 1, 1]: the
  real handoff path, four bytes a token.
Steps sleep on an injected clock until a deadline that runs on from the last
one, so a late wake-up does not delay every later step; the caller's own time
between steps still counts, as it would on a GPU.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from tropical.engine.block_manager import BlockManager
from tropical.engine.bookkeeping import Bookkeeping, RequestLimits
from tropical.engine.clock import Clock, MonotonicClock
from tropical.engine.plan import EnginePlan, StepResult
from tropical.engine.scheduler import ScheduledBatch, Scheduler
from tropical.engine.serving import ServingEngine

if TYPE_CHECKING:
    from tropical.latency.model import LatencyModel

KV_SHAPE = (1, 1, 1)  # (layers, KV heads, head dim) of an emulated KV: a placeholder per token
KV_DTYPE = torch.float16


def emulated_token(seed: int, request_id: str, position: int, vocab_size: int) -> int:
    """The token an emulated engine samples at `position` of a request: a hash, the same on every engine."""
    digest = hashlib.blake2b(f"{seed}:{request_id}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab_size


class EmulatedEngine(ServingEngine):
    def __init__(
        self,
        latency: LatencyModel,
        kv_capacity_tokens: int,
        *,
        vocab_size: int = 32_000,
        max_model_len: int | None = None,
        eos_token_ids: Iterable[int] = (),
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        seed: int = 0,
        noise: bool = False,
        clock: Clock | None = None,
    ) -> None:
        """`max_model_len` defaults to the KV capacity; `max_num_seqs` and `max_num_batched_tokens` bound only
        the default planner's steps, as on the model engine."""
        self.latency = latency
        self.vocab_size = vocab_size
        self.seed = seed
        self.noise = noise
        self.clock: Clock = clock or MonotonicClock()
        self._random = random.Random(seed)
        blocks = BlockManager(kv_capacity_tokens, block_size=1)
        limits = RequestLimits(vocab_size, max_model_len or kv_capacity_tokens, frozenset(eos_token_ids))
        self.book = Bookkeeping(blocks, limits, Scheduler(blocks, max_num_seqs, max_num_batched_tokens))
        self._deadline = -math.inf  # when the last step ended, on the clock
        self._late = 0.0  # how far past that deadline the last sleep woke up

    # --- stepping ---------------------------------------------------------------------

    def step(self, plan: EnginePlan | None = None, *, with_logits: bool = False) -> StepResult:
        """Run exactly `plan` (the default planner's when None) in the model's time; there are no logits."""
        called = self.clock.now()
        batch = self.book.prepare(plan)
        if not batch.chunks:
            return batch.result([], 0.0)
        step_time = self._step_time(batch)
        tokens = [emulated_token(self.seed, s.request_id, s.num_tokens, self.vocab_size) for s in batch.sampling]
        outputs = self.book.apply(batch, tokens)
        self._sleep(called, step_time)
        return batch.result(outputs, step_time)

    def _step_time(self, batch: ScheduledBatch) -> float:
        """The model's time for this batch, times a residual factor drawn for it when `noise` is on."""
        decodes = [chunk for chunk in batch.chunks if chunk.is_decode]
        context = sum(chunk.start + 1 for chunk in decodes)  # the decode computes the last of its tokens
        chunks = [(c.start, c.start + len(c.token_ids)) for c in batch.chunks if not c.is_decode]
        factor = self.latency.noise_factor(self._random, prefill=bool(chunks)) if self.noise else 1.0
        return factor * self.latency.step_time(len(decodes), context, chunks)

    def _sleep(self, called: float, step_time: float) -> None:
        """Sleep until the step's end: it starts when called, less the last sleep's lateness, never before the last end."""
        start = max(self._deadline, called - self._late)
        self._deadline = start + step_time
        self.clock.sleep_until(self._deadline)
        self._late = max(0.0, self.clock.now() - self._deadline)

    # --- KV handoff -------------------------------------------------------------------

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        return KV_SHAPE

    def _read_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        return torch.zeros((2, 1, num_tokens, 1, 1), dtype=KV_DTYPE)  # [2, layers, tokens, KV heads, head dim]

    def _write_kv(self, block_table: list[int], data: torch.Tensor) -> None:
        """Nothing to store: the import's layout was checked, its blocks are taken."""
