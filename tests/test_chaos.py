"""`tropical chaos`: each fault injected into spawned processes under load, every request accounted for from the clients' side.

The accounting is checked first on its own (deadlines, hung against lost,
recovery, attainment of the admitted) and through the harness's target on the
in-memory bus; then each scenario runs on the real RabbitMQ and Redis (and on
private servers of its own where it restarts one), with tens of requests on
two or three workers of emulated `chat-13b` engines.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from typer.testing import CliRunner

from tests.servers import RABBITMQ_URL, REDIS_URL, START_HINT, connect_rabbit
from tropical.bus import Delivery, MemoryBus
from tropical.chaos import SCENARIOS, ChaosPlan, ChaosResult, ChaosTarget, PrivateRedis, Tracked, account, deadline, run_chaos
from tropical.cli import app
from tropical.experiments import setting_named
from tropical.live.bench import BenchRequest, BusTarget, Load, replay
from tropical.live.client import Client
from tropical.messaging import reply_error
from tropical.metrics import RequestOutcome
from tropical.protocol import ErrorCode, GenerateRequest, decode
from tropical.queues import declare_requests_queue
from tropical.settings import Settings

CHAT = setting_named("chat-13b")
MEMORY = Settings(broker_url="memory://", redis_url="memory://")
SLOW = pytest.mark.timeout(360)  # processes import torch on two shared cores; a lost request is waited for to its deadline + the drain


# --- the accounting, without servers ------------------------------------------------------------


def tracked(
    name: str, arrival: float, *, final_at: float | None, error: str | None = None, first: float | None = None, tokens: int = 10,
    ttft_slo: float = 1.0, tpot_slo: float = 0.1,
) -> Tracked:
    """A request of `tokens` tokens; finished at `final_at` unless it carries an error (first token 0.1 s after arrival unless given)."""
    done = final_at is not None and error is None
    outcome = RequestOutcome(
        request_id=name, arrival=arrival, first_token=(arrival + 0.1 if first is None else first) if done else None,
        finish=final_at if done else None, output_tokens=tokens, ttft_slo=ttft_slo, tpot_slo=tpot_slo, dropped=error is not None,
    )
    return Tracked(outcome, deadline(arrival, ttft_slo, tpot_slo, tokens, grace_s=2.0), final_at, error)


def test_a_deadline_is_the_requests_slo_time_plus_the_grace() -> None:
    assert deadline(5.0, ttft_slo=0.5, tpot_slo=0.1, output_tokens=20, grace_s=10.0) == pytest.approx(5.0 + 0.5 + 2.0 + 10.0)


def test_hung_counts_every_request_past_its_deadline_and_lost_those_that_never_ended() -> None:
    runs = [
        tracked("in-time", 0.0, final_at=1.0),  # deadline 0 + 1 + 1 + 2 = 4
        tracked("late", 0.0, final_at=9.0),
        tracked("errored", 0.0, final_at=2.0, error="kv_transfer_failed"),
        tracked("errored-late", 0.0, final_at=5.0, error="worker_lost"),
        tracked("never", 0.0, final_at=None),
    ]
    accounts = account(runs)
    assert (accounts.offered, accounts.completed, accounts.errored, accounts.lost, accounts.hung) == (5, 2, 2, 1, 3)
    assert accounts.offered == accounts.completed + accounts.errored + accounts.lost
    assert set(accounts.hung_ids) == {"late", "errored-late", "never"} and accounts.lost_ids == ("never",)
    assert accounts.error_codes == {"kv_transfer_failed": 1, "worker_lost": 1}
    assert not accounts.clean and account(runs[:1]).clean


def test_admitted_attainment_leaves_out_only_the_refused_and_refusals_are_timed() -> None:
    runs = [
        tracked("good", 0.0, final_at=1.0),
        tracked("slow-first-token", 0.0, final_at=3.0, first=2.0),  # TTFT 2 s > 1 s: finished, but a miss
        tracked("abandoned", 0.0, final_at=0.5, error="timeout"),  # admitted, then given up: a miss
        tracked("refused-fast", 1.0, final_at=1.01, error="overloaded"),
        tracked("refused-slow", 2.0, final_at=2.2, error="overloaded"),
    ]
    accounts = account(runs)
    assert accounts.refused == 2 and accounts.errored == 3
    assert accounts.late_refusals == 0 and account([tracked("refused-late", 0.0, final_at=1.5, error="overloaded")]).late_refusals == 1
    assert accounts.admitted_attainment == pytest.approx(1 / 3)
    assert accounts.slo_attainment == pytest.approx(1 / 5)
    assert 10.0 < accounts.p99_refusal_ms <= 200.0
    assert account(runs[3:]).admitted_attainment is None  # everything refused: nothing admitted to attain


def test_recovery_is_the_first_normal_finish_of_a_request_sent_after_the_fault() -> None:
    runs = [
        tracked("before", 1.0, final_at=2.0),  # met its SLOs, but was sent before the fault
        tracked("after-late", 4.0, final_at=9.5, first=8.0),  # sent after, TTFT 4 s: not normal
        tracked("after-errored", 4.5, final_at=4.6, error="worker_lost"),
        tracked("after-good", 5.0, final_at=5.95),
        tracked("after-good-short", 5.2, final_at=5.38, tokens=2),  # sent later, finished first
    ]
    accounts = account(runs, fault_at=3.0)
    assert accounts.recovery_s == pytest.approx(5.38 - 3.0)
    assert accounts.in_flight_at_fault == 0
    assert account(runs, fault_at=1.5).in_flight_at_fault == 1
    assert account(runs).recovery_s is None and account(runs).in_flight_at_fault is None  # no fault: nothing to recover from
    assert account(runs[:3], fault_at=3.0).recovery_s is None  # nothing after the fault went normally


async def test_the_target_counts_requests_nobody_answers_as_lost_and_refusals_as_errors() -> None:
    """The harness's target on the in-memory bus: unanswered requests wait out their deadline and the drain, then are lost."""
    bus = MemoryBus()
    requests = [BenchRequest(0.0, (1, 2, 3), 2, ttft_slo=0.05, tpot_slo=0.05), BenchRequest(0.05, (4, 5), 2, ttft_slo=0.05, tpot_slo=0.05)]
    async with Client(bus, MEMORY) as client:
        target = ChaosTarget(BusTarget(client), grace_s=0.1, drain_s=0.2)
        await asyncio.wait_for(replay(target, requests, start=asyncio.get_running_loop().time(), timeout_s=target.patience(requests)), timeout=10)
    accounts = account(target.tracked)
    assert (accounts.lost, accounts.hung, accounts.completed, accounts.errored) == (2, 2, 0, 0)

    async def refuse(delivery: Delivery) -> None:
        request = decode(delivery.body)
        assert isinstance(request, GenerateRequest)
        await reply_error(bus, request.reply_to, request.request_id, ErrorCode.OVERLOADED, "refused")

    queue = await declare_requests_queue(bus, MEMORY)
    refusing = await bus.consume(queue, refuse, auto_ack=True)
    async with Client(bus, MEMORY) as client:
        target = ChaosTarget(BusTarget(client), grace_s=0.1, drain_s=0.2)
        await asyncio.wait_for(replay(target, requests, start=asyncio.get_running_loop().time(), timeout_s=target.patience(requests)), timeout=10)
    await refusing.cancel()
    accounts = account(target.tracked)
    assert (accounts.refused, accounts.errored, accounts.lost, accounts.hung) == (2, 2, 0, 0)
    assert accounts.admitted_attainment is None and accounts.p99_refusal_ms is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --scenario"),
        (["--scenario", "meteor", "--json", "out.json"], "unknown scenario 'meteor'"),
        (["--scenario", "kill-worker"], "give --json"),
        (["--scenario", "kill-worker", "--json", "out.json", "--workers", "0"], "--workers must be positive"),
        (["--scenario", "kill-worker", "--json", "out.json", "--num-prompts", "5", "--duration-s", "5"], "not both"),
        (["--scenario", "kill-worker", "--json", "out.json", "--policy", "fifo"], "unknown policy 'fifo'"),
        (["--scenario", "kill-worker", "--json", "out.json", "--workers", "1"], "at least 1 prefill"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    args = [str(tmp_path / a) if a == "out.json" else a for a in args]
    result = CliRunner().invoke(app, ["--broker-url", RABBITMQ_URL, "--redis-url", REDIS_URL, "chaos", *args])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out.json").exists()


def test_chaos_needs_a_real_broker(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--broker-url", "memory://", "chaos", "--scenario", "overload", "--json", str(tmp_path / "out.json")])
    assert result.exit_code == 2 and "needs a real broker and Redis" in result.output


# --- private servers ----------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_private_redis_restarts_on_its_port_empty() -> None:
    async with PrivateRedis() as server:
        before = Redis.from_url(server.url)
        try:
            await asyncio.wait_for(before.set("key", "value"), timeout=5)
        finally:
            await before.aclose()
        port = server.port
        await server.restart()
        assert server.port == port and len(set(server.pids)) == 2 and server.refused_while_down
        after = Redis.from_url(server.url)
        try:
            assert await asyncio.wait_for(after.get("key"), timeout=5) is None  # no persistence: a restart loses every key
        finally:
            await after.aclose()
    assert not server.running


# --- the scenarios on real processes --------------------------------------------------------------


@pytest.fixture
async def settings() -> Settings:
    """The machine's servers, checked first: a missing one fails the test (never a skip)."""
    bus = await connect_rabbit()
    await bus.close()
    redis = Redis.from_url(REDIS_URL)
    try:
        await asyncio.wait_for(redis.ping(), timeout=5)
    except (OSError, TimeoutError, RedisError) as exc:
        pytest.fail(f"Redis at {REDIS_URL} cannot be reached ({exc!r}); {START_HINT}", pytrace=False)
    finally:
        await redis.aclose()
    return Settings(broker_url=RABBITMQ_URL, redis_url=REDIS_URL, namespace=f"test-chaos-{uuid.uuid4().hex[:8]}")


async def run(scenario: str, settings: Settings, *, rate: float, requests: int = 30) -> ChaosResult:
    chosen = SCENARIOS[scenario]
    plan = ChaosPlan(chosen, chosen.policy, chosen.workers, Load(CHAT, count=requests), rate, drain_s=15.0)
    return await run_chaos(plan, settings)


def accounted(result: ChaosResult) -> str:
    """What a failed check shows: the whole report."""
    return json.dumps(result.as_json(), indent=1)


def assert_every_request_ended_in_time(result: ChaosResult) -> None:
    accounts = result.accounts
    assert accounts.lost == 0 and accounts.hung == 0, accounted(result)
    assert accounts.offered == accounts.completed + accounts.errored == result.requests, accounted(result)
    assert result.exited == {}, accounted(result)  # no service died of the fault but the one it killed


# tropical's goodput on a prefill and two multiplexing workers of chat-13b is about 4.9 req/s (`goodput_rps`): half of it
TROPICAL_RATE = 2.4


@pytest.mark.integration
@SLOW
async def test_a_decoding_worker_killed_mid_load_loses_no_request(settings: Settings) -> None:
    result = await run("kill-worker", settings, rate=TROPICAL_RATE)
    facts = result.fault.facts
    assert facts["exit_status"] == -9 and facts["role"] == "multiplex", accounted(result)
    assert facts["held_requests"] > 0 and result.accounts.in_flight_at_fault > 0, accounted(result)  # it died with work in hand
    assert_every_request_ended_in_time(result)
    assert result.accounts.recovery_s is not None, accounted(result)


@pytest.mark.integration
@SLOW
async def test_the_broker_restarted_mid_load_loses_no_request(settings: Settings) -> None:
    result = await run("restart-broker", settings, rate=TROPICAL_RATE, requests=50)  # arrivals go on well past the broker's return
    facts = result.fault.facts
    assert facts["server"] == "rabbitmq" and len(set(facts["pids"])) == 2 and facts["refused_while_down"], accounted(result)
    assert result.accounts.in_flight_at_fault > 0, accounted(result)
    assert_every_request_ended_in_time(result)
    assert result.accounts.recovery_s is not None, accounted(result)


@pytest.mark.integration
@SLOW
async def test_redis_restarted_empty_mid_load_loses_no_request(settings: Settings) -> None:
    result = await run("restart-redis", settings, rate=TROPICAL_RATE)
    facts = result.fault.facts
    assert facts["server"] == "redis" and len(set(facts["pids"])) == 2 and facts["refused_while_down"], accounted(result)
    assert result.accounts.in_flight_at_fault > 0, accounted(result)
    assert_every_request_ended_in_time(result)
    assert result.accounts.recovery_s is not None, accounted(result)


@pytest.mark.integration
@SLOW
async def test_the_active_router_killed_mid_load_loses_no_request(settings: Settings) -> None:
    result = await run("kill-router", settings, rate=TROPICAL_RATE)
    facts = result.fault.facts
    assert facts["exit_status"] == -9 and result.accounts.in_flight_at_fault > 0, accounted(result)
    if facts["lease_holder"] is not None:  # routers that hold a lease: the standby took it over
        assert facts["takeover_s"] is not None and facts["successor"] != facts["lease_holder"], accounted(result)
    assert_every_request_ended_in_time(result)
    assert result.accounts.recovery_s is not None, accounted(result)  # the other router placed requests sent after the kill


@pytest.mark.integration
@SLOW
async def test_kv_deleted_before_its_pull_fails_handoffs_but_loses_no_request(settings: Settings) -> None:
    # distserve on a prefill and a decode worker: goodput about 2.3 req/s, every request's KV crosses through Redis
    result = await run("kv-fault", settings, rate=1.5, requests=20)
    assert result.fault.facts["kv_keys_deleted"] > 0, accounted(result)
    failed_handoffs = result.accounts.error_codes.get(ErrorCode.KV_TRANSFER_FAILED.value, 0) + (result.resumes or 0)
    assert failed_handoffs > 0, accounted(result)  # the deleted KV was noticed: each such request errored or was resumed
    assert_every_request_ended_in_time(result)


@pytest.fixture(scope="module")
def overload_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """`tropical chaos --scenario overload`: unified on two workers at three times their simulated goodput."""
    out = tmp_path_factory.mktemp("overload") / "overload.json"
    namespace = f"test-chaos-{uuid.uuid4().hex[:8]}"
    result = CliRunner().invoke(
        app, ["--broker-url", RABBITMQ_URL, "--redis-url", REDIS_URL, "--namespace", namespace, "chaos", "--scenario", "overload",
              "--num-prompts", "150", "--drain-s", "15", "--json", str(out)],
        env={"COLUMNS": "200"},
    )
    assert out.exists(), result.output
    report: dict[str, object] = json.loads(out.read_text())
    report["exit_code"] = result.exit_code
    report["output"] = result.output
    return report


@pytest.mark.integration
@SLOW
def test_overload_is_refused_fast_and_loses_no_request(overload_run: dict[str, object]) -> None:
    r = overload_run
    assert r["exit_code"] == 0 and r["lost"] == 0 and r["hung"] == 0, r["output"]
    assert "Chaos: overload" in str(r["output"]) and "Hung / lost:" in str(r["output"])
    assert r["request_rate"] == pytest.approx(3 * r["goodput_rps"])
    assert r["refused"] > 0 and r["error_codes"]["overloaded"] == r["refused"], r["output"]  # shed at the router's admission
    assert 0 < r["p50_refusal_ms"] <= r["p99_refusal_ms"], r["output"]
    assert r["sim"]["refused"] > 0  # the policy refuses these requests in the simulator too


@pytest.mark.integration
@SLOW
def test_overload_admits_what_it_can_serve(overload_run: dict[str, object]) -> None:
    r = overload_run
    assert r["admission"] == {"headroom_ms": 20.0, "dispatch_lead_ms": 10.0}  # the scenario's strict admission
    assert r["sim"]["admitted_attainment"] >= 0.99, r["output"]  # the policy itself keeps what it admits
    assert r["admitted_attainment"] >= 0.9, r["output"]  # live: step jitter and hops on two shared cores cost a few


@pytest.mark.integration
@SLOW
@pytest.mark.xfail(strict=False, reason="live, 300 requests reach 0.995-1.0 of the admitted on two shared cores, but here about 95 "
                   "are admitted and one late first token or a 12-token output's TPOT 0.1 % over is a 0.989 "
                   "(docs/benchmarks.md, Faults and overload)")
def test_overload_admitted_requests_attain_99_percent(overload_run: dict[str, object]) -> None:
    assert overload_run["admitted_attainment"] >= 0.99, overload_run["output"]


def test_unified_keeps_what_it_admits_at_three_times_its_goodput() -> None:
    """The overload scenario's load in the simulator (no servers): every request unified admits meets both SLOs."""
    from dataclasses import replace

    from tropical.policies import make_policy
    from tropical.simulator import simulate

    setting = setting_named("chat-13b")
    policy = make_policy("unified", setting.latency_model())
    load = Load(setting, count=400, seed=0).at(13.0)  # about 3x the goodput of two workers (4.3-4.5 req/s)
    result = simulate(load, replace(setting.cluster(policy), roles=policy.roles(2, 0)), policy)
    outcomes = result.outcomes()
    admitted = [o for o, t in zip(outcomes, result.timelines) if not (t.dropped and t.placed is None)]
    assert result.refused > 100 and result.abandoned == 0  # shed at the door, nothing given up later
    assert sum(o.meets_both for o in admitted) / len(admitted) >= 0.99
