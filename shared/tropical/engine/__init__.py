"""The inference engine: paged KV cache, continuous batching, Llama/Mistral/Qwen2/Qwen3 models.

    engine = Engine.load("tiny")                      # or a local Hugging Face directory
    engine.add_request("r1", [1, 2, 3], SamplingParams(), max_tokens=16)
    while engine.has_unfinished():
        result = engine.step()                        # tokens, finished requests, step time

`step(EnginePlan(...))` runs exactly the decodes and prompt chunks a planner
chose; `sequence(request_id)` says where a request stands. `EmulatedEngine`
offers the same interface in a latency model's time, on a `Clock`.
"""

from tropical.engine.bookkeeping import InvalidRequest
from tropical.engine.clock import Clock, FakeClock, MonotonicClock
from tropical.engine.config import EngineConfig, ModelConfig, RopeScaling
from tropical.engine.emulated import EmulatedEngine
from tropical.engine.engine import Engine, Generation
from tropical.engine.kv_transfer import CudaIpcHandle, KvExport, kv_from_bytes, kv_to_bytes, open_cuda, share_cuda
from tropical.engine.plan import EnginePlan, PlanRefused, SequenceOutput, StepResult
from tropical.engine.sequence import SequenceState, Status
from tropical.engine.serving import ServingEngine

__all__ = [
    "Clock",
    "CudaIpcHandle",
    "EmulatedEngine",
    "Engine",
    "EngineConfig",
    "EnginePlan",
    "FakeClock",
    "Generation",
    "InvalidRequest",
    "KvExport",
    "ModelConfig",
    "MonotonicClock",
    "PlanRefused",
    "RopeScaling",
    "SequenceOutput",
    "SequenceState",
    "ServingEngine",
    "Status",
    "StepResult",
    "kv_from_bytes",
    "kv_to_bytes",
    "open_cuda",
    "share_cuda",
]
