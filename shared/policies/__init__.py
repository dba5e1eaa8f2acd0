"""Scheduling policies: pure decisions over plain records, shared by the live services and the simulator."""

from shared.policies.batching import (
    Admission,
    AllowedStep,
    DecodeBatcher,
    PrefillMode,
    max_chunk,
)
from shared.policies.prefill_queue import (
    Job,
    PrefillOrder,
    PrefillPlanner,
    moore_hodgson,
    urgency_order,
)
from shared.policies.records import (
    IDLE,
    BatchSummary,
    Placement,
    RequestId,
    RequestView,
    Role,
    RouterDecision,
    StepPlan,
    WorkerView,
)
from shared.policies.routing import (
    LeastLoadedRouter,
    MultiplexingToggle,
    UrgencyRouter,
    least_decode_load,
)
from shared.policies.serving import POLICY_NAMES, ServingPolicy, make_policy

__all__ = [
    "IDLE",
    "POLICY_NAMES",
    "Admission",
    "AllowedStep",
    "BatchSummary",
    "DecodeBatcher",
    "Job",
    "LeastLoadedRouter",
    "MultiplexingToggle",
    "Placement",
    "PrefillMode",
    "PrefillOrder",
    "PrefillPlanner",
    "RequestId",
    "RequestView",
    "Role",
    "RouterDecision",
    "ServingPolicy",
    "StepPlan",
    "UrgencyRouter",
    "WorkerView",
    "least_decode_load",
    "make_policy",
    "max_chunk",
    "moore_hodgson",
    "urgency_order",
]
