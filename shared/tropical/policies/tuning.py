"""Each policy's faithful configurations: the knobs its authors tune for a deployment, and the values they would try.

A comparison against a baseline run below its own tuning measures the tuning,
not the idea. So a goodput search runs every tuning listed here (as it runs
every prefill:decode split) and keeps the best; the first one is what a single
run (`tropical sim`) uses. Every tuning of a policy sets the same options, so
none leaks into another.

- vLLM (v0, prefill-first): `max_num_batched_tokens`, the prompt tokens one
  prefill step may batch: its default 8192, and 2048 to 16384; and where the
  router places prompts: by queued prefill tokens, then the earliest end of
  the step in progress (a load-aware router), or by fewest unfinished tokens
  (INFaaS, as Tropical's paper ran its baselines). Neither wins everywhere.
- Sarathi-Serve: the token budget of a stall-free step. The paper derives it
  from the TPOT SLO (the largest budget whose step fits one TPOT); a searched
  budget is the check that the derivation does not leave goodput behind;
  placement as for vLLM.
- Kairos: prefill batches of one prompt (urgency order then decides every
  start) or up to 4096 tokens, and a decode step allowed one TPOT or the banked
  budget (papers.md §2.4).
- DistServe, Tropical and `unified` run as built: their configurations are
  already their papers' (or, for `unified`, its own).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from tropical.latency.model import LatencyModel
from tropical.policies.batching import AllowedStep
from tropical.policies.routing import PlacementRule
from tropical.policies.serving import DISAGGREGATED_PREFILL_BATCH, SARATHI_TOKEN_BUDGET, VLLM_TOKEN_BUDGET

BUDGET_GRANULE = 128  # token budgets are whole tiles of this many tokens (Sarathi-Serve's are multiples of 128)
VLLM_BATCHED_TOKENS = (VLLM_TOKEN_BUDGET, 2048, 4096, 16384)  # the default first
SARATHI_SEARCHED_BUDGETS = (SARATHI_TOKEN_BUDGET, 2048, 8192)  # besides the one derived from the TPOT SLO


@dataclass(frozen=True)
class Tuning:
    label: str
    options: Mapping[str, Any] = field(default_factory=dict)  # make_policy options


DEFAULT = Tuning("as built")

Axis = tuple[Tuning, ...]  # the values of one knob, the default first; every value sets the same options


def sarathi_token_budget(model: LatencyModel, tpot_slo: float) -> int:
    """The largest budget whose step, one decode plus a prompt chunk of the rest, fits one TPOT (Sarathi-Serve §4.3).

    Sarathi-Serve profiles the step time against the budget and takes the
    largest budget under the TBT SLO; with a mean TPOT SLO the step bound is
    the same. Whole granules, at least one.
    """
    budget = BUDGET_GRANULE
    while model.step_time(1, 0, [(0, budget + BUDGET_GRANULE - 1)]) <= tpot_slo:
        budget += BUDGET_GRANULE
    return budget


PLACEMENT: Axis = tuple(
    Tuning(f"{rule.value} placement", {"router.rule": rule}) for rule in (PlacementRule.LOAD_AWARE, PlacementRule.INFAAS)
)


def axes(name: str, model: LatencyModel, tpot_slo: float) -> tuple[Axis, ...]:
    """The knobs of policy `name` a deployment at this TPOT SLO would tune, each with the values it would try."""
    if name == "vllm":
        return tuple(Tuning(f"max_num_batched_tokens {n}", {"token_budget": n}) for n in VLLM_BATCHED_TOKENS), PLACEMENT
    if name == "sarathi":
        derived = sarathi_token_budget(model, tpot_slo)
        searched = tuple(n for n in SARATHI_SEARCHED_BUDGETS if n != derived)
        budgets = (Tuning(f"token budget {derived} (from the TPOT SLO)", {"token_budget": derived}),
                   *(Tuning(f"token budget {n} (searched)", {"token_budget": n}) for n in searched))
        return budgets, PLACEMENT
    if name == "kairos":
        batches = tuple(
            Tuning(label, {"router.max_batch": batch, "prefill.max_batch": batch})
            for batch, label in ((1, "one prompt per prefill step"), (256, f"{DISAGGREGATED_PREFILL_BATCH}-token prefill batches"))
        )
        steps = (Tuning("banked TPOT budget", {"allowed_step": AllowedStep.BANKED}), Tuning("per-step TPOT", {"allowed_step": AllowedStep.TPOT}))
        return batches, steps
    return ()


def tunings(name: str, model: LatencyModel, tpot_slo: float, fixed: Collection[str] = ()) -> tuple[Tuning, ...]:
    """Every combination of policy `name`'s knobs, the default first; a knob whose options are all `fixed` (given by
    the caller) is left out, so the caller's value is not searched over nor named."""
    free = [axis for axis in axes(name, model, tpot_slo) if not set(axis[0].options) <= set(fixed)]
    if not free:
        return (DEFAULT,)
    return tuple(
        Tuning(", ".join(value.label for value in combination), {key: v for value in combination for key, v in value.options.items()})
        for combination in itertools.product(*free)
    )
