"""A request inside the engine: its tokens, how many of them the cache holds, and its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tropical.protocol import FinishReason, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # holds no blocks (never started, or preempted)
    RUNNING = "running"
    FINISHED = "finished"  # holds blocks only when its KV is retained for export


@dataclass(eq=False)
class Sequence:
    """Mutable bookkeeping; the scheduler and the engine are the only writers.

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
    status: Status = Status.WAITING
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
