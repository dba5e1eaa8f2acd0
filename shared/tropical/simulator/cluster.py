"""What is simulated: the cluster, the requests offered to it, and what happened to each."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from tropical.latency.model import LatencyModel
from tropical.metrics import RequestOutcome
from tropical.policies.records import Role

A100_NVLINK_BYTES_PER_S = 150e9  # per GPU pair: half of NVLink 3's 300 GB/s per direction, what bulk copies see
PCIE4_BYTES_PER_S = 25e9  # per GPU to host memory: what a PCIe 4.0 x16 copy sees of its 32 GB/s
KV_SHAPES = {  # layers, KV width (KV heads × head dim) of the models the published profiles cover
    "opt-13b": (40, 5120),
    "opt-66b": (64, 9216),
    "opt-175b": (96, 12288),
    "llama-2-7b": (32, 4096),
    "llama-2-70b": (80, 8 * 128),
}


HIDDEN = {"opt-13b": 5120, "opt-66b": 9216, "opt-175b": 12288, "llama-2-7b": 4096, "llama-2-70b": 8192}  # activation width


def kv_bytes_per_token(layers: int, kv_width: int) -> int:
    """K and V, fp16, every layer: 2 · layers · (KV heads · head dim) · 2 bytes."""
    return 2 * layers * kv_width * 2


def model_kv_bytes(model: str) -> int:
    """`kv_bytes_per_token` of a model in `KV_SHAPES`; ValueError for one whose shape is not known."""
    if model not in KV_SHAPES:
        raise ValueError(f"{model}'s shape is not known: give its KV bytes per token")
    return kv_bytes_per_token(*KV_SHAPES[model])


@dataclass(frozen=True)
class Link:
    """How KV moves between two workers: bytes/s for each GPU pair (a transfer gets it times the narrower side's
    TP degree, each rank sending its own shard) and a fixed latency per transfer."""

    pair_bandwidth: float
    latency: float

    def __post_init__(self) -> None:
        if self.pair_bandwidth <= 0 or self.latency < 0:
            raise ValueError("a link's bandwidth must be positive, its latency not negative")


@dataclass(frozen=True)
class WorkerGroup:
    """Instances alike in role, model profile, parallelism and KV capacity: one line of a deployment.

    An instance split into `pipeline_parallel` stages is simulated as that many
    lanes, one per micro-batch in flight, as vLLM runs a pipeline (one
    scheduler per virtual engine, each with its share of the KV blocks): while
    one lane's micro-batch is in one stage, the others' are in the others, so
    the lanes step side by side, each step a whole pass through the stages
    (`model`: the profile's step plus the stage-to-stage sends,
    `LatencyModel.with_stage_hops`). A lone prompt takes the whole pass; P
    prompts on P lanes take it together. Unequal lanes leave a bubble: a
    stage waits for a slower lane's micro-batch, so a lane's step is at least
    as long as the longest step its peers have in progress
    (`WorkerState.pipeline_pace`; a step already under way is not stretched
    by a heavier one that starts after it). Not modelled: lanes lending each
    other KV.
    """

    role: Role
    count: int
    model: LatencyModel  # one lane's step: a micro-batch's whole pass through the instance
    kv_capacity: int  # KV tokens one instance of the group holds (its lanes share it evenly)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    node: str = ""  # where its instances sit: KV between groups on different nodes takes the slower link

    def __post_init__(self) -> None:
        if self.count < 1 or self.kv_capacity <= 0 or self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ValueError(f"a {self.role} group needs at least one worker, a positive KV capacity and TP and PP degrees")
        if self.kv_capacity < self.pipeline_parallel:
            raise ValueError(f"a {self.role} group's KV capacity cannot be shared by {self.pipeline_parallel} pipeline lanes")

    @property
    def lanes(self) -> int:
        """Workers the simulator runs for this group: one per instance and micro-batch in flight."""
        return self.count * self.pipeline_parallel

    @property
    def lane_capacity(self) -> int:
        return self.kv_capacity // self.pipeline_parallel

    @property
    def gpus(self) -> int:
        return self.count * self.tensor_parallel * self.pipeline_parallel


@dataclass(frozen=True)
class ClusterSpec:
    """Workers of one model: roles, step times, KV capacity and the link between them.

    One latency model and KV capacity for every worker, or, from worker groups
    (`of_groups`), one per worker: a DistServe deployment of prefill at TP 2
    and decode at TP 1 prefills with the TP-2 times and decodes with the TP-1
    ones, each with its own KV. `model` is then the first group's: the one a
    policy predicts with.

    `kv_bytes_per_token` is the whole model's (every layer, K and V, all TP
    shards); `link_bandwidth` is what one worker-to-worker KV transfer gets
    (each TP rank sends its own shard, so it is TP times one GPU pair's).
    """

    roles: tuple[Role, ...]
    model: LatencyModel
    kv_capacity: int  # KV tokens one worker holds (a lane of the first group, with groups)
    kv_bytes_per_token: int
    link_bandwidth: float  # bytes/s
    link_latency: float = 0.001  # s, per transfer
    tensor_parallel: int = 1  # GPUs per worker (the first group's, with groups)
    groups: tuple[WorkerGroup, ...] = ()  # when given, what each worker is; `roles` lists them in order
    links: tuple[Link, Link] | None = None  # with groups: (within a node, between nodes), per GPU pair
    host_bandwidth: float = PCIE4_BYTES_PER_S  # bytes/s per GPU to its host's memory, where swapped KV goes

    @classmethod
    def of_groups(cls, groups: Sequence[WorkerGroup], *, kv_bytes_per_token: int, link: Link, internode: Link | None = None,
                  host_bandwidth: float = PCIE4_BYTES_PER_S) -> ClusterSpec:
        """Worker groups joined by `link` within a node and `internode` between nodes (by default `link`)."""
        if not groups:
            raise ValueError("a cluster needs at least one worker group")
        roles = tuple(group.role for group in groups for _ in range(group.lanes))
        first = groups[0]
        narrowest = min(g.tensor_parallel for g in groups)
        return cls(roles, first.model, first.lane_capacity, kv_bytes_per_token, link.pair_bandwidth * narrowest, link.latency,
                   first.tensor_parallel, tuple(groups), (link, internode or link), host_bandwidth)

    def __post_init__(self) -> None:
        if not self.roles:
            raise ValueError("a cluster needs at least one worker")
        if self.kv_capacity <= 0 or self.link_bandwidth <= 0 or self.host_bandwidth <= 0:
            raise ValueError("KV capacity, link and host bandwidth must be positive")
        if self.groups and tuple(g.role for g in self._lane_groups) != self.roles:
            raise ValueError("the worker groups do not add up to the roles listed")
        kinds = set(self.roles)
        if Role.COLOCATED in kinds and len(kinds) > 1:
            raise ValueError("colocated workers do not mix with prefill/decode roles")
        if Role.DECODE in kinds and Role.PREFILL not in kinds:
            raise ValueError("decode workers need prefill workers to feed them")
        if Role.PREFILL in kinds and not any(role.decodes for role in kinds):
            raise ValueError("prefill workers need a decoding worker to hand their requests to")

    @property
    def models(self) -> tuple[LatencyModel, ...]:
        """Each worker's step times."""
        if not self.groups:
            return (self.model,) * len(self.roles)
        return tuple(g.model for g in self._lane_groups)

    @property
    def kv_capacities(self) -> tuple[int, ...]:
        if not self.groups:
            return (self.kv_capacity,) * len(self.roles)
        return tuple(g.lane_capacity for g in self._lane_groups)

    @property
    def instances(self) -> tuple[int, ...]:
        """Each worker's instance: the lanes of a pipelined instance share one (`WorkerGroup`)."""
        if not self.groups:
            return tuple(range(len(self.roles)))
        firsts = itertools.accumulate((g.count for g in self.groups), initial=0)  # each group's first instance id
        return tuple(first + lane // g.pipeline_parallel for g, first in zip(self.groups, firsts) for lane in range(g.lanes))

    @property
    def swap_per_token(self) -> tuple[float, ...]:
        """Each worker's seconds to copy one token's KV to or from host memory (every GPU of it copies its shard)."""
        if not self.groups:
            return (self.kv_bytes_per_token / (self.host_bandwidth * self.tensor_parallel),) * len(self.roles)
        # a lane holds its stages' share of every token's KV, copied by its stages' GPUs at once
        return tuple(self.kv_bytes_per_token / (self.host_bandwidth * g.tensor_parallel * g.pipeline_parallel) for g in self._lane_groups)

    @property
    def gpus(self) -> int:
        if not self.groups:
            return len(self.roles) * self.tensor_parallel
        return sum(g.gpus for g in self.groups)

    def transfer_time(self, tokens: int, source: int | None = None, target: int | None = None) -> float:
        """Seconds to move `tokens` tokens of KV from worker `source` to worker `target` (the cluster's one link
        when either is not given or the cluster has no groups)."""
        if self.links is None or source is None or target is None:
            return self.link_latency + tokens * self.kv_bytes_per_token / self.link_bandwidth
        lanes = self._lane_groups
        a, b = lanes[source], lanes[target]
        link = self.links[0] if a.node == b.node else self.links[1]
        return link.latency + tokens * self.kv_bytes_per_token / (link.pair_bandwidth * min(a.tensor_parallel, b.tensor_parallel))

    @cached_property
    def _lane_groups(self) -> tuple[WorkerGroup, ...]:
        """Each worker's group: a group gives one worker per instance and pipeline stage."""
        return tuple(g for g in self.groups for _ in range(g.lanes))


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
