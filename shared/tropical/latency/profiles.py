"""Latency models from published GPU profiles (the data files in `profiles/`).

Four sources, each reduced to samples of isolated prefills (L tokens → seconds)
and decode steps (B sequences, Σctx tokens → seconds) and then fitted with
`tropical.latency.fit`, so every preset carries the residual spread of its own fit:

- DistServe's fitted coefficients (OPT-13B/66B, A100-80GB): their formulas
  evaluated on a grid of operating points and refitted to our form.
- Splitwise's end-to-end measurements (Llama-2-70B, BLOOM-176B; A100/H100).
- Vidur's per-operator tables (Llama-2-7B/70B, A100) composed into step times,
  plus analytic attention terms the tables lack.
- Sarathi-Serve's OSDI tables (Yi-34B, TP2, A100 PCIe).

Times in the source files are milliseconds (Sarathi's batch times: seconds);
everything returned here is in seconds.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from statistics import median

import numpy as np

from tropical.latency.fit import DecodeFit, PrefillFit, fit_decode, fit_prefill, latency_model_from_fits
from tropical.latency.model import LatencyModel

MS = 1e-3
SOURCES = ("distserve", "splitwise", "sarathi", "vidur")  # preference order when several offer a setup


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float  # dense fp16/bf16 tensor-core FLOP/s
    hbm_bandwidth: float  # bytes/s


A100_80G = Gpu("a100-80g", peak_flops=312e12, hbm_bandwidth=2.039e12)  # SXM, as in DGX-A100
A100_80G_PCIE = Gpu("a100-80g-pcie", peak_flops=312e12, hbm_bandwidth=1.935e12)

# Fractions of peak that the attention kernels reach. FlashAttention-2 runs the
# forward pass at roughly 50-70 % of A100 peak for head dim 128; paged decode
# attention streams the KV cache at roughly 60-80 % of HBM bandwidth. We take the
# low ends: attention is a small share of either phase for these models, and a
# slightly pessimistic model errs on the side of meeting SLOs.
ATTENTION_FLOPS_FRACTION = 0.5
KV_BANDWIDTH_FRACTION = 0.6

# Layer counts are not in Vidur's tables (every other shape is).
VIDUR_LAYERS = {"llama-2-7b": 32, "llama-2-70b": 80}


@dataclass(frozen=True)
class ProfileKey:
    source: str
    model: str
    hardware: str
    tensor_parallel: int

    def __str__(self) -> str:
        return f"{self.model}@{self.hardware}/tp{self.tensor_parallel} [{self.source}]"


@dataclass(frozen=True)
class ProfileFit:
    """A preset's fits together with the samples they were fitted to."""

    key: ProfileKey
    prefill: PrefillFit
    decode: DecodeFit
    prefill_samples: tuple[tuple[int, float], ...]
    decode_samples: tuple[tuple[int, int, float], ...]

    def latency_model(self) -> LatencyModel:
        key = self.key
        name = f"{key.model}@{key.hardware}/tp{key.tensor_parallel}:{key.source}"
        return latency_model_from_fits(self.prefill, self.decode, name=name)


# --- names -------------------------------------------------------------------------------


def canonical_model(name: str) -> str:
    """'facebook/opt-13b', 'meta-llama/Llama-2-70b-hf', 'llama2-70b' → 'opt-13b', 'llama-2-70b', 'llama-2-70b'."""
    name = name.strip().lower().rsplit("/", 1)[-1]
    name = name.removesuffix("-hf")
    if name.startswith("llama2-"):
        name = "llama-2-" + name.removeprefix("llama2-")
    return name


def canonical_hardware(name: str) -> str:
    """'A100-80GB' → 'a100-80g' (Splitwise writes '80gb', we write '80g' as DistServe does)."""
    return name.strip().lower().replace("80gb", "80g")


def _data_file(relative: str) -> str:
    return (resources.files("tropical.latency") / "profiles" / relative).read_text(encoding="utf-8")


def _csv_rows(relative: str) -> list[dict[str, str]]:
    return list(csv.DictReader(_data_file(relative).splitlines()))


