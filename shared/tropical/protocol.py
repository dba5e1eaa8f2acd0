"""The wire protocol: typed messages, msgpack-encoded, validated on the way in.

Every message is a map with two envelope fields, ``v`` (the schema version) and
``type`` (which message it is), beside its own fields. Any msgpack library can
read and write it; nothing here is Python-specific and nothing is pickled.
Decoding checks the size, the version and the type before the shape, so a
sender learns the most useful reason its message was refused.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Final, Literal

import msgspec

SCHEMA_VERSION: Final = 1
DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
QueueName = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Timestamp = Annotated[float, msgspec.Meta(ge=0)]  # Unix time, seconds


class ErrorCode(enum.StrEnum):
    MALFORMED = "malformed"  # not msgpack, or not a map with `v` and `type`
    INVALID = "invalid"  # a known message whose fields break the schema
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    TOO_LARGE = "too_large"
    UNEXPECTED = "unexpected"  # a valid message sent to a queue that does not take it
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    KV_TRANSFER_FAILED = "kv_transfer_failed"
    WORKER_LOST = "worker_lost"  # the worker serving it stopped heartbeating after the request had started (the client resumes it)
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A message that cannot be accepted; ``code`` travels back in an ErrorReply."""

    code: ErrorCode = ErrorCode.MALFORMED


class MessageTooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE


class MalformedMessage(ProtocolError):
    code = ErrorCode.MALFORMED


