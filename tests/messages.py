"""One realistic example of every message, for round-trip and fuzz tests."""

from __future__ import annotations

from typing import Any

from tropical.protocol import (
    CancelRequest,
    DecodeCoefficients,
    DecodeLoad,
    Dispatch,
    ErrorCode,
    ErrorReply,
    FinishReason,
    GenerateRequest,
    KvAck,
    KvHandoff,
    KvLayout,
    KvTransport,
    LatencyModelSpec,
    Message,
    PrefillCoefficients,
    RequestFinished,
    RequestRecord,
    RequestState,
    SamplingParams,
    Slo,
    Timings,
    TokenChunk,
    WorkerRole,
    WorkerStatus,
)

T0 = 1_700_000_000.0


def generate_request(**overrides: Any) -> GenerateRequest:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "prompt": "Summarise the design notes.",
        "max_tokens": 128,
        "sampling": SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=7, stop_token_ids=[2]),
        "slo": Slo(ttft_ms=500.0, tpot_ms=80.0),
        "arrival_time": T0,
        "reply_to": "tropical.reply.client-1",
    }
    fields.update(overrides)
    return GenerateRequest(**fields)


def worker_status(worker_id: str = "multiplex-0", **overrides: Any) -> WorkerStatus:
    fields: dict[str, Any] = {
        "worker_id": worker_id,
        "role": WorkerRole.MULTIPLEX,
        "queue": f"tropical.worker.{worker_id}",
        "sent_at": T0 + 1,
        "kv_capacity_tokens": 100_000,
        "kv_free_tokens": 60_000,
        "queued_prefills": 1,
        "queued_prefill_tokens": 900,
        "decodes": [DecodeLoad(request_id="req-0", context_tokens=700, tpot_slo_ms=80.0, slack_s=-0.01)],
        "busy_until": T0 + 1.2,
    }
    fields.update(overrides)
    return WorkerStatus(**fields)


def latency_model(model: str = "llama-2-70b", **overrides: Any) -> LatencyModelSpec:
    fields: dict[str, Any] = {
        "model": model,
        "hardware": "a100-80g",
        "tensor_parallel": 4,
        "prefill": PrefillCoefficients(c0=1.2e-8, c1=9.5e-5, c2=0.021),
        "decode": DecodeCoefficients(d0=0.018, d1=1.1e-4, d2=2.3e-7),
        "prefill_residual": 0.04,
        "decode_residual": 0.02,
        "samples": 250,
        "fitted_at": T0,
    }
    fields.update(overrides)
    return LatencyModelSpec(**fields)


def request_record(request_id: str = "req-1", **overrides: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "state": RequestState.DECODING,
        "prefill_worker": "prefill-0",
        "decode_worker": "multiplex-0",
        "num_prompt_tokens": 12,
        "num_output_tokens": 3,
        "timings": Timings(arrival=T0, dispatched=T0 + 0.01, first_token=T0 + 0.2),
        "updated_at": T0 + 0.3,
    }
    fields.update(overrides)
    return RequestRecord(**fields)


EXAMPLES: list[Message] = [
    generate_request(),
    generate_request(request_id="req-2", prompt=None, prompt_token_ids=[1, 15043, 3186], slo=None),
    CancelRequest(request_id="req-1", reason="client went away"),
    Dispatch(request=generate_request(), prefill_worker="prefill-0", decode_worker="multiplex-1", ttft_deadline=T0 + 0.5, dispatched_at=T0 + 0.01),
    KvHandoff(
        handoff_id="h-1",
        request=generate_request(),
        prompt_token_ids=[1, 2, 3, 4],
        first_token_id=42,
        first_token_time=T0 + 0.2,
        source_worker="prefill-0",
        transport=KvTransport.HOST,
        handle=b"/tropical-kv-h-1",
        layout=KvLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, num_tokens=4, dtype="float32"),
        nbytes=4 * 2 * 2 * 2 * 64 * 4,
        lease_expires_at=T0 + 30,
    ),
    KvAck(handoff_id="h-1", request_id="req-1", receiver="multiplex-1"),
    KvAck(handoff_id="h-2", request_id="req-2", receiver="multiplex-1", ok=False, error="lease expired"),
    TokenChunk(request_id="req-1", index=1, token_ids=[17, 99, 4], text=" the design", emitted_at=T0 + 0.3),
    RequestFinished(
        request_id="req-1",
        finish_reason=FinishReason.LENGTH,
        num_prompt_tokens=4,
        num_output_tokens=128,
        timings=Timings(arrival=T0, dispatched=T0 + 0.01, prefill_start=T0 + 0.02, first_token=T0 + 0.2, kv_transferred=T0 + 0.21, finished=T0 + 9),
    ),
    ErrorReply(request_id=None, code=ErrorCode.MALFORMED, message="not a msgpack message"),
    worker_status(),
    latency_model(),
    request_record(),
]