def _fit(
    key: ProfileKey, prefill: Iterable[tuple[int, float]], decode: Iterable[tuple[int, int, float]], *, context_slope: float | None = None
) -> ProfileFit:
    prefill_samples = tuple(prefill)
    decode_samples = tuple(decode)
    return ProfileFit(
        key=key,
        prefill=fit_prefill(prefill_samples),
        decode=fit_decode(decode_samples, context_slope=context_slope),
        prefill_samples=prefill_samples,
        decode_samples=decode_samples,
    )


# --- DistServe ---------------------------------------------------------------------------

DISTSERVE_HARDWARE = "a100-80g"
DISTSERVE_PREFILL_LENGTHS = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048)
DISTSERVE_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 94, 95, 112, 128, 160, 192, 256)
DISTSERVE_CONTEXTS = (64, 128, 256, 512, 1024, 2048)  # mean KV tokens per sequence; OPT's window is 2,048


def _distserve_profiles(engine: str) -> dict[str, dict[int, dict]]:
    if engine not in ("distserve", "vllm"):
        raise ValueError(f"DistServe profiles exist for engine 'distserve' or 'vllm', not {engine!r}")
    raw = json.loads(_data_file(f"distserve/profiler-a100-80g.{engine}.json"))
    return {canonical_model(model): {int(tp): coefficients for tp, coefficients in by_tp.items()} for model, by_tp in raw.items()}


def distserve_kv_capacity(model: str, tensor_parallel: int, pipeline_parallel: int = 1) -> int:
    """KV tokens one A100-80GB instance of `model` holds at this parallelism, from DistServe's own table."""
    model = canonical_model(model)
    for row in _csv_rows("distserve/max_num_tokens.csv"):
        if canonical_model(row["model"]) == model and int(row["tp"]) == tensor_parallel and int(row["pp"]) == pipeline_parallel:
            return int(row["max_num_tokens"])
    raise ValueError(f"no KV capacity recorded for {model} at tp{tensor_parallel} pp{pipeline_parallel}")


def distserve_fit(model: str, tensor_parallel: int, *, engine: str = "distserve") -> ProfileFit:
    """Refit DistServe's A100-80GB coefficients (`engine` 'distserve' or its 'vllm' baseline) to our form.

    Their prefill, a + b·Σl + c·Σl² ms, maps exactly onto c2, c1, c0 (the
    refit on sampled lengths recovers it; their file carries no residuals, so
    prefill_std is 0). Their decode, a + b·Σ(ctx+1) + c·B ms, switches between
    two coefficient sets at a batch-size threshold (95) and the two regimes do
    not meet at the threshold; one linear d0 + d1·B + d2·Σctx cannot follow
    the jump. We fit it over both regimes on a grid of batch sizes 1-256 and
    mean contexts 64-2,048 tokens, keeping only points whose total KV fits
    DistServe's own capacity table, so the fit is weighted by what can actually
    run; the price of one formula is the decode_std it reports.
    """
    model = canonical_model(model)
    profiles = _distserve_profiles(engine)
    key = ProfileKey("distserve" if engine == "distserve" else "distserve-vllm", model, DISTSERVE_HARDWARE, tensor_parallel)
    if model not in profiles or tensor_parallel not in profiles[model]:
        raise ValueError(f"DistServe has no {engine} profile for {key}; it has {_listing(_distserve_keys())}")
    coefficients = profiles[model][tensor_parallel]
    a, b, c = coefficients["prefill"]
    prefill = [(length, (a + b * length + c * length * length) * MS) for length in DISTSERVE_PREFILL_LENGTHS]

    threshold = int(coefficients["decoding_large_small_bs_threshold"])
    capacity = distserve_kv_capacity(model, tensor_parallel)
    decode = []
    for batch in DISTSERVE_BATCHES:
        a, b, c = coefficients["decoding_smallbs" if batch < threshold else "decoding_largebs"]
        for per_sequence in DISTSERVE_CONTEXTS:
            context = batch * per_sequence
            if context <= capacity:
                decode.append((batch, context, (a + b * (context + batch) + c * batch) * MS))
    return _fit(key, prefill, decode)


def distserve_model(model: str, tensor_parallel: int, *, engine: str = "distserve") -> LatencyModel:
    return distserve_fit(model, tensor_parallel, engine=engine).latency_model()


