"""How fast a decode step could possibly be: the bytes it must read over the memory's bandwidth.

A decode step reads every weight once (the input embedding table only in the
rows it looks up) and each sequence's keys and values once; at the batch sizes
that serving runs, that traffic, not arithmetic, bounds the step. A step time
is judged as a fraction of this bound.

The bandwidth is the vendor's figure for the device where it is known, and
otherwise what a device-to-device copy reaches, measured (that also says how
far the figure is from what code can get).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from tropical.engine.config import ModelConfig

# The vendors' memory bandwidth in bytes/s, by device name; the more specific names first.
SPEC_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("h200", 4.8e12),
    ("h100 nvl", 3.9e12),
    ("h100 pcie", 2.0e12),
    ("h100", 3.35e12),  # SXM, HBM3
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb pcie", 1.935e12),
    ("a100", 1.555e12),  # 40 GB
    ("l40s", 0.864e12),
    ("l4", 0.3e12),
)


def spec_bandwidth(device_name: str) -> float | None:
    """The vendor's memory bandwidth of a device, by its name (`torch.cuda.get_device_name`); None if unknown."""
    name = device_name.lower()
    return next((bandwidth for key, bandwidth in SPEC_BANDWIDTH if key in name), None)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s that a plain copy moves, read and write both counted; the fastest of `repeats`."""
    return 2 * nbytes / copy_seconds(torch.empty(nbytes, dtype=torch.uint8, device=device), repeats)


def copy_seconds(source: torch.Tensor, repeats: int = 1) -> float:
    """The fastest of `repeats` copies of `source` into a tensor of its own on the same device, after a warm-up."""
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is the warm-up
        synchronize(source.device)
        started = time.perf_counter()
        target.copy_(source)
        synchronize(source.device)
        best = min(best, time.perf_counter() - started)
    return best


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that host clocks time it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: nn.Module) -> int:
    """What one decode step reads of the weights: all of them but an untied input embedding table."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_submodule("embed_tokens").weight
    tied = any(p is embedding for name, p in model.named_parameters(remove_duplicate=False) if name.startswith("lm_head"))
    return total if tied else total - embedding.numel() * embedding.element_size()


def kv_bytes_per_token(config: ModelConfig, element_size: int) -> int:
    """Keys and values of one token across all layers."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element_size


def decode_bytes(model: nn.Module, config: ModelConfig, element_size: int, batch: int, context: int) -> int:
    """The weights, plus every sequence's context of keys and values, read once."""
    return weight_bytes(model) + batch * context * kv_bytes_per_token(config, element_size)


def prefill_flops(config: ModelConfig, tokens: int) -> float:
    """Multiply-adds x 2 of a one-sequence prefill: every layer's matmuls per token, causal attention, one lm_head row."""
    per_token = config.num_layers * (
        config.hidden_size * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
        + 3 * config.hidden_size * config.intermediate_size
    )
    attention = 2 * config.num_layers * config.num_heads * config.head_dim * tokens * tokens  # QK and PV, half of each
    return 2.0 * per_token * tokens + attention + 2.0 * config.hidden_size * config.vocab_size
