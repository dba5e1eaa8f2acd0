"""A fault scenario run end to end: private servers if it needs them, a spawned deployment, a load, the fault mid-load.

The load is the bench's (`tropical.live.bench`): its requests, sent at their
arrivals by its `replay`, each measured by its bus target. `ChaosTarget`
wraps that target to note when each request's final message came, against
the request's deadline, which `accounting` turns into the counts. The run's
clock is the replay's (seconds from the load's start); the fault is injected
on it, by default when 40 % of the arrivals' span has passed.

Emulated engines time each step as the setting's GPUs would (`chat-13b`), so
the deployment runs at a GPU cluster's pace on a few cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tropical.bus import BusError
from tropical.bus.rabbitmq import RabbitBus
from tropical.chaos.accounting import DEFAULT_GRACE_S, Accounts, Tracked, account, deadline
from tropical.chaos.scenarios import Fault, FaultContext, Scenario
from tropical.chaos.servers import PrivateRabbitMQ, PrivateRedis
from tropical.live.bench import BenchRequest, BusTarget, Load, Measured, Seen, bench_requests, measured, replay
from tropical.live.client import Client
from tropical.live.engines import EngineChoice
from tropical.live.run import policy_roles
from tropical.live.spawn import Spawned, spawned
from tropical.metrics import summarize
from tropical.policies import make_policy
from tropical.policies.records import Role
from tropical.settings import Settings
from tropical.simulator import SimRequest, simulate
from tropical.store import open_store

DEFAULT_DRAIN_S = 30.0  # after its deadline, how long more a request's final message is waited for before it counts as lost
FAULT_AT = 0.4  # of the arrivals' span, when no time is given
CLIENT_PATIENCE_S = 120.0  # how long the client's publishes wait for a broker that is down (a restart takes seconds)
FAULT_TIMEOUT_S = 300.0
UNSENT = "unsent"  # the client could not publish the request at all
EXITED_LOG_LINES = 10


@dataclass(frozen=True)
class ChaosPlan:
    """One run: a scenario on `workers` workers of `policy` (emulated engines of `setting`), the load at `rate` req/s."""

    scenario: Scenario
    policy: str
    workers: int
    load: Load
    rate: float
    setting: str = "chat-13b"
    fault_at_s: float | None = None  # on the run's clock; None: FAULT_AT of the arrivals' span
    grace_s: float = DEFAULT_GRACE_S
    drain_s: float = DEFAULT_DRAIN_S

    @property
    def engine(self) -> EngineChoice:
        return EngineChoice("emulated", setting=self.setting)

    def roles(self) -> tuple[Role, ...]:
        return policy_roles(make_policy(self.policy, self.engine.latency_model()), self.workers)


@dataclass(frozen=True)
class ChaosResult:
    plan: ChaosPlan
    requests: int
    accounts: Accounts
    fault: Fault
    resumes: int | None  # requests the client continued elsewhere (None: this client does not resume)
    exited: dict[str, dict[str, Any]]  # services that ended on their own during the run (see `_exited`)
    sim: dict[str, Any] | None  # the simulator on the same requests, where the scenario compares (see `simulated`)
    namespace: str
    wall_s: float
    admission: dict[str, float] | None = None  # the router's admission headroom and dispatch lead (ms), as the settings gave them

    def as_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "scenario": plan.scenario.name,
            **self.accounts.as_json(),
            "resumes": self.resumes,
            "fault": {"at_s": self.fault.at, **self.fault.facts},
            "exited": self.exited,
            "sim": self.sim,
            "policy": plan.policy,
            "workers": dict(Counter(role.value for role in plan.roles())),
            "routers": plan.scenario.routers,
            "kv_transport": None if plan.scenario.kv_transport is None else plan.scenario.kv_transport.value,
            "engine": f"emulated ({plan.setting})",
            "dataset": plan.load.describe(),
            "num_prompts": self.requests,
            "seed": plan.load.seed,
            "request_rate": plan.rate,
            "grace_s": plan.grace_s,
            "drain_s": plan.drain_s,
            "namespace": self.namespace,
            "admission": self.admission,
            "wall_seconds": round(self.wall_s, 3),
        }


def goodput_rps(setting_name: str, policy: str, roles: Sequence[Role]) -> float:
    """The simulated goodput (`tropical goodput`'s search) of the setting on exactly these workers."""
    from tropical.experiments import SearchSettings, policy_goodput, setting_named

    setting = setting_named(setting_name)
    sized = replace(setting, workers=len(roles))
    split = sum(role is Role.PREFILL for role in roles) if make_policy(policy, setting.latency_model()).disaggregated else None
    return policy_goodput(sized, sized.trace, policy, SearchSettings(), splits=[split]).goodput_rps


async def run_chaos(plan: ChaosPlan, settings: Settings) -> ChaosResult:
    """Run the plan against a deployment of its own (a fresh namespace; private servers where the scenario restarts one)."""
    started = time.perf_counter()
    scenario = plan.scenario
    load = plan.load.at(plan.rate)
    requests = bench_requests(load)
    last = max((r.arrival for r in requests), default=0.0)
    fault_at = plan.fault_at_s if plan.fault_at_s is not None else FAULT_AT * last
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(PrivateRabbitMQ()) if scenario.private_broker else None
        redis = await stack.enter_async_context(PrivateRedis()) if scenario.private_redis else None
        settings = settings.with_overrides(
            admission_headroom_ms=settings.admission_headroom_ms or scenario.admission_headroom_ms,
            dispatch_lead_ms=settings.dispatch_lead_ms or scenario.dispatch_lead_ms,
            broker_url=None if broker is None else broker.url,
            redis_url=None if redis is None else redis.url,
            namespace=f"{settings.namespace}.chaos-{uuid.uuid4().hex[:8]}",
        )
        deployment = await stack.enter_async_context(
            spawned(settings, plan.policy, plan.roles(), plan.engine, routers=scenario.routers, kv_transport=scenario.kv_transport)
        )
        store = await stack.enter_async_context(open_store(settings))
        client = await stack.enter_async_context(_client(settings))
        target = ChaosTarget(BusTarget(client), plan.grace_s, plan.drain_s)
        client.timeout_s = target.patience(requests)  # each request's own wait bounds its stream, not a silence
        start, origin = asyncio.get_running_loop().time(), time.perf_counter()  # the replay's clock: 0 at `start`
        context = FaultContext(deployment, store, lambda: time.perf_counter() - origin, broker, redis)
        injected = asyncio.create_task(scenario.inject(context, fault_at))
        try:
            await replay(target, requests, start=start, timeout_s=client.timeout_s)
            fault = await asyncio.wait_for(asyncio.shield(injected), timeout=FAULT_TIMEOUT_S)
        finally:
            injected.cancel()
            await asyncio.wait([injected], timeout=5.0)
        resumes = _resumes(client)
        exited = _exited(deployment, fault)
    accounts = account(target.tracked, fault.at)
    sim = simulated(plan, load) if scenario.compare_sim else None
    admission = {"headroom_ms": settings.admission_headroom_ms, "dispatch_lead_ms": settings.dispatch_lead_ms}
    return ChaosResult(plan, len(requests), accounts, fault, resumes, exited, sim, settings.namespace, time.perf_counter() - started, admission)


def simulated(plan: ChaosPlan, load: Sequence[SimRequest]) -> dict[str, Any]:
    """The simulator on the same requests and workers: what the policy itself attains (refused by the router, abandoned
    by the workers as hopeless), the reference for a live run without a fault."""
    from tropical.experiments import setting_named

    setting = setting_named(plan.setting)
    policy = make_policy(plan.policy, setting.latency_model())
    result = simulate(load, replace(setting.cluster(policy), roles=plan.roles()), policy)
    summary = summarize(result.outcomes())
    admitted = summary.count - result.refused
    return {
        "slo_attainment": summary.attainment,
        "admitted_attainment": summary.good / admitted if admitted else None,
        "refused": result.refused,
        "abandoned": result.abandoned,
    }


@contextlib.asynccontextmanager
async def _client(settings: Settings) -> AsyncIterator[Client]:
    """A client whose publishes wait out a broker restart instead of failing after the default ten seconds."""
    bus = await RabbitBus.connect(settings.broker_url, connect_timeout=CLIENT_PATIENCE_S)
    try:
        async with Client(bus, settings) as client:
            yield client
    finally:
        await bus.close()


def _exited(deployment: Spawned, fault: Fault) -> dict[str, dict[str, Any]]:
    """The services that ended during the run though no fault killed them: their exit status and last log lines."""
    return {
        name: {"exit_status": process.returncode, "log_tail": deployment.log_tail(name, EXITED_LOG_LINES).splitlines()}
        for name, process in deployment.processes.items()
        if process.returncode is not None and name != fault.facts.get("killed")
    }


def _resumes(client: Client) -> int | None:
    """How many times the client continued a request elsewhere (None: a client that does not resume)."""
    resumes = getattr(client, "resumes", None)
    return resumes if isinstance(resumes, int) else None


class ChaosTarget:
    """The bench's bus target, with each request's deadline and the time its final message came noted for `accounting`.

    A request is waited for until its deadline plus `drain_s`; what has not
    ended by then is lost.
    """

    def __init__(self, inner: BusTarget, grace_s: float, drain_s: float) -> None:
        self.inner = inner
        self.grace_s = grace_s
        self.drain_s = drain_s
        self.tracked: list[Tracked] = []

    @property
    def backend(self) -> str:
        return self.inner.backend

    @property
    def model_id(self) -> str | None:
        return self.inner.model_id

    def deadline(self, request: BenchRequest, arrival: float) -> float:
        return deadline(arrival, request.ttft_slo, request.tpot_slo, request.output_tokens, self.grace_s)

    def patience(self, requests: Sequence[BenchRequest]) -> float:
        """The longest any request is waited for after its arrival."""
        return max((self.deadline(r, 0.0) for r in requests), default=0.0) + self.drain_s

    async def measure(self, index: int, request: BenchRequest, arrival: float, now: Callable[[], float], timeout_s: float) -> Measured:
        """The bench's measurement, waited for until the request's deadline plus the drain (not `timeout_s`)."""
        due = self.deadline(request, arrival)
        try:
            result = await self.inner.measure(index, request, arrival, now, due - arrival + self.drain_s)
        except BusError:  # never published: the deployment never saw it, and the client knows at once
            result = measured(f"bench-{self.inner.client.name}-{index}", request, arrival, now(), Seen(), error=UNSENT)
        self.tracked.append(Tracked(result.outcome, due, None if result.timed_out else now(), result.error))
        return result
