"""What an engine holds besides tensors: its sequences, their KV blocks, and how a plan changes them.

The model engine and the emulated engine share this, so both admit the same
requests, refuse the same plans and account KV the same way; they differ only
in how a step's chunks are computed. A step is `prepare` (validate the plan in
full, then preempt and reserve KV), a runner computing the batch, and `apply`
(the sampled tokens).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import msgspec

from tropical.engine.block_manager import BlockManager, OutOfBlocks
from tropical.engine.plan import EnginePlan, PlanRefused, SequenceOutput
from tropical.engine.scheduler import ScheduledBatch, ScheduledChunk, Scheduler, blocks_needed
from tropical.engine.sequence import Sequence, SequenceState, Status
from tropical.protocol import FinishReason, SamplingParams

HOLDING_KV = (Status.PREFILLING, Status.DECODING)


class InvalidRequest(ValueError):
    """A request the engine refuses at the door; the message says why."""


@dataclass(frozen=True)
class RequestLimits:
    """What a request must respect to enter an engine."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]


class Bookkeeping:
    def __init__(self, blocks: BlockManager, limits: RequestLimits, scheduler: Scheduler) -> None:
        self.blocks = blocks
        self.limits = limits
        self.scheduler = scheduler
        self.queued: deque[Sequence] = deque()  # no KV, first come first served; preempted ones at the head
        self.running: dict[int, Sequence] = {}  # holding KV and not finished, by seq_id
        self._sequences: dict[str, Sequence] = {}  # every sequence, finished ones with retained KV included
        self._ids = itertools.count()

    # --- requests ---------------------------------------------------------------------

    def add(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        retain_kv: bool,
        outputs: list[int] | None = None,
    ) -> None:
        """A new request; `outputs`, the answer's tokens so far (a resumed request), are recomputed with the prompt as a
        preempted sequence's are, so it goes on exactly as it would have."""
        outputs = outputs or []
        self._check(request_id, token_ids, outputs, sampling, max_tokens)
        if self.ended(outputs, sampling, max_tokens) is not None:
            raise InvalidRequest("its answer has ended already")
        seq = self._new_sequence(request_id, token_ids + outputs, len(token_ids), sampling, max_tokens, retain_kv)
        self.queued.append(seq)

    def ended(self, outputs: list[int], sampling: SamplingParams, max_tokens: int) -> FinishReason | None:
        """Why an answer of these tokens is over already, as `Sequence.append` would have said (None: it goes on)."""
        if outputs and outputs[-1] in self._stop_tokens(sampling):
            return FinishReason.STOP
        if len(outputs) >= max_tokens:
            return FinishReason.LENGTH
        return None

    def add_imported(
        self,
        request_id: str,
        prompt: list[int],
        outputs: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        num_computed: int,
    ) -> Sequence:
        """A sequence whose first `num_computed` tokens' KV arrives from elsewhere: its blocks, to be filled."""
        if not outputs or num_computed >= len(prompt) + len(outputs):
            raise InvalidRequest("an imported KV must leave at least one token (the last sampled) to compute")
        self._check(request_id, prompt, outputs, sampling, max_tokens)
        if not self.blocks.can_grow([], num_computed):
            needed, free = self.blocks.blocks_for(num_computed), self.blocks.num_free_blocks
            raise OutOfBlocks(f"{needed} KV blocks needed for the import, {free} free now")
        seq = self._new_sequence(request_id, prompt + outputs, len(prompt), sampling, max_tokens, False)
        self.blocks.grow(seq.block_table, num_computed)
        seq.num_computed = num_computed
        seq.status = Status.DECODING if seq.num_pending == 1 else Status.PREFILLING
        self.running[seq.seq_id] = seq
        return seq

    def abort(self, request_id: str) -> bool:
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return False
        if seq.status is Status.QUEUED:
            self.queued.remove(seq)
        self.running.pop(seq.seq_id, None)
        self.blocks.release(seq.block_table)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.queued or self.running)

    def exportable(self, request_id: str) -> Sequence:
        """A sequence whose computed KV can be copied out."""
        seq = self._sequences.get(request_id)
        if seq is None:
            raise KeyError(f"no request {request_id!r} (a finished one keeps its KV only with retain_kv=True)")
        if seq.num_computed == 0:
            raise ValueError(f"request {request_id!r} has no computed KV yet")
        return seq

    def state(self, request_id: str) -> SequenceState | None:
        seq = self._sequences.get(request_id)
        if seq is None:
            return None
        block_size = self.blocks.block_size
        return SequenceState(
            request_id=request_id,
            status=seq.status,
            num_prompt_tokens=seq.prompt_len,
            num_output_tokens=seq.num_tokens - seq.prompt_len,
            num_computed=seq.num_computed,
            num_pending=seq.num_pending,
            kv_tokens=len(seq.block_table) * block_size,
            kv_tokens_needed=0 if seq.status is Status.FINISHED else blocks_needed(self.blocks, seq) * block_size,
        )

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    @property
    def kv_free_tokens(self) -> int:
        return self.blocks.num_free_blocks * self.blocks.block_size

    # --- steps ------------------------------------------------------------------------

    def prepare(self, plan: EnginePlan | None) -> ScheduledBatch:
        """Check the plan (the default planner's when None), then drop what it preempts and reserve its KV.

        A plan that cannot run raises `PlanRefused` before anything changes.
        """
        if plan is None:
            plan = self.scheduler.plan(self.queued, self.running.values())
        self._check_plan(plan)
        for request_id in plan.preempt:
            self._preempt(self._sequences[request_id])
        chunks: list[ScheduledChunk] = []
        sequences: list[Sequence] = []
        for request_id in plan.decode:
            sequences.append(seq := self._sequences[request_id])
            chunks.append(self._reserve(seq, 1, is_decode=True))
        for request_id, tokens in plan.chunks:
            sequences.append(seq := self._sequences[request_id])
            if seq.status is Status.QUEUED:
                self.queued.remove(seq)
                seq.status = Status.PREFILLING
                self.running[seq.seq_id] = seq
            chunks.append(self._reserve(seq, tokens, is_decode=False))
        return ScheduledBatch(plan, tuple(chunks), tuple(sequences))

    def apply(self, batch: ScheduledBatch, tokens: list[int]) -> list[SequenceOutput]:
        """Record what the batch computed and the tokens sampled (one per sampling chunk, in order)."""
        outputs: list[SequenceOutput] = []
        sampled = iter(tokens)
        for chunk, seq in zip(batch.chunks, batch.sequences, strict=True):
            seq.num_computed += len(chunk.token_ids)
            if not chunk.sample:
                continue
            token = next(sampled)
            reason = seq.append(token)
            if reason is None:
                seq.status = Status.DECODING
            else:
                self._finish(seq, reason)
            outputs.append(SequenceOutput(seq.request_id, [token], reason))
        return outputs

    # --- plan checks --------------------------------------------------------------------

    def _check_plan(self, plan: EnginePlan) -> None:
        named: set[str] = set()
        freed = needed = 0
        for request_id in plan.preempt:
            seq = self._named(request_id, named)
            if seq.status not in HOLDING_KV:
                raise PlanRefused(f"cannot preempt request {request_id!r}: it is {_describe(seq)} and holds no KV to drop")
            freed += len(seq.block_table)
        for request_id in plan.decode:
            seq = self._named(request_id, named)
            if seq.status is not Status.DECODING:
                raise PlanRefused(f"request {request_id!r} cannot decode: it is {_describe(seq)}")
            needed += blocks_needed(self.blocks, seq)
        for request_id, tokens in plan.chunks:
            seq = self._named(request_id, named)
            if seq.status not in (Status.QUEUED, Status.PREFILLING):
                raise PlanRefused(f"request {request_id!r} has no prompt to compute: it is {_describe(seq)}")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= seq.num_pending:
                raise PlanRefused(
                    f"a chunk of {tokens!r} tokens for request {request_id!r}, which has {seq.num_pending} left to compute"
                )
            needed += blocks_needed(self.blocks, seq)
        free = self.blocks.num_free_blocks + freed
        if needed > free:
            size = self.blocks.block_size
            raise PlanRefused(f"no KV room: the step needs {needed * size} more KV tokens, {free * size} are free")

    def _named(self, request_id: str, named: set[str]) -> Sequence:
        seq = self._sequences.get(request_id)
        if seq is None:
            raise PlanRefused(f"no request {request_id!r} in this engine")
        if request_id in named:
            raise PlanRefused(f"request {request_id!r} is named twice in the plan")
        named.add(request_id)
        return seq

    # --- changes ------------------------------------------------------------------------

    def _reserve(self, seq: Sequence, num_tokens: int, *, is_decode: bool) -> ScheduledChunk:
        """KV for all of the sequence's tokens, and the chunk computing the next `num_tokens` of them."""
        self.blocks.grow(seq.block_table, seq.num_tokens)
        start = seq.num_computed
        end = start + num_tokens
        return ScheduledChunk(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.token_ids[start:end]),
            start=start,
            block_table=seq.block_table,
            sample=end == seq.num_tokens,
            is_decode=is_decode,
        )

    def _preempt(self, seq: Sequence) -> None:
        del self.running[seq.seq_id]
        self.blocks.release(seq.block_table)
        seq.num_computed = 0
        seq.status = Status.QUEUED
        self.queued.appendleft(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take a sequence out of the running ones; keep its blocks only when its KV is to be exported."""
        del self.running[seq.seq_id]
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if not seq.retain_kv:
            self.blocks.release(seq.block_table)
            del self._sequences[seq.request_id]

    # --- admission ----------------------------------------------------------------------

    def _check(
        self, request_id: str, prompt: list[int], outputs: list[int], sampling: SamplingParams, max_tokens: int
    ) -> None:
        if not request_id:
            raise InvalidRequest("the request id is empty")
        if request_id in self._sequences:
            raise InvalidRequest(f"request {request_id!r} is already in this engine")
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        vocab = self.limits.vocab_size
        bad = next((t for t in itertools.chain(prompt, outputs) if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer of at least 1, not {max_tokens!r}")
        if len(outputs) >= max_tokens:
            raise InvalidRequest(f"the request already has {len(outputs)} of its {max_tokens} output tokens")
        try:
            msgspec.convert(msgspec.to_builtins(sampling), SamplingParams)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"invalid sampling parameters: {exc}") from None
        total = len(prompt) + max_tokens
        if total > self.limits.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) = {total} tokens exceeds "
                f"the model's context of {self.limits.max_model_len}"
            )
        if self.blocks.blocks_for(total - 1) > self.blocks.num_blocks:
            raise InvalidRequest(
                f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) can never fit in this engine's KV cache "
                f"of {self.kv_capacity_tokens} tokens"
            )

    def _new_sequence(
        self,
        request_id: str,
        token_ids: list[int],
        prompt_len: int,
        sampling: SamplingParams,
        max_tokens: int,
        retain_kv: bool,
    ) -> Sequence:
        seq = Sequence(
            seq_id=next(self._ids),
            request_id=request_id,
            token_ids=list(token_ids),
            prompt_len=prompt_len,
            sampling=sampling,
            max_tokens=max_tokens,
            stop_token_ids=self._stop_tokens(sampling),
            retain_kv=retain_kv,
        )
        self._sequences[request_id] = seq
        return seq

    def _stop_tokens(self, sampling: SamplingParams) -> frozenset[int]:
        eos = frozenset() if sampling.ignore_eos else self.limits.eos_token_ids
        return frozenset(sampling.stop_token_ids) | eos


def _describe(seq: Sequence) -> str:
    if seq.status is Status.PREFILLING:
        return f"prefilling ({seq.num_computed} of {seq.num_tokens} tokens computed)"
    return seq.status.value
