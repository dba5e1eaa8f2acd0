"""Which engine a live worker runs, and the latency model its policy plans with, from one `--engine` word.

`tiny` (random weights, CPU), `smollm2` (the packaged real model), a local
model directory or `.gguf` file, or `emulated` (no model: each step takes the
latency model's time for it — a GPU cluster's timing on a CPU machine, the
cluster named by `--setting`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tropical.engine.serving import ServingEngine
from tropical.engine.tokenizer import ByteTokenizer, Tokenizer
from tropical.latency.model import LatencyModel
from tropical.protocol import LatencyModelSpec

EMULATED = "emulated"


@dataclass(frozen=True)
class EngineChoice:
    """A worker engine named on the command line, and the model its policies predict with."""

    source: str
    setting: str = "chat-13b"  # the emulated cluster's timing and KV capacity
    seed: int = 0
    max_model_len: int | None = None
    enforce_eager: bool = False  # on a GPU: decode steps eager, not replayed as CUDA graphs

    def check(self) -> None:
        """ValueError, one line, for a word that names no engine."""
        if self.source in ("tiny", "smollm2", EMULATED) or Path(self.source).exists():
            return
        raise ValueError(f"--engine must be tiny, smollm2, emulated or a model directory / .gguf file, not {self.source!r}")

    def latency_model(self) -> LatencyModel:
        if self.source == EMULATED:
            from tropical.experiments import setting_named

            return setting_named(self.setting).latency_model()
        from tropical.latency.profiling import default_latency_model

        return default_latency_model("tiny")  # until the profiler publishes one for this engine

    def model_key(self) -> str:
        """The key this engine's latency model is published under: by the profiler, or for an emulated engine by
        whichever service starts first (`known_profile`)."""
        if self.source == EMULATED:
            return f"{self.setting}@{EMULATED}/tp1"
        import torch

        from tropical.latency.profiling import hardware_name

        name = "tiny" if self.source == "tiny" else Path(self.source).name
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return f"{name}@{hardware_name(device)}/tp1"

    def known_profile(self, fitted_at: float) -> LatencyModelSpec | None:
        """The profile an emulated engine needs no profiler for: its own steps' model (None for a real engine).

        Stored, it lets the workers publish their online correction, which
        learns what the model leaves out: the worker's own time around each
        step, which a request's next token waits for too.
        """
        if self.source != EMULATED:
            return None
        return self.latency_model().to_spec(model=self.setting, hardware=EMULATED, tensor_parallel=1, samples=0, fitted_at=fitted_at)

    def engine(self) -> ServingEngine:
        if self.source == EMULATED:
            from tropical.engine.emulated import EmulatedEngine
            from tropical.experiments import setting_named

            setting = setting_named(self.setting)
            return EmulatedEngine(setting.latency_model(), setting.kv_capacity, seed=self.seed, max_model_len=self.max_model_len)
        from tropical.engine import Engine, EngineConfig

        return Engine.load(self.source, EngineConfig(max_model_len=self.max_model_len, enforce_eager=self.enforce_eager))

    def tokenizer(self) -> Tokenizer | None:
        """What the router tokenizes text prompts with (an emulated engine takes token ids only)."""
        if self.source == EMULATED:
            return None
        if self.source == "tiny":
            return ByteTokenizer()
        from tropical.engine.tokenizer import load_tokenizer

        return load_tokenizer(self.source)
