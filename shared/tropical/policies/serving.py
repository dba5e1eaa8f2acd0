"""A serving policy: a router, a prefill planner and a decode batcher, put together by name.

The four decision points a live deployment has, one method each:

- `place(queue, workers, now)`: the router's placement of waiting prompts;
- `plan_step(worker, now)`: any worker's next step (a prefill worker's order
  and batch; a decoding worker's admissions, decodes and prompt chunks);
- `route_decode(request, workers, now)`: where a request prefilled on a
  prefill worker decodes;
- `roles(workers, prefill_workers)`: how the cluster's workers are split.

Every named policy is a configuration of the same few pieces, never a copy.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from tropical.latency.model import LatencyModel
from tropical.policies.batching import Admission, AllowedStep, DecodeBatcher, PrefillMode
from tropical.policies.prefill_queue import PrefillOrder, PrefillPlanner
from tropical.policies.records import (
    RequestView,
    Role,
    RouterDecision,
    StepPlan,
    WorkerView,
)
from tropical.policies.routing import (
    LeastLoadedRouter,
    MultiplexingToggle,
    UrgencyRouter,
    least_decode_load,
)
from tropical.policies.unified import SlackAwareRouter


class Router(Protocol):
    def place(self, queue: Sequence[RequestView], workers: Sequence[WorkerView], now: float) -> RouterDecision: ...


DecodeRoute = Callable[[RequestView, Sequence[WorkerView], float], "int | None"]


@dataclass(frozen=True)
class ServingPolicy:
    name: str
    router: Router
    prefill: PrefillPlanner
    batcher: DecodeBatcher
    decode_role: Role  # COLOCATED for colocated policies
    decode_route: DecodeRoute = least_decode_load
    min_prefill_workers: int = 1  # 0: every worker may multiplex, no dedicated prefill worker needed
    clairvoyant: bool = False  # True only for variants that read true output lengths (reported apart)

    @property
    def model(self) -> LatencyModel:
        """The latency model the policy predicts with."""
        return self.prefill.model

    @property
    def disaggregated(self) -> bool:
        return self.decode_role is not Role.COLOCATED

    def roles(self, workers: int, prefill_workers: int | None = None) -> tuple[Role, ...]:
        """Colocated: every worker the same. Disaggregated: `prefill_workers` (default half) prefill, the rest decode."""
        if workers < 1:
            raise ValueError("a cluster needs at least one worker")
        if not self.disaggregated:
            return (Role.COLOCATED,) * workers
        low = self.min_prefill_workers
        if workers < low + 1:
            raise ValueError(f"{self.name} needs at least {low} prefill and one decoding worker")
        prefill = max(low, workers // 2) if prefill_workers is None else prefill_workers
        if not low <= prefill < workers:
            raise ValueError(f"{self.name}: prefill workers must be between {low} and {workers - 1}, got {prefill}")
        return (Role.PREFILL,) * prefill + (self.decode_role,) * (workers - prefill)

    def check_roles(self, roles: Sequence[Role]) -> None:
        """ValueError unless the policy runs on workers of these roles (a deployment file fixes them, not the policy)."""
        given = ", ".join(f"{sum(r is role for r in roles)} {role.value}" for role in dict.fromkeys(roles))
        if not self.disaggregated:
            if set(roles) != {Role.COLOCATED}:
                raise ValueError(f"{self.name} runs prompts and decodes on every worker (colocated), not on {given}")
            return
        prefill = sum(role is Role.PREFILL for role in roles)
        if set(roles) - {Role.PREFILL, self.decode_role} or self.decode_role not in roles or prefill < self.min_prefill_workers:
            raise ValueError(f"{self.name} runs on {self.decode_role.value} workers and at least {self.min_prefill_workers} prefill, not on {given}")

    def place(self, queue: Sequence[RequestView], workers: Sequence[WorkerView], now: float) -> RouterDecision:
        return self.router.place(queue, workers, now)

    def plan_step(self, worker: WorkerView, now: float) -> StepPlan:
        if worker.role is Role.PREFILL:
            return self.prefill.plan(worker, now)
        return self.batcher.plan(worker, now)

    def route_decode(self, request: RequestView, workers: Sequence[WorkerView], now: float) -> int | None:
        return self.decode_route(request, workers, now)


POLICY_NAMES = ("vllm", "sarathi", "distserve", "tropical", "kairos", "unified")

DISAGGREGATED_PREFILL_BATCH = 4096  # tokens a DistServe/Kairos prefill step batches (first prompt always runs)
SARATHI_TOKEN_BUDGET = 512  # vLLM's chunked-prefill default, Sarathi's strict-SLO budget
VLLM_TOKEN_BUDGET = 8192  # prompt tokens per prefill step; also Tropical's max_num_batched_tokens
UNIFIED_TOKEN_BUDGET = 16384  # a cap only: unified sizes its chunks from the allowed step
UNIFIED_MIN_CHUNK = 64
UNIFIED_ABANDON_AFTER = 60.0  # seconds a decode may fall behind its TPOT budget while it cannot join any batch


def make_policy(name: str, model: LatencyModel, **options: Any) -> ServingPolicy:
    """The named policy over `model`. `options` override fields of the policy or of one of its parts: `router.order`,
    `prefill.order`, `batcher.min_chunk`, or a bare name that only one part has (`with_options`)."""
    builders = {
        "vllm": _vllm,
        "sarathi": _sarathi,
        "distserve": _distserve,
        "tropical": _tropical,
        "kairos": _kairos,
        "unified": _unified,
    }
    if name not in builders:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    policy = builders[name](model)
    return with_options(policy, options) if options else policy


def _vllm(model: LatencyModel) -> ServingPolicy:
    return ServingPolicy(
        name="vllm",
        router=LeastLoadedRouter(Role.COLOCATED),
        prefill=PrefillPlanner(model),
        batcher=DecodeBatcher(model, prefill_mode=PrefillMode.FIRST, token_budget=VLLM_TOKEN_BUDGET),
        decode_role=Role.COLOCATED,
    )


def _sarathi(model: LatencyModel) -> ServingPolicy:
    return ServingPolicy(
        name="sarathi",
        router=LeastLoadedRouter(Role.COLOCATED),
        prefill=PrefillPlanner(model),
        batcher=DecodeBatcher(model, prefill_mode=PrefillMode.CHUNKED, token_budget=SARATHI_TOKEN_BUDGET),
        decode_role=Role.COLOCATED,
    )


def _distserve(model: LatencyModel) -> ServingPolicy:
    return ServingPolicy(
        name="distserve",
        router=LeastLoadedRouter(Role.PREFILL),
        prefill=PrefillPlanner(model, order=PrefillOrder.FCFS, batch_tokens=DISAGGREGATED_PREFILL_BATCH, max_batch=256),
        batcher=DecodeBatcher(model, prefill_mode=PrefillMode.FIRST),
        decode_role=Role.DECODE,
    )


def _tropical(model: LatencyModel) -> ServingPolicy:
    return ServingPolicy(
        name="tropical",
        router=MultiplexingToggle(model),
        prefill=PrefillPlanner(model, order=PrefillOrder.SJF, max_batch=1),
        batcher=DecodeBatcher(
            model, prefill_mode=PrefillMode.CHUNKED, token_budget=VLLM_TOKEN_BUDGET, shortest_prompt_first=True
        ),
        decode_role=Role.MULTIPLEX,
    )


def _kairos(model: LatencyModel) -> ServingPolicy:
    return ServingPolicy(
        name="kairos",
        router=UrgencyRouter(model, batch_tokens=DISAGGREGATED_PREFILL_BATCH),
        prefill=PrefillPlanner(model, order=PrefillOrder.FCFS, batch_tokens=DISAGGREGATED_PREFILL_BATCH, max_batch=256),
        batcher=DecodeBatcher(model, prefill_mode=PrefillMode.FIRST, admission=Admission.SLACK, allowed_step=AllowedStep.TPOT),
        decode_role=Role.DECODE,
    )


def _unified(model: LatencyModel) -> ServingPolicy:
    batcher = DecodeBatcher(
        model,
        prefill_mode=PrefillMode.CHUNKED,
        token_budget=UNIFIED_TOKEN_BUDGET,
        abandon_hopeless=True,
        admission=Admission.SLACK,
        allowed_step=AllowedStep.BANKED,
        slo_chunks=True,
        urgent_prompt_first=True,
        protect_late=False,
        abandon_after=UNIFIED_ABANDON_AFTER,
        min_chunk=UNIFIED_MIN_CHUNK,
        finish_on_time=True,
    )
    return ServingPolicy(
        name="unified",
        router=SlackAwareRouter(model, min_chunk=UNIFIED_MIN_CHUNK, lookahead=batcher),
        prefill=PrefillPlanner(model, order=PrefillOrder.URGENCY, max_batch=1, abandon_hopeless=True),
        batcher=batcher,
        decode_role=Role.MULTIPLEX,
        min_prefill_workers=0,
    )


PARTS = ("router", "prefill", "batcher")
MIRRORED = ("min_chunk", "reserve_tpots", "bank_steps", "repay_steps", "kv_watermark")  # a looking-ahead router's copies of its batcher's


def with_options(policy: ServingPolicy, options: dict[str, Any]) -> ServingPolicy:
    """Apply each option to the one part it names: `router.order`, `batcher.min_chunk`; a bare name for a field of the
    policy itself or of exactly one part.

    A router that looks ahead with the batcher keeps looking ahead with the
    batcher as changed, and its copies of the batcher's step rules follow the
    batcher's unless named themselves.
    """
    changes: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
    own: dict[str, Any] = {}
    for key, value in options.items():
        part, field = option_owner(policy, key)
        (own if part is None else changes[part])[field] = value
    router_changes, batcher_changes = changes["router"], changes["batcher"]
    if getattr(policy.router, "lookahead", None) is not None and "lookahead" not in router_changes:
        for field in MIRRORED:
            if field in batcher_changes and field not in router_changes and field in _fields(policy.router):
                router_changes[field] = batcher_changes[field]
    updated: dict[str, Any] = {part: replace(getattr(policy, part), **fields) for part, fields in changes.items() if fields}
    router = updated.get("router", policy.router)
    if getattr(router, "lookahead", None) is not None and "batcher" in updated:  # the router predicts with the batcher the workers run
        updated["router"] = replace(router, lookahead=updated["batcher"])
    return replace(policy, **updated, **own)


def _fields(obj: Any) -> dict[str, Any]:
    return getattr(obj, "__dataclass_fields__", {})


def option_owner(policy: ServingPolicy, key: str) -> tuple[str | None, str]:
    """(part, field) an option names: `router.order` → ("router", "order"); a bare name → the policy's own field
    (part None) or the one part that has it."""
    part, dot, field = key.rpartition(".")
    if dot:
        if part not in PARTS or field not in _fields(getattr(policy, part)):
            raise ValueError(f"{policy.name} has no option {key!r}")
        return part, field
    if key in ServingPolicy.__dataclass_fields__:
        return None, key
    owners = [part for part in PARTS if key in _fields(getattr(policy, part))]
    if not owners:
        raise ValueError(f"{policy.name} has no option {key!r}")
    if len(owners) > 1:
        raise ValueError(f"{key!r} is an option of {policy.name}'s {' and '.join(owners)}: give {' or '.join(f'{o}.{key}' for o in owners)}")
    return owners[0], key


BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def option_from_text(policy: ServingPolicy, key: str, text: str) -> Any:
    """The value of option `key` written as text (`router.rule=infaas`, `token_budget=4096`), typed as its field is.

    Numbers, booleans, enums by value, and `none` for an optional field; an
    option whose field holds anything else (a router, a model) has no text form.
    """
    part, field = option_owner(policy, key)
    owner = policy if part is None else getattr(policy, part)
    hint = typing.get_type_hints(type(owner))[field]
    kinds = list(typing.get_args(hint)) if isinstance(hint, types.UnionType) else [hint]
    optional = type(None) in kinds
    kinds = [kind for kind in kinds if kind is not type(None)]
    word = text.strip()
    if optional and word.lower() == "none":
        return None
    for kind in kinds:
        if kind is bool and word.lower() in BOOLEANS:
            return BOOLEANS[word.lower()]
        if kind is not bool and isinstance(kind, type) and issubclass(kind, enum.Enum | int | float):
            try:
                return kind(word)
            except ValueError:
                continue
    known = ", ".join(str(m.value) for kind in kinds if isinstance(kind, type) and issubclass(kind, enum.Enum) for m in kind)
    expected = f"one of {known}" if known else " or ".join(getattr(k, "__name__", str(k)) for k in kinds) + (" or none" if optional else "")
    raise ValueError(f"{policy.name}'s option {key!r} takes {expected}, got {text!r}")
