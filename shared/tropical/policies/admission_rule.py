"""Admission as its own axis: which requests a policy refuses or gives up on, apart from how it schedules the rest.

Dropping a request is admission control, not scheduling: a policy that
refuses what it predicts it would serve late meets more SLOs among the rest,
whatever its scheduling is worth. To compare schedulers on equal terms, every
policy runs under one of three rules:

- `own`: each policy's own rules (only `unified` refuses and abandons);
- `none`: nothing is refused or abandoned by any policy;
- `hopeless`: one shared rule for every policy: a prompt is refused at the
  router, and given up on at a worker, once it could not meet its TTFT even
  if prefilled alone from now (`now` + isolated prefill of the rest >
  deadline). Decodes are never given up on.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tropical.latency.model import LatencyModel
from tropical.policies.prefill_queue import unattainable
from tropical.policies.records import RequestView, RouterDecision, WorkerView

if TYPE_CHECKING:
    from tropical.policies.serving import Router, ServingPolicy

ROUTER_REFUSALS = ("drop_hopeless", "reject_unattainable")  # a router's own refusals, where it has them


class AdmissionRule(enum.StrEnum):
    OWN = "own"
    NONE = "none"
    HOPELESS = "hopeless"


@dataclass(frozen=True)
class RefusingHopeless:
    """The shared rule at the router: prompts that could not meet their TTFT even alone are refused, and the policy's
    own router places the rest."""

    router: Router
    model: LatencyModel

    def place(self, queue: Sequence[RequestView], workers: Sequence[WorkerView], now: float) -> RouterDecision:
        refused = unattainable(queue, self.model, now)
        if not refused:
            return self.router.place(queue, workers, now)
        gone = set(refused)
        decision = self.router.place([r for r in queue if r.id not in gone], workers, now)
        return replace(decision, drops=(*refused, *decision.drops))


def under_admission(policy: ServingPolicy, rule: AdmissionRule) -> ServingPolicy:
    """The policy with its own refusals and abandonments replaced by `rule`'s (unchanged for `own`)."""
    from tropical.policies.serving import with_options

    if rule is AdmissionRule.OWN:
        return policy
    router_fields = getattr(policy.router, "__dataclass_fields__", {})
    hopeless = rule is AdmissionRule.HOPELESS
    options: dict[str, object] = {f"router.{field}": False for field in ROUTER_REFUSALS if field in router_fields}
    options.update({"prefill.abandon_hopeless": hopeless, "batcher.abandon_hopeless": hopeless, "batcher.abandon_after": None})
    ruled = with_options(policy, options)
    if hopeless:
        ruled = replace(ruled, router=RefusingHopeless(ruled.router, policy.prefill.model))
    return ruled