def _distserve_keys() -> list[ProfileKey]:
    return [
        ProfileKey("distserve", model, DISTSERVE_HARDWARE, tp)
        for model, by_tp in _distserve_profiles("distserve").items()
        for tp in sorted(by_tp)
    ]


# --- Splitwise ---------------------------------------------------------------------------


def _splitwise_rows() -> list[dict[str, str]]:
    return _csv_rows("splitwise/perf_model.csv")


def splitwise_fit(model: str, hardware: str, tensor_parallel: int) -> ProfileFit:
    """Fit Splitwise's measured prompt and token phases (perf_model.csv).

    Each configuration (prompt size, batch size, output size) was measured
    five times, and the 512-token single-request configuration appears in all
    three of their sweeps; we fit one sample per distinct configuration (the
    median of its repeats, as Splitwise's own simulator uses medians) so no
    configuration outweighs the others.

    prompt_time is the prefill of the whole batch; we fit the batch-size-1
    configurations, which are isolated prefills as our prefill_time means
    them (their batched prefills scale worse than linearly in the batch, a
    property of their stack rather than of one prompt).

    token_time is the time of one decode iteration, not of the whole decode
    phase: over the 960 rows with short generations (128 or 256 tokens),
    e2e_time / (prompt_time + token_size·token_time) has median 0.99 and is
    within 10 % of 1 for 96 % of them, while e2e_time / (prompt_time +
    token_time) has median 20. Longer generations stopped early, so the number
    of iterations a row actually ran is n = min(token_size, (e2e_time −
    prompt_time)/token_time); its mean context per sequence is prompt_size +
    n/2, and Σctx is that times the batch size.
    """
    model, hardware = canonical_model(model), canonical_hardware(hardware)
    key = ProfileKey("splitwise", model, hardware, tensor_parallel)
    repeats: dict[tuple[int, int, int], list[dict[str, str]]] = defaultdict(list)
    for row in _splitwise_rows():
        if _splitwise_key(row) == key:
            repeats[int(row["prompt_size"]), int(row["batch_size"]), int(row["token_size"])].append(row)
    if not repeats:
        raise ValueError(f"Splitwise has no profile for {key}; it has {_listing(_splitwise_keys())}")
    prefill: dict[int, list[float]] = defaultdict(list)
    decode = []
    for (prompt, batch, tokens), rows in sorted(repeats.items()):
        if batch == 1:
            prefill[prompt].extend(float(row["prompt_time"]) * MS for row in rows)
        token_time = median(float(row["token_time"]) for row in rows)
        iterations = median(min(tokens, (float(row["e2e_time"]) - float(row["prompt_time"])) / float(row["token_time"])) for row in rows)
        decode.append((batch, round(batch * (prompt + iterations / 2)), token_time * MS))
    return _fit(key, ((prompt, median(times)) for prompt, times in sorted(prefill.items())), decode)


def splitwise_model(model: str, hardware: str, tensor_parallel: int) -> LatencyModel:
    return splitwise_fit(model, hardware, tensor_parallel).latency_model()


def _splitwise_key(row: dict[str, str]) -> ProfileKey:
    return ProfileKey("splitwise", canonical_model(row["model"]), canonical_hardware(row["hardware"]), int(row["tensor_parallel"]))


def _splitwise_keys() -> list[ProfileKey]:
    return sorted(set(map(_splitwise_key, _splitwise_rows())), key=str)


# --- Vidur -------------------------------------------------------------------------------

VIDUR_FILES = {"llama-2-7b": "vidur/a100/Llama-2-7b-hf_mlp.csv", "llama-2-70b": "vidur/a100/Llama-2-70b-hf_mlp.csv"}
VIDUR_TENSOR_PARALLEL = (1, 2, 4, 8)
VIDUR_LAYER_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
VIDUR_DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
VIDUR_DECODE_CONTEXTS = (256, 1024, 4096)  # per sequence; Llama-2's window is 4,096


