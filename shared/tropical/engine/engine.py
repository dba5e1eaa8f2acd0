"""The model engine: the shared bookkeeping plus a model runner and a sampler.

One `step()` is one forward over a ragged batch of decode tokens and prefill
chunks, exactly those the plan names (the FCFS scheduler's plan when none is
given); its wall time is measured and returned because the latency model is
fitted to it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tropical.engine.block_manager import BlockManager
from tropical.engine.bookkeeping import Bookkeeping, RequestLimits
from tropical.engine.config import EngineConfig, ModelConfig
from tropical.engine.loader import load_model, random_model, read_config
from tropical.engine.models import CausalLM
from tropical.engine.plan import EnginePlan, StepResult
from tropical.engine.runner import ModelRunner, pick_device, pick_dtype
from tropical.engine.sampler import Sampler
from tropical.engine.scheduler import Scheduler
from tropical.engine.serving import ServingEngine
from tropical.engine.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from tropical.protocol import FinishReason, SamplingParams

TINY = "tiny"


@dataclass(frozen=True)
class Generation:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason


class Engine(ServingEngine):
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model_config = model.config
        self.tokenizer = tokenizer
        device = next(model.parameters()).device
        self.runner = ModelRunner(model, config, device, next(model.parameters()).dtype)
        self.sampler = Sampler(config.seed, device)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | frozenset(tokenizer.eos_token_ids)
        max_len = _max_model_len(config, self.model_config, model.rope.cos.shape[0])
        blocks = BlockManager(self.runner.kv.num_blocks, config.block_size)
        limits = RequestLimits(self.model_config.vocab_size, max_len, self.eos_token_ids)
        self.book = Bookkeeping(blocks, limits, Scheduler(blocks, config.max_num_seqs, config.max_num_batched_tokens))
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
        output_token_ids: Iterable[int] = (),
    ) -> None:
        """Queue a request (text is tokenized); `retain_kv` keeps its blocks after it finishes, for `export_kv`;
        `output_token_ids` continues an answer begun elsewhere."""
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        super().add_request(request_id, token_ids, sampling, max_tokens, retain_kv=retain_kv, output_token_ids=output_token_ids)

    # --- stepping ---------------------------------------------------------------------

    def step(self, plan: EnginePlan | None = None, *, with_logits: bool = False) -> StepResult:
        """Run one ragged forward over exactly what the plan names; sample where spans reached their end."""
        started = time.perf_counter()
        batch = self.book.prepare(plan)
        if not batch.chunks:
            return batch.result([], 0.0)
        logits = self.runner.run(batch.chunks)
        sampling = batch.sampling
        tokens = self.sampler(logits, [s.sampling for s in sampling], [s.num_tokens - s.prompt_len for s in sampling])
        outputs = self.book.apply(batch, tokens)
        if with_logits:
            outputs = [replace(out, logits=logits[row].float().cpu()) for row, out in enumerate(outputs)]
        return batch.result(outputs, time.perf_counter() - started)

    def generate(
        self, prompts: Iterable[str | Iterable[int]], sampling: SamplingParams | None = None, max_tokens: int = 256
    ) -> list[Generation]:
        """Run prompts to completion together (continuous batching), results in prompt order."""
        ids = []
        prompt_ids: dict[str, list[int]] = {}
        for prompt in prompts:
            ids.append(f"generate-{next(self._generation_ids)}")
            prompt_ids[ids[-1]] = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            self.add_request(ids[-1], prompt_ids[ids[-1]], sampling, max_tokens)
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

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        model = self.model_config
        return (model.num_layers, model.num_kv_heads, model.head_dim)

    def _read_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        return self.runner.kv.read(block_table, num_tokens)

    def _write_kv(self, block_table: list[int], data: torch.Tensor) -> None:
        self.runner.kv.write(block_table, data)


def _max_model_len(config: EngineConfig, model: ModelConfig, positions: int | None = None) -> int:
    return min(config.max_model_len or model.max_context, model.max_context, positions or model.max_context)
