"""The core driven by engines: emulated ones reproduce the simulator exactly; model ones serve the right tokens."""

from __future__ import annotations

import random

import pytest

from tropical.engine import EmulatedEngine, Engine, EngineConfig, FakeClock, ModelConfig
from tropical.experiments import SETTINGS, Replay, workload
from tropical.latency.model import LatencyModel
from tropical.live.local_cluster import LocalCluster, LocalRequest
from tropical.policies import Role, make_policy
from tropical.simulator import Simulation

SPLITS = {"vllm": None, "sarathi": None, "distserve": 4, "tropical": 4, "kairos": 4, "unified": 2}


@pytest.mark.parametrize("policy", list(SPLITS))
def test_emulated_engines_reproduce_the_simulator(policy: str) -> None:
    setting = SETTINGS["chat-13b"]
    load = workload(setting, setting.trace, 12.0, replay=Replay(requests=120), seed=1)
    model = setting.latency_model()
    served = make_policy(policy, model)
    spec = setting.cluster(served, SPLITS[policy])
    simulated = Simulation(spec, served, spans=False).run(load.requests)
    engines = [EmulatedEngine(model, spec.kv_capacity, clock=FakeClock(), seed=7) for _ in spec.roles]
    cluster = LocalCluster(served, spec.roles, engines, model, transfer_time=spec.transfer_time)
    offered = [LocalRequest(r.arrival, tuple(range(1, r.prompt_tokens + 1)), r.output_tokens, r.ttft_slo, r.tpot_slo) for r in load.requests]
    run = cluster.run(offered)
    assert run.steps == simulated.steps
    for sim, live, tokens, request in zip(simulated.timelines, run.requests, run.tokens, load.requests, strict=True):
        assert (live.first_token, live.finish, live.dropped) == (sim.first_token, sim.finish, sim.dropped)
        assert (live.prefill_worker, live.decode_worker) == (sim.prefill_worker, sim.decode_worker)
        if not live.dropped:
            assert len(tokens) == request.output_tokens  # the first token from the prefilling engine, the rest from the decoding one


# fast enough that no request misses: every policy keeps every request
MODEL = LatencyModel(c0=0.0, c1=0.0005, c2=0.005, d0=0.005, d1=0.0005, d2=0.00001)
TINY = ModelConfig.tiny(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, eos_token_ids=(257,))


def model_engine() -> Engine:
    return Engine.load("tiny", EngineConfig(num_kv_blocks=256, block_size=4, device="cpu"), tiny=TINY, weights_seed=3)


@pytest.mark.parametrize(
    ("policy", "roles", "options", "tpot"),
    [
        ("vllm", (Role.COLOCATED, Role.COLOCATED), {}, 10.0),
        ("sarathi", (Role.COLOCATED,), {"token_budget": 24}, 10.0),
        ("distserve", (Role.PREFILL, Role.DECODE), {}, 10.0),
        # every prompt may inline, and a tight TPOT leaves too little slack for some: both paths are taken
        ("tropical", (Role.PREFILL, Role.MULTIPLEX), {"short_prompt": 0}, 0.012),
        ("unified", (Role.MULTIPLEX, Role.MULTIPLEX), {}, 10.0),
    ],
)
def test_policy_plans_on_model_engines_give_a_single_engines_tokens(
    policy: str, roles: tuple[Role, ...], options: dict[str, int], tpot: float
) -> None:
    rng = random.Random(5)
    offered = [
        LocalRequest(0.01 * i, tuple(rng.randrange(256) for _ in range(rng.randint(3, 60))), rng.randint(1, 12), 100.0, tpot)
        for i in range(16)
    ]
    served = make_policy(policy, MODEL, **options)
    engines = [model_engine() for _ in roles]
    run = LocalCluster(served, roles, engines, MODEL, kv_capacity=900, engine_time=False).run(offered)
    expected = model_engine().generate([r.prompt for r in offered], max_tokens=12)
    for request, state, tokens, reference in zip(offered, run.requests, run.tokens, expected, strict=True):
        assert not state.dropped and state.finish is not None
        assert tokens == reference.token_ids[: request.max_tokens]
    paths = {(state.prefill_worker, state.decode_worker) for state in run.requests if state.generated > 1}
    if policy == "distserve":
        assert paths == {(0, 1)}  # every decode continued from KV handed over by the prefill worker
    elif policy == "tropical":
        assert paths == {(0, 1), (1, 1)}  # handed over, and multiplexed
    else:
        assert {p for p, _ in paths} == set(range(len(roles)))


@pytest.mark.parametrize(("policy", "roles"), [("vllm", (Role.COLOCATED,)), ("distserve", (Role.PREFILL, Role.DECODE))])
def test_requests_ending_at_their_own_end_of_sequence_leave_the_core(policy: str, roles: tuple[Role, ...]) -> None:
    eos = 5
    engines = [EmulatedEngine(MODEL, 4_000, vocab_size=16, eos_token_ids=(eos,), clock=FakeClock(), seed=2) for _ in roles]
    offered = [LocalRequest(0.001 * i, tuple(t % 16 for t in range(1, 20 + i)), 30, 100.0, 10.0) for i in range(12)]
    cluster = LocalCluster(make_policy(policy, MODEL), roles, engines, MODEL)
    run = cluster.run(offered)
    early = [tokens for tokens in run.tokens if len(tokens) < 30]
    assert early and all(tokens[-1] == eos and eos not in tokens[:-1] for tokens in early)
    assert all(state.finish is not None and not state.dropped for state in run.requests)
    assert all(view.kv_used == 0 for view in cluster.core.views(max(s.finish or 0 for s in run.requests)))  # nothing left holding KV
    assert not any(engine.has_unfinished() for engine in engines)