@dataclass(frozen=True)
class _Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def prefill_attention_seconds(self, tokens: int, tensor_parallel: int, gpu: Gpu) -> float:
        """Causal attention over one prompt: QKᵀ and AV, 2·L²·hidden FLOPs per layer after masking."""
        flops = 2.0 * tokens * tokens * self.hidden * self.layers / tensor_parallel
        return flops / (ATTENTION_FLOPS_FRACTION * gpu.peak_flops)

    def kv_read_seconds_per_token(self, tensor_parallel: int, gpu: Gpu) -> float:
        """One decode step reads every cached K and V (fp16) once."""
        kv_bytes = 2 * self.kv_heads * self.head_dim * 2 * self.layers / tensor_parallel
        return kv_bytes / (KV_BANDWIDTH_FRACTION * gpu.hbm_bandwidth)


def _vidur_layer_ms(model: str, tensor_parallel: int) -> tuple[_Shape, dict[int, float]]:
    """Per-layer time of the token-parallel operators, keyed by tokens in the batch."""
    samples: dict[int, list[float]] = defaultdict(list)
    shape = None
    for row in _csv_rows(VIDUR_FILES[model]):
        if int(row["num_tensor_parallel_workers"]) != tensor_parallel:
            continue
        shape = _Shape(VIDUR_LAYERS[model], int(row["n_embd"]), int(row["n_head"]), int(row["n_kv_head"]))
        samples[int(row["num_tokens"])].append(sum(float(row[f"time_stats.{op}.median"] or 0.0) for op in VIDUR_LAYER_OPS))
    assert shape is not None
    return shape, {tokens: median(times) for tokens, times in sorted(samples.items())}


def _vidur_all_reduce_ms(tensor_parallel: int) -> tuple[np.ndarray, np.ndarray]:
    """Measured all-reduce time against message size, for a TP group inside one node."""
    if tensor_parallel == 1:
        return np.array([0.0, 1.0]), np.array([0.0, 0.0])
    by_size: dict[int, list[float]] = defaultdict(list)
    for row in _csv_rows("vidur/network/a100_dgx_all_reduce.csv"):
        if int(row["num_workers"]) == tensor_parallel and int(row["devices_per_node"]) == tensor_parallel:
            by_size[int(row["size"])].append(float(row["time_stats.all_reduce.median"]))
    sizes = np.array(sorted(by_size), dtype=float)
    return sizes, np.array([median(by_size[int(size)]) for size in sizes])


def stage_hop(hardware: str = "a100-80g") -> tuple[float, float]:
    """(latency in s, s per byte) of one pipeline stage handing its activations to the next GPU of the node.

    Fitted to Vidur's measured NCCL send/receive times between two GPUs of one
    DGX-A100 (2 KB to 64 MB), weighted by relative error so small messages,
    a decode step's, fit as well as large ones: 13 µs plus 286 GB/s, median
    error 10 %.
    """
    if canonical_hardware(hardware) != A100_80G.name:
        raise ValueError(f"stage-to-stage send times are profiled for {A100_80G.name} only, not {hardware}")
    sizes, times = [], []
    for row in _csv_rows("vidur/network/a100_dgx_send_recv.csv"):
        if int(row["num_workers"]) == 2 and int(row["devices_per_node"]) == 2:
            sizes.append(float(row["size"]))
            times.append(float(row["time_stats.send_recv.median"]) * MS)
    x, y = np.array(sizes), np.array(times)
    weights = 1.0 / y
    (latency, per_byte), *_ = np.linalg.lstsq(np.vstack([np.ones_like(x), x]).T * weights[:, None], y * weights, rcond=None)
    return float(latency), float(per_byte)


