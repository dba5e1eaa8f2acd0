"""Which tokens of which sequences run in the next step; executes nothing.

Policy (Sarathi-style stall-free batching under a token budget):
1. every running sequence that decodes gets its one token, oldest first;
2. running sequences in the middle of a prompt get chunks from what is left;
3. waiting sequences are admitted first-come first-served while the budget,
   `max_num_seqs` and free blocks allow (none in a step that had to preempt);
   their prompts are chunked anywhere.
When a running sequence needs a block and none is free, the youngest running
sequence not yet in this step is preempted: its blocks are freed and it waits
at the head of the queue to be recomputed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from tropical.engine.block_manager import BlockManager
from tropical.engine.sequence import Sequence, Status
from tropical.protocol import FinishReason


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens `start .. start + len(token_ids)` of one sequence; `sample` when that reaches its end."""

    seq_id: int
    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]
    sample: bool
    is_decode: bool


@dataclass(frozen=True)
class ScheduledBatch:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...]  # request ids that lost their blocks in this step

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for chunk in self.chunks if chunk.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(chunk.token_ids) for chunk in self.chunks if not chunk.is_decode)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence, or put one whose KV is already in its blocks (an import) straight into running."""
        if seq.block_table:
            seq.status = Status.RUNNING
            self.running.append(seq)
        else:
            seq.status = Status.WAITING
            self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a sequence in any state and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        preempted: list[str] = []
        for seq in self._running_in_order():
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            num_tokens = self._make_room(seq, min(seq.num_pending, budget), scheduled, preempted)
            if num_tokens:
                chunks.append(self._chunk(seq, num_tokens))
                scheduled.add(seq.seq_id)
                budget -= num_tokens
        while self.waiting and budget and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            num_tokens = min(seq.num_pending, budget, self._admission_room(seq))
            if num_tokens < 1:
                break
            self.waiting.popleft()
            self.blocks.grow(seq.block_table, seq.num_computed + num_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(self._chunk(seq, num_tokens))
            budget -= num_tokens
        return ScheduledBatch(tuple(chunks), tuple(preempted))

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take a sequence out of running; keep its blocks only when its KV is to be exported."""
        self.running.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if not seq.retain_kv:
            self.blocks.release(seq.block_table)

    def _running_in_order(self) -> Iterator[Sequence]:
        """Decodes before prompt chunks, so a long prompt never stalls the decodes."""
        ordered = sorted(self.running, key=lambda seq: seq.seq_id)
        yield from (seq for seq in ordered if seq.num_pending == 1)
        yield from (seq for seq in ordered if seq.num_pending > 1)

    def _admission_room(self, seq: Sequence) -> int:
        """Room for a newcomer, keeping a block in reserve for each running sequence's next token.

        Without the reserve a new prompt could take the last blocks and force a
        preemption in the very next step.
        """
        reserve = len(self.running) * self.blocks.block_size
        return self.blocks.room(seq.block_table, seq.num_computed) - reserve

    def _make_room(self, seq: Sequence, wanted: int, scheduled: set[int], preempted: list[str]) -> int:
        """Blocks for up to `wanted` tokens of `seq`, preempting the youngest to find one; 0 if `seq` itself went."""
        while (room := self.blocks.room(seq.block_table, seq.num_computed)) < 1:
            victim = max((s for s in self.running if s.seq_id not in scheduled), key=lambda s: s.seq_id)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return 0
        num_tokens = min(wanted, room)
        self.blocks.grow(seq.block_table, seq.num_computed + num_tokens)
        return num_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    @staticmethod
    def _chunk(seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed
        end = start + num_tokens
        return ScheduledChunk(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.token_ids[start:end]),
            start=start,
            block_table=tuple(seq.block_table),
            sample=end == seq.num_tokens,
            is_decode=num_tokens == 1 and start >= seq.prompt_len,
        )
