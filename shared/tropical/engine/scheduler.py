"""Which tokens of which sequences run in the next step; executes nothing.

`Scheduler` is the engine's default planner (Sarathi-style stall-free batching
under a token budget), used when a step is given no plan:
1. every sequence holding KV that decodes gets its one token, oldest first;
2. sequences in the middle of a prompt get chunks from what is left;
3. queued sequences are admitted first-come first-served while the budget,
   `max_num_seqs` and free blocks allow (none in a step that had to preempt);
   their prompts are chunked anywhere.
When a sequence needs a block and none is free, the youngest sequence holding
KV not yet in this step is preempted: its KV is dropped and it waits at the
head of the queue to be recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tropical.engine.block_manager import BlockManager
from tropical.engine.plan import EnginePlan, SequenceOutput, StepResult
from tropical.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens `start .. start + len(token_ids)` of one sequence; `sample` when that reaches its end.

    `block_table` may be the sequence's own list: valid for the step it was scheduled for.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[int, ...] | list[int]
    sample: bool
    is_decode: bool


@dataclass(frozen=True)
class ScheduledBatch:
    """A validated plan with its KV in place: the chunks a runner computes, decodes first."""

    plan: EnginePlan
    chunks: tuple[ScheduledChunk, ...]
    sequences: tuple[Sequence, ...]  # the sequence of each chunk

    @property
    def preempted(self) -> tuple[str, ...]:
        return self.plan.preempt

    @property
    def num_decode_tokens(self) -> int:
        return len(self.plan.decode)

    @property
    def num_prefill_tokens(self) -> int:
        return self.plan.num_prefill_tokens

    @property
    def sampling(self) -> list[Sequence]:
        """The sequences that sample a token in this step, in chunk order (the order of the sampled rows)."""
        return [seq for seq, chunk in zip(self.sequences, self.chunks, strict=True) if chunk.sample]

    def result(self, outputs: list[SequenceOutput], step_time_s: float) -> StepResult:
        return StepResult(
            outputs=outputs,
            step_time_s=step_time_s,
            num_prefill_tokens=self.num_prefill_tokens,
            num_decode_tokens=self.num_decode_tokens,
            num_seqs=len(self.chunks),
            preempted=list(self.preempted),
            plan=self.plan,
        )


def blocks_needed(blocks: BlockManager, seq: Sequence) -> int:
    """Blocks a sequence adds before its next chunk or decode: KV for all of its tokens.

    A prompt (or a recompute) thus reserves its whole KV at its first chunk, and
    a decode opens a block when its new token starts one.
    """
    return blocks.missing(seq.block_table, seq.num_tokens)


class Scheduler:
    """The default planner: what a plain engine runs when no plan is given (see the module docstring)."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens

    def plan(self, queued: Iterable[Sequence], running: Iterable[Sequence]) -> EnginePlan:
        """The next step for `queued` sequences (no KV, in queue order) and `running` ones (holding KV)."""
        budget = self.max_num_batched_tokens
        free = self.blocks.num_free_blocks
        ordered = sorted(running, key=lambda seq: seq.seq_id)
        active = {seq.seq_id: seq for seq in ordered}  # holding KV and not preempted in this step
        scheduled: set[int] = set()
        decode: list[str] = []
        chunks: list[tuple[str, int]] = []
        preempt: list[str] = []
        for seq in _decodes_first(ordered):
            if budget == 0:
                break
            if seq.seq_id not in active:  # preempted earlier in this loop
                continue
            need = blocks_needed(self.blocks, seq)
            while need > free:
                victim = next(s for s in reversed(active.values()) if s.seq_id not in scheduled)
                del active[victim.seq_id]
                preempt.append(victim.request_id)
                free += len(victim.block_table)
                if victim is seq:
                    break
            if seq.seq_id not in active:
                continue
            free -= need
            scheduled.add(seq.seq_id)
            if seq.status is Status.DECODING:
                decode.append(seq.request_id)
                budget -= 1
            else:
                chunks.append((seq.request_id, min(seq.num_pending, budget)))
                budget -= chunks[-1][1]
        if not preempt:
            chunks += self._admit(queued, len(active), free, budget)
        return EnginePlan(tuple(decode), tuple(chunks), tuple(preempt))

    def _admit(self, queued: Iterable[Sequence], running: int, free: int, budget: int) -> list[tuple[str, int]]:
        """First chunks of queued sequences, in order, keeping a block in reserve per sequence holding KV.

        Without the reserve a new prompt could take the last blocks and force a
        preemption in the very next step.
        """
        chunks: list[tuple[str, int]] = []
        for seq in queued:
            if budget == 0 or running >= self.max_num_seqs:
                break
            need = blocks_needed(self.blocks, seq)
            if need > free - running:
                break
            chunks.append((seq.request_id, min(seq.num_pending, budget)))
            budget -= chunks[-1][1]
            free -= need
            running += 1
        return chunks


def _decodes_first(ordered: list[Sequence]) -> Iterator[Sequence]:
    """Decodes before prompt chunks, so a long prompt never stalls the decodes."""
    yield from (seq for seq in ordered if seq.status is Status.DECODING)
    yield from (seq for seq in ordered if seq.status is Status.PREFILLING)