class UnsupportedVersion(ProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION


class UnknownMessageType(ProtocolError):
    code = ErrorCode.UNKNOWN_TYPE


class InvalidMessage(ProtocolError):
    code = ErrorCode.INVALID


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """A plain value nested inside messages."""


class Message(Record, tag_field="type", kw_only=True, frozen=True):
    """Base of every top-level message; `v` is the schema version it was written in."""

    v: int = SCHEMA_VERSION


# --- requests -----------------------------------------------------------------


class SamplingParams(Record, kw_only=True, frozen=True):
    temperature: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0  # 0 means greedy
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    top_k: Count = 0  # 0 means no top-k cut
    seed: int | None = None
    stop_token_ids: list[TokenId] = []
    ignore_eos: bool = False  # benchmarks force the full output length


class Slo(Record, kw_only=True, frozen=True):
    ttft_ms: Positive
    tpot_ms: Positive


class GenerateRequest(Message, tag="generate", kw_only=True, frozen=True):
    """A client's request; tokens and the end of the request go to `reply_to`."""

    request_id: Id
    prompt: str | None = None
    prompt_token_ids: list[TokenId] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 256
    sampling: SamplingParams = SamplingParams()
    slo: Slo | None = None  # None: the deployment's default SLO
    arrival_time: Timestamp
    reply_to: QueueName
    # the answer's tokens already delivered (a request resumed after its worker was lost): it continues after them, its
    # prompt being prompt + these and its output positions starting at their count; `max_tokens` still counts the whole answer
    generated_token_ids: list[TokenId] = []

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of `prompt` and `prompt_token_ids`")
        if not (self.prompt or self.prompt_token_ids):
            raise ValueError("the prompt is empty")


class CancelRequest(Message, tag="cancel", kw_only=True, frozen=True):
    request_id: Id
    reason: str = ""
    quiet: bool = False  # the client has its answer from elsewhere (the router placed it again, or failed it): stop without a reply


class Dispatch(Message, tag="dispatch", kw_only=True, frozen=True):
    """The router's placement: where the prefill runs and where the decode continues."""

    request: GenerateRequest
    prefill_worker: Id
    decode_worker: Id  # equal to prefill_worker for a multiplexed prefill
    ttft_deadline: Timestamp
    dispatched_at: Timestamp
    routed_at: Timestamp | None = None  # when the router took the request off the queue
    resent: bool = False  # sent again by a router that took over from the one that recorded it: taken only if never had


# --- KV handoff -----------------------------------------------------------------


class KvTransport(enum.StrEnum):
    HOST = "host"  # shared memory on one host
    REDIS = "redis"
    CUDA_IPC = "cuda_ipc"
    NCCL = "nccl"


class KvLayout(Record, kw_only=True, frozen=True):
    num_layers: Annotated[int, msgspec.Meta(ge=1)]
    num_kv_heads: Annotated[int, msgspec.Meta(ge=1)]
    head_dim: Annotated[int, msgspec.Meta(ge=1)]
    block_size: Annotated[int, msgspec.Meta(ge=1)]
    num_tokens: Annotated[int, msgspec.Meta(ge=1)]
    dtype: Literal["float32", "float16", "bfloat16"]


class KvHandoff(Message, tag="kv_handoff", kw_only=True, frozen=True):
    """Where a finished prefill's KV cache waits; the receiver pulls it and acks."""

    handoff_id: Id
    request: GenerateRequest
    prompt_token_ids: list[TokenId]
    first_token_id: TokenId  # the token the prefill sampled: the answer's next after `request.generated_token_ids`
    first_token_time: Timestamp
    source_worker: Id
    transport: KvTransport
    handle: bytes  # transport-specific: a shared-memory name, a Redis key, an IPC handle
    layout: KvLayout
    nbytes: Count
    lease_expires_at: Timestamp
    dispatched_at: Timestamp | None = None  # the request's milestones so far, for its `finished` timings
    prefill_start: Timestamp | None = None
    routed_at: Timestamp | None = None
    taken_at: Timestamp | None = None


class KvAck(Message, tag="kv_ack", kw_only=True, frozen=True):
    """Frees the sender's lease; `ok=False` tells it the pull failed."""

    handoff_id: Id
    request_id: Id
    receiver: Id
    ok: bool = True
    error: str = ""


# --- replies to the client ------------------------------------------------------


class TokenChunk(Message, tag="tokens", kw_only=True, frozen=True):
    """Several consecutive output tokens; `index` is the position of the first one."""

    request_id: Id
    index: Count
    token_ids: Annotated[list[TokenId], msgspec.Meta(min_length=1)]
    text: str = ""
    emitted_at: Timestamp


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


class Timings(Record, kw_only=True, frozen=True):
    """Milestones of one request (Unix seconds); None where it did not happen."""

    arrival: Timestamp
    dispatched: Timestamp | None = None
    prefill_start: Timestamp | None = None
    routed: Timestamp | None = None  # the router took it off the queue (arrival → routed: the queue's hop)
    taken: Timestamp | None = None  # its worker took the dispatch (dispatched → taken: the bus's hop)
    first_token: Timestamp | None = None
    kv_transferred: Timestamp | None = None
    finished: Timestamp | None = None


class RequestFinished(Message, tag="finished", kw_only=True, frozen=True):
    request_id: Id
    finish_reason: FinishReason
    num_prompt_tokens: Count
    num_output_tokens: Count
    timings: Timings


class ErrorReply(Message, tag="error", kw_only=True, frozen=True):
    request_id: str | None = None  # None when the refused message could not be read
    code: ErrorCode
    message: str


# --- cluster state ----------------------------------------------------------------


class WorkerRole(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    MULTIPLEX = "multiplex"
    COLOCATED = "colocated"


class DecodeLoad(Record, kw_only=True, frozen=True):
    """One running decode as the router sees it: enough to compute its banked slack."""

    request_id: Id
    context_tokens: Count
    tpot_slo_ms: Positive
    slack_s: float  # banked TPOT budget: may be negative when the decode is behind


class RequestSnapshot(Record, kw_only=True, frozen=True):
    """A request held by a worker, as much as a scheduling policy may know of it (never its output length).

    Times are on the deployment's clock (Unix seconds live); `prefilled` counts
    the tokens of prompt + generated whose KV exists.
    """

    request_id: Id
    arrival: float
    prompt_tokens: Count
    ttft_slo_s: Positive
    tpot_slo_s: Positive
    prefilled: Count = 0
    generated: Count = 0
    first_token: float | None = None


class BatchSnapshot(Record, kw_only=True, frozen=True):
    """A running decode batch in the few numbers placement and admission use (deadlines may be inf)."""

    size: Count = 0
    context_tokens: Count = 0
    prompt_tokens: Count = 0
    next_token_deadline: float = math.inf
    reserve_deadline: float = math.inf
    tpot_slo_s: float = math.inf
    on_time_deadline: float = math.inf


class ChunkInStep(Record, kw_only=True, frozen=True):
    request_id: Id
    tokens: Annotated[int, msgspec.Meta(ge=1)]


class WorkerStatus(Message, tag="worker_status", kw_only=True, frozen=True):
    """A worker's heartbeat: everything the router's view of it needs (see `tropical.core.status`).

    The first fields are the summary any dashboard reads; the rest carry the
    worker's queues and the step in progress, so the router decides on the
    same view a worker's own planner sees.
    """

    worker_id: Id
    role: WorkerRole
    queue: QueueName
    sent_at: Timestamp
    kv_capacity_tokens: Count
    kv_free_tokens: Count
    queued_prefills: Count = 0
    queued_prefill_tokens: Count = 0  # Σ prompt tokens of `prefills` not computed yet
    decodes: list[DecodeLoad] = []
    busy_until: Timestamp = 0.0  # predicted end of the work already accepted
    draining: bool = False
    busy: bool = False  # a step is in progress
    step_begin: float = 0.0  # start of the step in progress (or of the last one)
    step_end: float = 0.0  # its predicted end
    placed_since_step: Count = 0
    prefills: list[RequestSnapshot] = []  # prompts placed here, not fully prefilled; started ones first
    batch: BatchSnapshot = BatchSnapshot()
    waiting: list[RequestSnapshot] = []  # decodes resident here, outside the running batch
    incoming: list[RequestSnapshot] = []  # decodes handed here whose KV has not arrived
    decode_load: Count = 0  # Σ prompt tokens of the batch, waiting and incoming
    in_step: list[ChunkInStep] = []  # prompt chunks the step in progress computes
    accepted: list[Id] = []  # requests taken within about the last second (confirms the router's dispatches even if it missed a status)


class PrefillCoefficients(Record, kw_only=True, frozen=True):
    """T_pre(L) = c0·L² + c1·L + c2, seconds."""

    c0: float
    c1: float
    c2: float


class DecodeCoefficients(Record, kw_only=True, frozen=True):
    """T_dec = d0 + d1·B + d2·Σctx, seconds."""

    d0: float
    d1: float
    d2: float


class LatencyModelSpec(Message, tag="latency_model", kw_only=True, frozen=True):
    """Fitted step-time model of one model on one hardware setup."""

    model: Id
    hardware: Id
    tensor_parallel: Annotated[int, msgspec.Meta(ge=1)] = 1
    prefill: PrefillCoefficients
    decode: DecodeCoefficients
    prefill_residual: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # relative spread: std of actual/predicted − 1
    decode_residual: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    correction: Positive = 1.0  # online actual/predicted factor
    samples: Count = 0
    fitted_at: Timestamp

    @property
    def key(self) -> str:
        return f"{self.model}@{self.hardware}/tp{self.tensor_parallel}"


class RequestState(enum.StrEnum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RequestRecord(Message, tag="request_record", kw_only=True, frozen=True):
    """What happened to one request so far; kept in the store, not sent to clients."""

    request_id: Id
    state: RequestState
    prefill_worker: str | None = None
    decode_worker: str | None = None
    num_prompt_tokens: Count = 0
    num_output_tokens: Count = 0
    timings: Timings
    error: ErrorCode | None = None
    updated_at: Timestamp


AnyMessage = (
    GenerateRequest
    | CancelRequest
    | Dispatch
    | KvHandoff
    | KvAck
    | TokenChunk
    | RequestFinished
    | ErrorReply
    | WorkerStatus
    | LatencyModelSpec
    | RequestRecord
)
MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.__struct_config__.tag: cls for cls in AnyMessage.__args__  # type: ignore[attr-defined]
}


class _Envelope(msgspec.Struct):
    v: int
    type: str


_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_message_decoder = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Bytes from the wire to a validated message, or a ProtocolError that says why not."""
    if len(data) > max_bytes:
        raise MessageTooLarge(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        envelope = _envelope_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise MalformedMessage(f"not a msgpack message: {exc}") from None
    except msgspec.ValidationError as exc:
        raise MalformedMessage(f"not a message envelope (a map with `v` and `type`): {exc}") from None
    if envelope.v != SCHEMA_VERSION:
        raise UnsupportedVersion(f"schema version {envelope.v} is not supported (this side speaks {SCHEMA_VERSION})")
    if envelope.type not in MESSAGE_TYPES:
        raise UnknownMessageType(f"unknown message type {envelope.type[:64]!r}")
    try:
        return _message_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidMessage(f"invalid {envelope.type!r} message: {exc}") from None


def request_id_of(message: Message) -> str | None:
    """The request a message is about, for error replies and logs."""
    if isinstance(message, (Dispatch, KvHandoff)):
        return message.request.request_id
    return getattr(message, "request_id", None)
