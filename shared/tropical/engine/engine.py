"""The engine loop: validate requests, schedule a step, run it, sample, and report what happened.

One `step()` is one forward over a ragged batch of decode tokens and prefill
chunks; its wall time is measured and returned because the latency model is
fitted to it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch

from tropical.engine.block_manager import BlockManager, OutOfBlocks
from tropical.engine.config import EngineConfig, ModelConfig
from tropical.engine.kv_transfer import KvExport
from tropical.engine.loader import load_model, random_model, read_config
from tropical.engine.models import CausalLM
from tropical.engine.runner import ModelRunner, pick_device, pick_dtype
from tropical.engine.sampler import Sampler
from tropical.engine.scheduler import ScheduledBatch, Scheduler
from tropical.engine.sequence import Sequence
from tropical.engine.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from tropical.protocol import FinishReason, SamplingParams

TINY = "tiny"


class InvalidRequest(ValueError):
    """A request the engine refuses at the door; the message says why."""


@dataclass(frozen=True)
class SequenceOutput:
    """What one sequence got from one step: at most one new token, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logits: torch.Tensor | None = None  # only with step(with_logits=True)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepResult:
    outputs: list[SequenceOutput] = field(default_factory=list)
    step_time_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_seqs: int = 0  # sequences with a chunk in this step
    preempted: list[str] = field(default_factory=list)

    @property
    def finished(self) -> list[SequenceOutput]:
        return [out for out in self.outputs if out.finished]


