"""A request inside the engine: its tokens, how many of them the cache holds, and its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tropical.protocol import FinishReason, SamplingParams


class Status(enum.Enum):
    QUEUED = "queued"  # holds no KV: a new prompt, or a preempted sequence to recompute from its tokens
    PREFILLING = "prefilling"  # holds KV for all its tokens, some still to compute by chunks; the last samples
    DECODING = "decoding"  # the KV of all but its last token is computed; a decode computes it and samples
    FINISHED = "finished"  # holds blocks only when its KV is retained for export


@dataclass(eq=False)
class Sequence:
    """Mutable bookkeeping; the engine's bookkeeping is its only writer.

    `token_ids` is the prompt followed by the outputs. The cache holds the keys
    and values of the first `num_computed` tokens; the rest are computed by
    later steps, and the step that computes the last of them samples the next.
    """

    seq_id: int  # order of arrival: the youngest sequence is preempted first
    request_id: str
    token_ids: list[int]
    prompt_len: int
    sampling: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int]
    retain_kv: bool = False  # keep the blocks after finishing, for a KV export
    status: Status = Status.QUEUED
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose keys and values are not in the cache yet."""
        return len(self.token_ids) - self.num_computed

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    def append(self, token_id: int) -> FinishReason | None:
        """Add a sampled token; say why the sequence is done, if it is."""
        self.token_ids.append(token_id)
        if token_id in self.stop_token_ids:
            return FinishReason.STOP
        if len(self.token_ids) - self.prompt_len >= self.max_tokens:
            return FinishReason.LENGTH
        return None


@dataclass(frozen=True)
class SequenceState:
    """What a step planner needs to know of one sequence, copied out of the engine.

    `kv_tokens` is the cache it holds (whole blocks, in tokens); `kv_tokens_needed`
    is what its next chunk or decode takes from `kv_free_tokens` (a prompt's
    first chunk reserves its whole KV; a decode may open a block).
    """

    request_id: str
    status: Status
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed: int  # tokens whose keys and values the cache holds
    num_pending: int  # tokens still to compute before the next sample: 1 for a decode
    kv_tokens: int
    kv_tokens_needed: int

    @property
    def holds_kv(self) -> bool:
        return self.kv_tokens > 0
