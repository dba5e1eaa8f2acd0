"""Throughput of the engine against Hugging Face `generate` on the same requests and the same weights.

The engine serves all requests with continuous batching (at most
`batch_size` running at once); `generate` serves them in arrival order in
static batches of `batch_size`, left-padded, each batch running until its
longest output is done. Throughput counts the output tokens the requests asked
for, the same number on both sides.

Other work on the machine only ever adds time, so with `repeats` > 1 the two
sides take turns and each keeps its fastest run.

    tropical bench-engine --json engine-bench.json

The speedup grows with the batch size: a static batch pads every prompt to its
longest and runs until its longest output is done, and the wider the batch the
more it wastes. The default, 32 running sequences, is a small batch for a
serving engine.
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tropical.engine.config import EngineConfig, ModelConfig
from tropical.engine.engine import Engine
from tropical.engine.loader import hf_state_dict
from tropical.engine.models import CausalLM
from tropical.protocol import SamplingParams

FORCED_LENGTH = SamplingParams(temperature=0.0, ignore_eos=True)
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def make_requests(
    num_requests: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int
) -> list[BenchRequest]:
    """Uniformly random lengths and byte tokens, fixed by the seed."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        length = rng.randint(*prompt_range)
        prompt = [rng.randrange(min(vocab, 256)) for _ in range(length)]
        requests.append(BenchRequest(prompt, rng.randint(*output_range)))
    return requests


def run_ours(engine: Engine, requests: list[BenchRequest]) -> dict[str, float]:
    cpu, stalled = _cpu_seconds(), _cpu_stall_seconds()
    started = time.perf_counter()
    for i, request in enumerate(requests):
        engine.add_request(f"bench-{i}", request.prompt_token_ids, FORCED_LENGTH, request.max_tokens)
    steps, step_time = 0, 0.0
    while engine.has_unfinished():
        result = engine.step()
        steps += 1
        step_time += result.step_time_s
    elapsed = time.perf_counter() - started
    return {
        "seconds": elapsed,
        "cpu_seconds": _cpu_seconds() - cpu,
        "cpu_stalled": (_cpu_stall_seconds() - stalled) / elapsed,
        "steps": steps,
        "mean_step_ms": 1e3 * step_time / max(steps, 1),
    }


@torch.inference_mode()
def run_hf(model: torch.nn.Module, requests: list[BenchRequest], batch_size: int) -> dict[str, float]:
    cpu, stalled = _cpu_seconds(), _cpu_stall_seconds()
    started = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, request in enumerate(batch):  # left padding, as decoder-only generation needs
            input_ids[row, width - len(request.prompt_token_ids) :] = torch.tensor(request.prompt_token_ids)
            attention_mask[row, width - len(request.prompt_token_ids) :] = 1
        longest = max(r.max_tokens for r in batch)
        model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - started
    return {
        "seconds": elapsed,
        "cpu_seconds": _cpu_seconds() - cpu,
        "cpu_stalled": (_cpu_stall_seconds() - stalled) / elapsed,
    }


def _cpu_seconds() -> float:
    """CPU time of this process (all threads): what the work cost, whatever else the machine ran."""
    times = os.times()
    return times.user + times.system


def _cpu_stall_seconds() -> float:
    """Time some runnable task waited for a CPU (Linux pressure stall information; 0 elsewhere).

    Its share of a run's wall time says how much other work disturbed it.
    """
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return 0.0
    return int(some.rpartition("total=")[2]) / 1e6


def hf_twin(model: CausalLM, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The same weights in `transformers`' own modules, on the same device; its `generate` runs to max_new_tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = next(model.parameters()).device
    hf_config = AutoConfig.for_model(**model.config.to_hf())
    with torch.device(device):
        twin = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    missing, unexpected = twin.load_state_dict(hf_state_dict(model), strict=False)
    if unexpected or any(not name.startswith("lm_head") for name in missing):
        raise RuntimeError(f"the twin's weights do not line up: missing {missing}, unexpected {unexpected}")
    twin.generation_config.eos_token_id = None
    return twin.eval()


def run_engine_benchmark(
    num_requests: int = 64,
    seed: int = 0,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    prompt_range: tuple[int, int] = (64, 1024),
    output_range: tuple[int, int] = (16, 256),
    max_num_batched_tokens: int = 512,
    tiny: ModelConfig | None = None,
    with_hf: bool = True,
    repeats: int = 2,
) -> dict[str, Any]:
    """Serve the same requests with the engine (tiny preset, CPU) and with `generate`; tokens per second of each."""
    config = EngineConfig(
        device="cpu", max_num_seqs=batch_size, max_num_batched_tokens=max_num_batched_tokens, seed=seed
    )
    engine = Engine.load("tiny", config, tiny=tiny)
    model_config = engine.model_config
    requests = make_requests(num_requests, seed, prompt_range, output_range, model_config.vocab_size)
    output_tokens = sum(r.max_tokens for r in requests)
    warm_up = make_requests(2, seed + 1, (16, 32), (2, 4), model_config.vocab_size)
    run_ours(engine, warm_up)
    twin = hf_twin(engine.runner.model) if with_hf else None
    if twin is not None:
        run_hf(twin, warm_up, batch_size)
    ours_runs, hf_runs = [], []
    for _ in range(repeats):
        ours_runs.append(run_ours(engine, requests))
        if twin is not None:
            hf_runs.append(run_hf(twin, requests, batch_size))
    ours = min(ours_runs, key=lambda run: run["seconds"])
    report: dict[str, Any] = {
        "num_requests": num_requests,
        "seed": seed,
        "batch_size": batch_size,
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "output_tokens": output_tokens,
        "repeats": repeats,
        "ours_s": ours["seconds"],
        "ours_cpu_s": ours["cpu_seconds"],
        "ours_cpu_stalled": ours["cpu_stalled"],
        "ours_tok_s": output_tokens / ours["seconds"],
        "ours_steps": ours["steps"],
        "ours_mean_step_ms": ours["mean_step_ms"],
        "model_parameters": model_config.num_parameters,
        "max_num_batched_tokens": max_num_batched_tokens,
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if hf_runs:
        hf = min(hf_runs, key=lambda run: run["seconds"])
        report["hf_s"] = hf["seconds"]
        report["hf_cpu_s"] = hf["cpu_seconds"]
        report["hf_cpu_stalled"] = hf["cpu_stalled"]
        report["hf_tok_s"] = output_tokens / hf["seconds"]
        report["speedup"] = report["ours_tok_s"] / report["hf_tok_s"]
    report["all_runs_s"] = {"ours": [r["seconds"] for r in ours_runs], "hf": [r["seconds"] for r in hf_runs]}
    return report


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        if names:
            return names[0]
    return platform.processor() or platform.machine()


def _machine() -> dict[str, Any]:
    import transformers

    return {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
