"""Step-time models: what a prefill, a decode step or a mixed step costs on one worker.

    prefill of tokens [a, b) of one prompt:  c0·(b² − a²) + c1·(b − a)   (+ c2 once per step)
    decode step of B sequences, Σctx tokens: d0 + d1·B + d2·Σctx
    mixed step: the decode step plus the prefill chunks' token terms (d0 already pays the step)

The quadratic term is attention over the prompt; a chunk starting at `a` pays for
attending to the `a` tokens before it, which is why chunking a prompt costs a
little more than prefilling it whole (c2 per extra step). Every scheduling
policy reasons with these few numbers, so they are plain data.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, replace

from tropical.protocol import DecodeCoefficients, LatencyModelSpec, PrefillCoefficients

Chunk = tuple[int, int]  # [start, end) token positions of one prompt prefilled in a step


@dataclass(frozen=True)
class LatencyModel:
    c0: float
    c1: float
    c2: float
    d0: float
    d1: float
    d2: float
    prefill_std: float = 0.0  # relative residual spread of prefill predictions (std of actual/predicted − 1)
    decode_std: float = 0.0  # the same for decode steps
    name: str = ""

    def prefill_time(self, tokens: int) -> float:
        """A whole prompt prefilled alone in one step: the isolated prefill time."""
        return self.chunk_time((0, tokens))

    def chunk_time(self, chunk: Chunk) -> float:
        """One chunk prefilled alone in one step."""
        return self.c2 + self._chunk_tokens_time(chunk)

    def decode_time(self, batch: int, context_tokens: int) -> float:
        """One decode step of `batch` sequences holding `context_tokens` KV tokens together."""
        if batch <= 0:
            return 0.0
        return self.d0 + self.d1 * batch + self.d2 * context_tokens

    def step_time(self, batch: int, context_tokens: int, chunks: Iterable[Chunk] = ()) -> float:
        """A step of `batch` decodes plus prefill chunks of any number of prompts."""
        chunk_cost = sum(self._chunk_tokens_time(chunk) for chunk in chunks)
        if batch > 0:
            return self.decode_time(batch, context_tokens) + chunk_cost
        return self.c2 + chunk_cost if chunk_cost > 0 else 0.0

    def noise_factor(self, rng: random.Random, *, prefill: bool) -> float:
        """A random factor on one step's predicted time: 1 + N(0, spread), floored at 0.05 (1 without spread).

        The spread is the residual of prefill predictions for a step with prompt
        chunks, of decode predictions otherwise; `rng` is drawn only when it is > 0.
        """
        spread = self.prefill_std if prefill else self.decode_std
        return max(0.05, 1.0 + rng.gauss(0.0, spread)) if spread > 0 else 1.0

    def scaled(self, factor: float) -> LatencyModel:
        """Every time multiplied by `factor` (an online correction, or a slower device)."""
        return replace(
            self,
            c0=self.c0 * factor,
            c1=self.c1 * factor,
            c2=self.c2 * factor,
            d0=self.d0 * factor,
            d1=self.d1 * factor,
            d2=self.d2 * factor,
        )

    def with_overhead(self, step: float = 0.0, per_sequence: float = 0.0) -> LatencyModel:
        """A real engine's step as the profile's forward pass plus its own work: `step` seconds every step (scheduling,
        launching) and `per_sequence` more per decode in it (sampling, detokenizing, streaming its token).

        Published profiles time the forward pass alone; an engine measured whole (`tropical profile`) needs neither.
        """
        if step < 0.0 or per_sequence < 0.0:
            raise ValueError("an overhead cannot be negative")
        return replace(self, c2=self.c2 + step, d0=self.d0 + step, d1=self.d1 + per_sequence)

    def with_stage_hops(self, hops: int, latency: float, per_token: float) -> LatencyModel:
        """One micro-batch's pass through a pipeline: the profile's step (every layer, at its TP degree) plus
        `hops` stage-to-stage sends of its activations, each `latency` seconds plus `per_token` per token in it."""
        if hops < 0 or latency < 0.0 or per_token < 0.0:
            raise ValueError("a pipeline's hops cannot be negative")
        if hops == 0:
            return self
        fixed, token = hops * latency, hops * per_token
        return replace(self, c1=self.c1 + token, c2=self.c2 + fixed, d0=self.d0 + fixed, d1=self.d1 + token)

    def _chunk_tokens_time(self, chunk: Chunk) -> float:
        start, end = chunk
        if end <= start:
            return 0.0
        return self.c0 * (end * end - start * start) + self.c1 * (end - start)

    # --- the wire form, published by the profiler and read by the router and workers
    def to_spec(self, *, model: str, hardware: str, tensor_parallel: int, samples: int, fitted_at: float) -> LatencyModelSpec:
        return LatencyModelSpec(
            model=model,
            hardware=hardware,
            tensor_parallel=tensor_parallel,
            prefill=PrefillCoefficients(c0=self.c0, c1=self.c1, c2=self.c2),
            decode=DecodeCoefficients(d0=self.d0, d1=self.d1, d2=self.d2),
            prefill_residual=self.prefill_std,
            decode_residual=self.decode_std,
            samples=samples,
            fitted_at=fitted_at,
        )

    @classmethod
    def from_spec(cls, spec: LatencyModelSpec) -> LatencyModel:
        model = cls(
            c0=spec.prefill.c0,
            c1=spec.prefill.c1,
            c2=spec.prefill.c2,
            d0=spec.decode.d0,
            d1=spec.decode.d1,
            d2=spec.decode.d2,
            prefill_std=spec.prefill_residual,
            decode_std=spec.decode_residual,
            name=spec.key,
        )
        return model.scaled(spec.correction) if spec.correction != 1.0 else model