@dataclass(frozen=True)
class Generation:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model_config = model.config
        self.tokenizer = tokenizer
        device = next(model.parameters()).device
        self.runner = ModelRunner(model, config, device, next(model.parameters()).dtype)
        self.blocks = BlockManager(self.runner.kv.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(config.seed, device)
        self.max_model_len = _max_model_len(config, self.model_config, model.rope.cos.shape[0])
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | frozenset(tokenizer.eos_token_ids)
        self._sequences: dict[str, Sequence] = {}
        self._by_id: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self._generation_ids = itertools.count()

    # --- construction ---------------------------------------------------------------

    @classmethod
    def load(
        cls,
        source: str | Path = TINY,
        config: EngineConfig | None = None,
        *,
        tiny: ModelConfig | None = None,
        weights_seed: int = 0,
    ) -> Engine:
        """`tiny` (the random preset; `tiny=` sets its shape, `weights_seed` its weights) or a model directory."""
        config = config or EngineConfig()
        device = pick_device(config)
        dtype = pick_dtype(config, device)
        if str(source) == TINY:
            model_config = tiny or ModelConfig.tiny(eos_token_ids=ByteTokenizer().eos_token_ids)
            max_len = _max_model_len(config, model_config)
            return cls(random_model(model_config, max_len, dtype, device, weights_seed), ByteTokenizer(), config)
        model = load_model(source, _max_model_len(config, read_config(source)), dtype, device)
        return cls(model, load_tokenizer(source), config)

    # --- requests ---------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | Iterable[int],
        sampling: SamplingParams | None = None,
        max_tokens: int = 256,
        *,
        retain_kv: bool = False,
    ) -> None:
        """Queue a request; `retain_kv` keeps its blocks after it finishes, for `export_kv`, until `abort`."""
        sampling = sampling or SamplingParams()
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check(request_id, token_ids, [], sampling, max_tokens)
        self.scheduler.add(self._new_sequence(request_id, token_ids, len(token_ids), sampling, max_tokens, retain_kv))

    def abort(self, request_id: str) -> bool:
        """Forget a request in any state and free its blocks: a cancel, or the end of an export's lease."""
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return False
        del self._by_id[seq.seq_id]
        self.scheduler.remove(seq)
        return True

    def has_unfinished(self) -> bool:
        return len(self.scheduler) > 0

    # --- stepping ---------------------------------------------------------------------

    def step(self, *, with_logits: bool = False) -> StepResult:
        """Run one ragged forward over what the scheduler picked; sample where spans reached their end."""
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.chunks:
            return StepResult(preempted=list(batch.preempted))
        logits = self.runner.run(batch.chunks)
        samplers = [self._by_id[c.seq_id] for c in batch.chunks if c.sample]
        tokens = self.sampler(logits, [s.sampling for s in samplers], [s.num_tokens - s.prompt_len for s in samplers])
        outputs = self._apply(batch, tokens, logits if with_logits else None)
        return StepResult(
            outputs=outputs,
            step_time_s=time.perf_counter() - started,
            num_prefill_tokens=batch.num_prefill_tokens,
            num_decode_tokens=batch.num_decode_tokens,
            num_seqs=len(batch.chunks),
            preempted=list(batch.preempted),
        )

    def _apply(self, batch: ScheduledBatch, tokens: list[int], logits: torch.Tensor | None) -> list[SequenceOutput]:
        outputs: list[SequenceOutput] = []
        sampled = iter(enumerate(tokens))
        for chunk in batch.chunks:
            seq = self._by_id[chunk.seq_id]
            seq.num_computed += len(chunk.token_ids)
            if not chunk.sample:
                continue
            row, token = next(sampled)
            reason = seq.append(token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                if not seq.retain_kv:
                    del self._sequences[seq.request_id], self._by_id[seq.seq_id]
            row_logits = None if logits is None else logits[row].float().cpu()
            outputs.append(SequenceOutput(seq.request_id, [token], reason, row_logits))
        return outputs

    def generate(
        self, prompts: Iterable[str | Iterable[int]], sampling: SamplingParams | None = None, max_tokens: int = 256
    ) -> list[Generation]:
        """Run prompts to completion together (continuous batching), results in prompt order."""
        ids = []
        for prompt in prompts:
            ids.append(f"generate-{next(self._generation_ids)}")
            self.add_request(ids[-1], prompt, sampling, max_tokens)
        prompt_ids = {rid: list(self._sequences[rid].token_ids) for rid in ids}
        outputs: dict[str, list[int]] = {rid: [] for rid in ids}
        done: dict[str, FinishReason] = {}
        while len(done) < len(ids):
            result = self.step()
            if result.num_seqs == 0 and not result.preempted:
                raise RuntimeError("the engine cannot make progress: retained KV holds the blocks these requests need")
            for out in result.outputs:
                if out.request_id in outputs:
                    outputs[out.request_id].extend(out.new_token_ids)
                    if out.finish_reason is not None:
                        done[out.request_id] = out.finish_reason
        decode = self.tokenizer.decode
        return [Generation(rid, prompt_ids[rid], outputs[rid], decode(outputs[rid]), done[rid]) for rid in ids]

    # --- KV handoff -------------------------------------------------------------------

    def export_kv(self, request_id: str, *, to_host: bool = True) -> KvExport:
        """A copy of a request's computed KV (on the host, or on this device for CUDA IPC) and its tokens."""
        seq = self._sequences.get(request_id)
        if seq is None:
            raise KeyError(f"no request {request_id!r} (a finished one keeps its KV only with retain_kv=True)")
        if seq.num_computed == 0:
            raise ValueError(f"request {request_id!r} has no computed KV yet")
        data = self.runner.kv.read(seq.block_table, seq.num_computed)
        return KvExport(
            request_id=request_id,
            prompt_token_ids=seq.token_ids[: seq.prompt_len],
            output_token_ids=seq.output_token_ids,
            sampling=seq.sampling,
            max_tokens=seq.max_tokens,
            block_size=self.config.block_size,
            data=data.cpu() if to_host else data,
        )

    def import_kv(self, kv: KvExport, *, request_id: str | None = None) -> None:
        """Continue another engine's sequence here: fresh blocks, its KV copied in, decoding from the next step."""
        request_id = request_id or kv.request_id
        layout, model = kv.layout, self.model_config
        theirs = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
        ours = (model.num_layers, model.num_kv_heads, model.head_dim)
        if theirs != ours:
            raise InvalidRequest(f"KV of (layers, kv heads, head dim) = {theirs} does not fit this model's {ours}")
        token_ids = kv.prompt_token_ids + kv.output_token_ids
        if not kv.output_token_ids or kv.num_tokens >= len(token_ids):
            raise InvalidRequest("an imported KV must leave at least one token (the last sampled) to compute")
        self._check(request_id, kv.prompt_token_ids, kv.output_token_ids, kv.sampling, kv.max_tokens)
        if not self.blocks.can_grow([], kv.num_tokens):
            needed, free = self.blocks.blocks_for(kv.num_tokens), self.blocks.num_free_blocks
            raise OutOfBlocks(f"{needed} KV blocks needed for the import, {free} free now")
        seq = self._new_sequence(request_id, token_ids, len(kv.prompt_token_ids), kv.sampling, kv.max_tokens, False)
        self.blocks.grow(seq.block_table, kv.num_tokens)
        self.runner.kv.write(seq.block_table, kv.data)
        seq.num_computed = kv.num_tokens
        self.scheduler.add(seq)

    # --- capacity ---------------------------------------------------------------------

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    @property
    def kv_free_tokens(self) -> int:
        return self.blocks.num_free_blocks * self.blocks.block_size

    # --- internals --------------------------------------------------------------------

    def _check(
        self, request_id: str, prompt: list[int], outputs: list[int], sampling: SamplingParams, max_tokens: int
    ) -> None:
        if not request_id:
            raise InvalidRequest("the request id is empty")
        if request_id in self._sequences:
            raise InvalidRequest(f"request {request_id!r} is already in this engine")
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        vocab = self.model_config.vocab_size
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
        if total > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) = {total} tokens exceeds "
                f"the model's context of {self.max_model_len}"
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
        stops = frozenset(sampling.stop_token_ids) | (frozenset() if sampling.ignore_eos else self.eos_token_ids)
        seq = Sequence(
            seq_id=next(self._ids),
            request_id=request_id,
            token_ids=list(token_ids),
            prompt_len=prompt_len,
            sampling=sampling,
            max_tokens=max_tokens,
            stop_token_ids=stops,
            retain_kv=retain_kv,
        )
        self._sequences[request_id] = seq
        self._by_id[seq.seq_id] = seq
        return seq

def _max_model_len(config: EngineConfig, model: ModelConfig, positions: int | None = None) -> int:
    return min(config.max_model_len or model.max_context, model.max_context, positions or model.max_context)
