"""Scheduling policies: pure decisions over plain records, shared by the live services and the simulator."""

from tropical.policies.admission_rule import AdmissionRule, under_admission
from tropical.policies.batching import (
    Admission,
    AllowedStep,
    DecodeBatcher,
    Preemption,
    PrefillMode,
    max_chunk,
)
from tropical.policies.prefill_queue import (
    Job,
    PrefillOrder,
    PrefillPlanner,
    moore_hodgson,
    urgency_order,
)
from tropical.policies.records import (
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
from tropical.policies.routing import (
    LeastLoadedRouter,
    MultiplexingToggle,
    PlacementRule,
    UrgencyRouter,
    least_decode_load,
)
from tropical.policies.serving import POLICY_NAMES, ServingPolicy, make_policy

__all__ = [
    "IDLE",
    "POLICY_NAMES",
    "Admission",
    "AdmissionRule",
    "AllowedStep",
    "BatchSummary",
    "DecodeBatcher",
    "Job",
    "LeastLoadedRouter",
    "MultiplexingToggle",
    "Placement",
    "PlacementRule",
    "Preemption",
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
    "under_admission",
    "urgency_order",
]
