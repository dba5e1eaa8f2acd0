"""The policy a live service runs: `make_policy`'s, with the settings' admission margins where the policy has them.

A live first token comes later than the latency model says: a dispatch takes
time to reach its worker, steps overrun a little, and the token travels back.
`unified`'s router admits a prompt only with `admission_headroom_ms` to spare
before its TTFT deadline and counts `dispatch_lead_ms` before a placement
reaches a worker; its decoding workers keep the same headroom when they fill
a step that completes a prompt (`DecodeBatcher.finish_margin`), so that a
prompt admitted with room keeps it. The router and every worker build the
policy here, so its look-ahead plans what the workers will do.
"""

from __future__ import annotations

from tropical.latency.model import LatencyModel
from tropical.policies.serving import ServingPolicy, make_policy, with_options
from tropical.settings import Settings


def live_policy(name: str, model: LatencyModel, settings: Settings) -> ServingPolicy:
    """The named policy with the settings' margins where its router predicts first tokens (`unified`); otherwise `make_policy`'s."""
    policy = make_policy(name, model)
    fields = getattr(policy.router, "__dataclass_fields__", {})
    if "headroom" in fields and "dispatch_lead" in fields and (settings.admission_headroom_ms or settings.dispatch_lead_ms):
        headroom = settings.admission_headroom_ms / 1000.0
        policy = with_options(policy, {"headroom": headroom, "dispatch_lead": settings.dispatch_lead_ms / 1000.0, "finish_margin": headroom})
    return policy
