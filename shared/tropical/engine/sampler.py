"""Next-token choice per row: greedy, or temperature with top-k / top-p, reproducible per request.

A request with a seed draws its noise from a generator seeded by (seed, output
index), not from a stream that advances: the token at each index depends only
on the logits and the seed, so a sequence resumes identically after a
preemption or on another engine after a KV handoff.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tropical.protocol import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, index) pairs over the generator's seeds


def noise_seed(seed: int, output_index: int) -> int:
    return (seed * _MIX + output_index) % (1 << 63)


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # for requests without a seed

    def __call__(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], output_indices: Sequence[int]
    ) -> list[int]:
        """One token per row of `logits` [N, vocab]; row i follows `params[i]`, as output `output_indices[i]`."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if p.temperature > 0]
        if rows:
            picked = [params[i] for i in rows]
            noise = self._noise(len(rows), logits.shape[-1], picked, [output_indices[i] for i in rows])
            tokens[rows] = self._sample(logits[rows].float(), picked, noise)
        return tokens.tolist()

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams], noise: torch.Tensor) -> torch.Tensor:
        """Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p, with the noise chosen up front."""
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = logits / temperature[:, None]
        vocab = logits.shape[-1]
        if all((p.top_k == 0 or p.top_k >= vocab) and p.top_p >= 1.0 for p in params):
            return (logits.softmax(dim=-1) / noise).argmax(dim=-1)
        ordered, order = logits.sort(dim=-1, descending=True)
        top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in params], device=logits.device)  # the wire allows any size
        cut = torch.arange(vocab, device=logits.device)[None, :] >= top_k[:, None]
        probs = ordered.softmax(dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        # keep the smallest head whose mass reaches top_p; top_p = 1 keeps all, rounding notwithstanding
        cut |= (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1.0)
        probs = ordered.masked_fill(cut, float("-inf")).softmax(dim=-1)
        choice = (probs / noise).argmax(dim=-1)
        return order.gather(1, choice[:, None]).squeeze(1)

    def _noise(self, rows: int, vocab: int, params: list[SamplingParams], indices: list[int]) -> torch.Tensor:
        noise = torch.empty(rows, vocab, device=self.device)
        for row, (p, index) in enumerate(zip(params, indices, strict=True)):
            if p.seed is None:
                noise[row].exponential_(generator=self.generator)
            else:
                generator = torch.Generator(device=self.device).manual_seed(noise_seed(p.seed, index))
                noise[row].exponential_(generator=generator)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)
