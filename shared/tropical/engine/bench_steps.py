"""Step times of the engine against the memory roofline and against Hugging Face, on one device, in one run.

    tropical bench-engine --device cuda --json engine-steps.json

Decode: `batch` sequences whose contexts start at `context` tokens, one token
each per step; the median of `steps` timed steps (after warm-up), each the
engine's whole `step()`: plan, forward, sampling and bookkeeping, as serving
runs it. On a GPU the engine is timed twice, with its decode CUDA graphs and
without them (`enforce_eager`), on the same cache.

Hugging Face runs the same weights (copied into its own modules) with its
default dynamic cache and SDPA attention: a batched prefill, then one
`forward` per decode step and the argmax of its logits.

Prefill: one prompt of `prefill` tokens in one step, against the same prompt
through Hugging Face's forward (its logits kept for the last token only).

The default model is Llama-3-8B's shape with random weights drawn on the
device (what a decode step reads does not depend on the values).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from tropical.engine.bench import cpu_name, hf_twin
from tropical.engine.config import EngineConfig, ModelConfig
from tropical.engine.engine import Engine
from tropical.engine.loader import fill_random
from tropical.engine.models import CausalLM
from tropical.engine.models.rope import RotaryEmbedding
from tropical.engine.roofline import copy_bandwidth, decode_bytes, prefill_flops, spec_bandwidth, synchronize, weight_bytes
from tropical.engine.tokenizer import ByteTokenizer
from tropical.protocol import SamplingParams

FORCED = SamplingParams(temperature=0.0, ignore_eos=True)
WARM_UP_STEPS = 3

LLAMA3_8B = ModelConfig(
    family="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position=8192,
)
SHAPES = {"llama3-8b": LLAMA3_8B, "tiny": ModelConfig.tiny()}


def random_model_on(config: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device, seed: int) -> CausalLM:
    """Random weights drawn where they live: drawing 8B of them on the CPU would take a minute."""
    with torch.device("meta"):
        model = CausalLM(config, max_positions)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gave each module a tensor of its own
        model.lm_head.weight = model.embed_tokens.weight
    fill_random(model, torch.Generator(device=device).manual_seed(seed))
    model.rope = RotaryEmbedding(config, max_positions).to(device=device, dtype=dtype)  # its tables were left empty
    return model.eval()


def run_step_benchmark(
    shape: str = "llama3-8b",
    device: str = "cuda",
    *,
    batches: Sequence[int] = (1, 8, 32, 64),
    context: int = 1024,
    prefill: int = 8192,
    steps: int = 20,
    with_hf: bool = True,
    model_config: ModelConfig | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Decode step times at each batch size and one long prefill, ours and Hugging Face's, with the roofline of each."""
    target = torch.device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    max_len = max(prefill + 1, context + WARM_UP_STEPS + steps + 1)
    config = model_config or SHAPES[shape]
    config = dataclasses.replace(config, max_position=max(config.max_position, max_len))  # no step cost depends on it
    block_size = 16
    per_sequence = -(-(context + WARM_UP_STEPS + steps + 1) // block_size) + 1  # one spare: admission keeps room to grow
    blocks = max(max(batches) * per_sequence, -(-prefill // block_size) + 1)
    engine_config = EngineConfig(
        device=device, max_num_seqs=max(batches), max_num_batched_tokens=max(prefill, max(batches) * context),
        max_model_len=max_len, num_kv_blocks=blocks, block_size=block_size, seed=seed,
    )  # fmt: skip
    model = random_model_on(config, max_len, dtype, target, seed)
    engine = Engine(model, ByteTokenizer(), engine_config)
    element = torch.empty((), dtype=dtype).element_size()
    bandwidth = _bandwidth(target)
    hf = hf_twin(model, dtype) if with_hf else None
    tokens = _tokens(config.vocab_size, seed)
    decode = []
    for batch in batches:
        row: dict[str, Any] = {"batch": batch, "context": context}
        row["roofline_ms"] = 1e3 * decode_bytes(model, config, element, batch, context + WARM_UP_STEPS + steps // 2) / bandwidth["used"]
        row["ours_ms"] = _our_decode_ms(engine, tokens(batch, context), steps)
        if engine.runner.decode is not None:
            with _eager(engine):
                row["ours_eager_ms"] = _our_decode_ms(engine, tokens(batch, context), steps)
        if hf is not None:
            row["hf_ms"] = _hf_decode_ms(hf, tokens(batch, context), steps, target)
        for side in ("ours", "ours_eager", "hf"):
            if f"{side}_ms" in row:
                row[f"{side}_of_roofline"] = row["roofline_ms"] / row[f"{side}_ms"]
        decode.append(row)
    flops = prefill_flops(config, prefill)
    long: dict[str, Any] = {"tokens": prefill, "ours_ms": _our_prefill_ms(engine, tokens(1, prefill)[0])}
    long["ours_tflops"] = flops / long["ours_ms"] / 1e9
    if hf is not None:
        long["hf_ms"] = _hf_prefill_ms(hf, tokens(1, prefill), target)
        long["hf_tflops"] = flops / long["hf_ms"] / 1e9
        long["ours_over_hf"] = long["ours_ms"] / long["hf_ms"]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": _describe(target),
        "model": {"shape": shape if model_config is None else "custom", "parameters": sum(p.numel() for p in model.parameters()),
                  "weight_bytes_read_per_step": weight_bytes(model), "dtype": str(dtype).removeprefix("torch.")},
        "bandwidth": bandwidth,
        "attention": engine.runner.attention.name,
        "decode_graphs": engine.runner.decode is not None,
        "steps": steps,
        "decode": decode,
        "prefill": long,
    }  # fmt: skip


def _tokens(vocab: int, seed: int) -> Callable[[int, int], list[list[int]]]:
    generator = torch.Generator().manual_seed(seed)

    def draw(batch: int, length: int) -> list[list[int]]:
        return torch.randint(0, vocab, (batch, length), generator=generator).tolist()

    return draw


def _bandwidth(device: torch.device) -> dict[str, Any]:
    """The vendor's figure where the device is known, else the measured copy rate; both recorded."""
    copy = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 28))
    spec = spec_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {"spec": spec, "copy": copy, "used": spec or copy, "source": "spec" if spec else "copy"}


@contextlib.contextmanager
def _eager(engine: Engine) -> Iterator[None]:
    graphs, engine.runner.decode = engine.runner.decode, None
    try:
        yield
    finally:
        engine.runner.decode = graphs


def _our_decode_ms(engine: Engine, prompts: list[list[int]], steps: int) -> float:
    """Prefill the batch, then time decode-only steps; the median."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"decode-{i}", prompt, FORCED, max_tokens=WARM_UP_STEPS + steps + 1)
    started: set[str] = set()
    while len(started) < len(prompts):  # until every prompt has its first token
        started.update(out.request_id for out in engine.step().outputs if out.new_token_ids)
    times = []
    for step in range(WARM_UP_STEPS + steps):
        result = engine.step()
        if result.num_prefill_tokens or result.num_decode_tokens != len(prompts):
            raise RuntimeError(f"step {step} was not a decode of the whole batch: {result.plan}")
        if step >= WARM_UP_STEPS:
            times.append(result.step_time_s)
    for i in range(len(prompts)):
        engine.abort(f"decode-{i}")
    return 1e3 * statistics.median(times)


def _our_prefill_ms(engine: Engine, prompt: list[int], repeats: int = 3) -> float:
    times = []
    for i in range(repeats + 1):
        engine.add_request(f"prefill-{i}", prompt, FORCED, max_tokens=1)
        result = engine.step()
        if result.num_prefill_tokens != len(prompt):
            raise RuntimeError(f"the prompt did not fit one step: {result.num_prefill_tokens} of {len(prompt)} tokens")
        if i:  # the first compiles and allocates
            times.append(result.step_time_s)
    return 1e3 * min(times)


@torch.inference_mode()
def _hf_decode_ms(model: torch.nn.Module, prompts: list[list[int]], steps: int, device: torch.device) -> float:
    from transformers import DynamicCache

    cache = DynamicCache()
    times = []
    with warnings.catch_warnings():  # `past_key_values` has a new name, which older releases lack
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        out = model(input_ids=torch.tensor(prompts, device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(WARM_UP_STEPS + steps):
            synchronize(device)
            started = time.perf_counter()
            out = model(input_ids=tokens, past_key_values=cache, use_cache=True)
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.tolist()  # the tokens reach the host, as a server's must
            if step >= WARM_UP_STEPS:
                times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def _hf_prefill_ms(model: torch.nn.Module, prompt: list[list[int]], device: torch.device, repeats: int = 3) -> float:
    input_ids = torch.tensor(prompt, device=device)
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits.argmax(-1).tolist()
        if i:
            times.append(time.perf_counter() - started)
    return 1e3 * min(times)


def _describe(device: torch.device) -> dict[str, Any]:
    import transformers

    described: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
                                 "python": platform.python_version()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        described.update(name=properties.name, memory_gib=round(properties.total_memory / 2**30, 1),
                         sms=properties.multi_processor_count, cuda=torch.version.cuda, driver=_driver())
        with contextlib.suppress(ImportError):
            import triton

            described["triton"] = triton.__version__
    else:
        described.update(name=cpu_name(), threads=torch.get_num_threads())
    return described


def _driver() -> str | None:
    """The NVIDIA driver's version, from the kernel module (no NVML binding needed)."""
    try:
        with open("/proc/driver/nvidia/version") as version:
            line = version.readline()
    except OSError:
        return None
    words = line.split()
    return next((w for w in words if w.count(".") >= 1 and w.replace(".", "").isdigit()), None)
