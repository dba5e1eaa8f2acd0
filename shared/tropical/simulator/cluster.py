"""What is simulated: the cluster, the requests offered to it, and what happened to each."""

from __future__ import annotations

from dataclasses import dataclass

from tropical.latency.model import LatencyModel
from tropical.metrics import RequestOutcome
from tropical.policies.records import Role


@dataclass(frozen=True)
class ClusterSpec:
    """Workers of one model on one GPU type: roles, KV capacity and the link between them.

    `kv_bytes_per_token` is the whole model's (every layer, K and V, all TP
    shards); `link_bandwidth` is what one worker-to-worker KV transfer gets
    (each TP rank sends its own shard, so it is TP times one GPU pair's).
    """

    roles: tuple[Role, ...]
    model: LatencyModel
    kv_capacity: int  # KV tokens one worker holds
    kv_bytes_per_token: int
    link_bandwidth: float  # bytes/s
    link_latency: float = 0.001  # s, per transfer
    tensor_parallel: int = 1  # GPUs per worker

    def __post_init__(self) -> None:
        if not self.roles:
            raise ValueError("a cluster needs at least one worker")
        if self.kv_capacity <= 0 or self.link_bandwidth <= 0:
            raise ValueError("KV capacity and link bandwidth must be positive")
        kinds = set(self.roles)
        if Role.COLOCATED in kinds and len(kinds) > 1:
            raise ValueError("colocated workers do not mix with prefill/decode roles")
        if Role.DECODE in kinds and Role.PREFILL not in kinds:
            raise ValueError("decode workers need prefill workers to feed them")
        if Role.PREFILL in kinds and not any(role.decodes for role in kinds):
            raise ValueError("prefill workers need a decoding worker to hand their requests to")

    @property
    def gpus(self) -> int:
        return len(self.roles) * self.tensor_parallel

    def transfer_time(self, tokens: int) -> float:
        return self.link_latency + tokens * self.kv_bytes_per_token / self.link_bandwidth


@dataclass(frozen=True)
class SimRequest:
    """A request offered to the simulated cluster, with its own SLOs."""

    arrival: float
    prompt_tokens: int
    output_tokens: int
    ttft_slo: float
    tpot_slo: float


@dataclass(frozen=True)
class RequestTimeline:
    """Everything the simulator knows about one request, in simulated seconds."""

    id: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    ttft_slo: float
    tpot_slo: float
    first_token: float | None
    finish: float | None
    placed: float | None  # when the router placed its prompt
    prefill_start: float | None  # first prompt chunk began
    prefill_worker: int | None
    decode_worker: int | None
    kv_ready: float | None  # KV resident on the decoding worker (prefill end when prefilled there)
    preemptions: int = 0
    dropped: bool = False
    infeasible: bool = False
    generated: int = 0  # output tokens produced: all of them once finished, fewer if it was given up
    prefilled: int = 0  # tokens whose KV it had computed when it ended (the prompt, unless given up part-way)

    def outcome(self) -> RequestOutcome:
        decode_start = self.kv_ready if self.kv_ready is not None else self.first_token
        return RequestOutcome(
            request_id=str(self.id),
            arrival=self.arrival,
            first_token=self.first_token,
            finish=self.finish,
            output_tokens=self.output_tokens,
            ttft_slo=self.ttft_slo,
            tpot_slo=self.tpot_slo,
            dropped=self.dropped,
            infeasible=self.infeasible,
            prompt_tokens=self.prompt_tokens,
            queue_s=_gap(self.arrival, self.prefill_start),
            prefill_s=_gap(self.prefill_start, self.first_token),
            kv_transfer_s=_gap(self.first_token, self.kv_ready),
            decode_s=_gap(decode_start, self.finish),
        )


def _gap(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start
