"""The inference engine: paged KV cache, continuous batching, Llama/Mistral/Qwen2/Qwen3 models.

    engine = Engine.load("tiny")                      # or a local Hugging Face directory
    engine.add_request("r1", [1, 2, 3], SamplingParams(), max_tokens=16)
    while engine.has_unfinished():
        result = engine.step()                        # tokens, finished requests, step time
"""

from tropical.engine.config import EngineConfig, ModelConfig, RopeScaling
from tropical.engine.engine import Engine, Generation, InvalidRequest, SequenceOutput, StepResult
from tropical.engine.kv_transfer import CudaIpcHandle, KvExport, kv_from_bytes, kv_to_bytes, open_cuda, share_cuda

__all__ = [
    "CudaIpcHandle",
    "Engine",
    "EngineConfig",
    "Generation",
    "InvalidRequest",
    "KvExport",
    "ModelConfig",
    "RopeScaling",
    "SequenceOutput",
    "StepResult",
    "kv_from_bytes",
    "kv_to_bytes",
    "open_cuda",
    "share_cuda",
]