def vidur_fit(model: str, hardware: str, tensor_parallel: int) -> ProfileFit:
    """Compose step times from Vidur's per-operator A100 profiles, then fit.

    Vidur's tables time one transformer layer's token-parallel operators
    (norms, QKV/output projections, RoPE, MLP, residual add) on one GPU of a
    TP group, for a batch of `num_tokens` tokens, with one row set per TP
    degree, so the TP split is already in the numbers. A step is, as in Vidur:
    layers × (operators + 2 all-reduces) + attention. Embedding, LM head and
    CPU-side overheads (scheduling, sampling, input preparation) are left out,
    as in Vidur's model time; expect this model to read low for small decode
    batches where those overheads matter.

    All-reduce: Vidur's measured DGX-A100 NCCL times for a TP group inside one
    node, interpolated at tokens × hidden × 2 bytes.
    Attention (absent from the tables): prefill costs 2·L²·hidden FLOPs per
    layer (causal) at ATTENTION_FLOPS_FRACTION of peak; decode reads each
    cached K and V once at KV_BANDWIDTH_FRACTION of HBM bandwidth, which sets
    d2 directly.
    """
    model, hardware = canonical_model(model), canonical_hardware(hardware)
    key = ProfileKey("vidur", model, hardware, tensor_parallel)
    if model not in VIDUR_FILES or hardware != A100_80G.name or tensor_parallel not in VIDUR_TENSOR_PARALLEL:
        raise ValueError(f"Vidur profiles do not cover {key}; they cover {_listing(_vidur_keys())}")
    shape, layer_ms = _vidur_layer_ms(model, tensor_parallel)
    sizes, all_reduce_ms = _vidur_all_reduce_ms(tensor_parallel)

    def model_seconds(tokens: int) -> float:
        all_reduce = float(np.interp(tokens * shape.hidden * 2, sizes, all_reduce_ms))
        return shape.layers * (layer_ms[tokens] + 2 * all_reduce) * MS

    prefill = [(tokens, model_seconds(tokens) + shape.prefill_attention_seconds(tokens, tensor_parallel, A100_80G)) for tokens in layer_ms]
    per_token = shape.kv_read_seconds_per_token(tensor_parallel, A100_80G)
    decode = [
        (batch, batch * context, model_seconds(batch) + per_token * batch * context)
        for batch in VIDUR_DECODE_BATCHES
        for context in VIDUR_DECODE_CONTEXTS
    ]
    return _fit(key, prefill, decode, context_slope=per_token)


def vidur_model(model: str, hardware: str, tensor_parallel: int) -> LatencyModel:
    return vidur_fit(model, hardware, tensor_parallel).latency_model()


def _vidur_keys() -> list[ProfileKey]:
    return [ProfileKey("vidur", model, A100_80G.name, tp) for model in VIDUR_FILES for tp in VIDUR_TENSOR_PARALLEL]


# --- Sarathi-Serve -----------------------------------------------------------------------

SARATHI_KEY = ProfileKey("sarathi", "yi-34b", A100_80G_PCIE.name, 2)
SARATHI_SHAPE = _Shape(layers=60, hidden=7168, heads=56, kv_heads=8)
SARATHI_DECODE_CONTEXT = 1022  # their decode runs: 1,024-token requests at prefill:decode 255:1 → 1,020 + 4 tokens


def sarathi_fit(model: str = "yi-34b", hardware: str = "a100-80g-pcie", tensor_parallel: int = 2) -> ProfileFit:
    """Fit Sarathi-Serve's OSDI Figure 2 tables (Yi-34B, TP2, 2×A100-80GB PCIe).

    Prefill: seven single-prompt batches, 128-16,384 tokens; the row with
    Batch Id 0 (the run's first batch, 256 tokens, slower than the 512-token
    one and without an inter-batch delay) is warm-up and is left out.
    Decode: eight batch sizes 1-128, every sequence holding about 1,022
    tokens (the runs used 1,024-token requests split 255:1 between prompt and
    output). With one context length Σctx is proportional to B, so the
    per-token context cost cannot come from these rows: d2 is the same
    KV-bandwidth term as in the Vidur models, and d0, d1 are fitted to the rest.
    """
    key = ProfileKey("sarathi", canonical_model(model), canonical_hardware(hardware), tensor_parallel)
    if key != SARATHI_KEY:
        raise ValueError(f"Sarathi-Serve's tables cover only {SARATHI_KEY}, not {key}")
    prefill = [
        (int(row["batch_num_prefill_tokens"]), float(row["batch_execution_time"]))
        for row in _csv_rows("sarathi_osdi/yi34b_tp2_a100pcie_prefill_only.csv")
        if float(row["Batch Id"]) != 0.0
    ]
    decode = [
        (int(float(row["batch_size"])), int(float(row["batch_size"])) * SARATHI_DECODE_CONTEXT, float(row["batch_execution_time"]))
        for row in _csv_rows("sarathi_osdi/yi34b_tp2_a100pcie_decode_only.csv")
    ]
    per_token = SARATHI_SHAPE.kv_read_seconds_per_token(tensor_parallel, A100_80G_PCIE)
    return _fit(key, prefill, decode, context_slope=per_token)


def sarathi_model(model: str = "yi-34b", hardware: str = "a100-80g-pcie", tensor_parallel: int = 2) -> LatencyModel:
    return sarathi_fit(model, hardware, tensor_parallel).latency_model()


# --- one entry point ---------------------------------------------------------------------


def available_profiles(source: str | None = None) -> list[ProfileKey]:
    """Every (source, model, hardware, TP) that `load_profile` can build."""
    listings = {
        "distserve": _distserve_keys,
        "splitwise": _splitwise_keys,
        "sarathi": lambda: [SARATHI_KEY],
        "vidur": _vidur_keys,
    }
    if source is not None and source not in listings:
        raise ValueError(f"unknown profile source {source!r}; sources: {', '.join(SOURCES)}")
    return [key for name in SOURCES if source in (None, name) for key in listings[name]()]


def fit_profile(model: str, hardware: str = "a100-80g", tensor_parallel: int = 1, *, source: str | None = None) -> ProfileFit:
    """The fits behind `load_profile`, with their samples and quality."""
    wanted = (canonical_model(model), canonical_hardware(hardware), tensor_parallel)
    matches = [key for key in available_profiles(source) if (key.model, key.hardware, key.tensor_parallel) == wanted]
    if not matches:
        where = f" from {source}" if source else ""
        raise ValueError(
            f"no latency profile{where} for {wanted[0]}@{wanted[1]}/tp{wanted[2]}; available: {_listing(available_profiles(source))}"
        )
    key = matches[0]  # SOURCES order: fitted-by-authors, then measured end to end, then composed
    builders = {
        "distserve": lambda: distserve_fit(key.model, key.tensor_parallel),
        "splitwise": lambda: splitwise_fit(key.model, key.hardware, key.tensor_parallel),
        "sarathi": lambda: sarathi_fit(key.model, key.hardware, key.tensor_parallel),
        "vidur": lambda: vidur_fit(key.model, key.hardware, key.tensor_parallel),
    }
    return builders[key.source]()


def load_profile(model: str, hardware: str = "a100-80g", tensor_parallel: int = 1, *, source: str | None = None) -> LatencyModel:
    """A LatencyModel for a model on a GPU type at a TP degree, from the published profiles.

    Names are lower case ('opt-13b', 'llama-2-70b', 'a100-80g'); common
    spellings ('facebook/opt-13b', 'Llama-2-70b-hf', 'A100-80GB') are accepted.
    Where several sources cover a setup, the first of SOURCES wins unless
    `source` picks one. Unknown setups raise ValueError listing what exists.
    """
    return fit_profile(model, hardware, tensor_parallel, source=source).latency_model()


def _listing(keys: Sequence[ProfileKey]) -> str:
    return ", ".join(map(str, keys))


def markdown_table(keys: Sequence[ProfileKey] | None = None) -> str:
    """Coefficients and fit quality of presets, as the table in docs/results.md."""
    lines = [
        "| preset | c0 (s/tok²) | c1 (s/tok) | c2 (s) | d0 (s) | d1 (s/seq) | d2 (s/tok) "
        "| prefill: rel std / max / R² / n | decode: rel std / max / R² / n | 2k prefill | decode 32×1k |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in available_profiles() if keys is None else keys:
        fit = fit_profile(key.model, key.hardware, key.tensor_parallel, source=key.source)
        model = fit.latency_model()
        quality = [f"{q.rel_std:.3f} / {q.max_rel_error:.3f} / {q.r2:.4f} / {q.samples}" for q in (fit.prefill.quality, fit.decode.quality)]
        lines.append(
            f"| {key} | {model.c0:.3e} | {model.c1:.3e} | {model.c2:.3e} | {model.d0:.3e} | {model.d1:.3e} | {model.d2:.3e} "
            f"| {quality[0]} | {quality[1]} | {model.prefill_time(2048) * 1e3:.0f} ms | {model.decode_time(32, 32 * 1024) * 1e3:.1f} ms |"
        )
    return "\n".join(lines)
