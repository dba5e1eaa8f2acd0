"""The router's record of placed requests, heartbeat by heartbeat: unstarted, started, moved, done, lost."""

from __future__ import annotations

from tropical.live.placements import Placements
from tropical.protocol import (
    ChunkInStep,
    DecodeLoad,
    GenerateRequest,
    RequestSnapshot,
    WorkerRole,
    WorkerStatus,
)


def request(name: str) -> GenerateRequest:
    return GenerateRequest(request_id=name, prompt_token_ids=[1, 2, 3], max_tokens=4, arrival_time=100.0, reply_to=f"reply-{name}")


def status(
    worker: str,
    *,
    waiting: tuple[str, ...] = (),
    begun: tuple[str, ...] = (),
    decoding: tuple[str, ...] = (),
    incoming: tuple[str, ...] = (),
    accepted: tuple[str, ...] = (),
    in_step: tuple[str, ...] = (),
    draining: bool = False,
) -> WorkerStatus:
    def snapshot(name: str, prefilled: int = 0) -> RequestSnapshot:
        return RequestSnapshot(request_id=name, arrival=100.0, prompt_tokens=3, ttft_slo_s=1.0, tpot_slo_s=0.1, prefilled=prefilled)

    return WorkerStatus(
        worker_id=worker, role=WorkerRole.COLOCATED, queue=f"q.{worker}", sent_at=100.0, kv_capacity_tokens=1000, kv_free_tokens=1000,
        prefills=[snapshot(n, 2) for n in begun] + [snapshot(n) for n in waiting],
        decodes=[DecodeLoad(request_id=n, context_tokens=4, tpot_slo_ms=100.0, slack_s=0.1) for n in decoding],
        incoming=[snapshot(n, 3) for n in incoming],
        in_step=[ChunkInStep(request_id=n, tokens=3) for n in in_step],
        accepted=list(accepted),
        draining=draining,
    )


def test_only_requests_no_heartbeat_shows_begun_are_taken_back_from_a_silent_worker() -> None:
    placements = Placements(forget_after=5.0)
    for name in ("unconfirmed", "waiting", "chunk", "begun", "decoding", "come-and-gone"):
        placements.dispatched(request(name), "w")
    # "waiting" was taken since the previous heartbeat and waits still: accepted and held
    placements.observe([status("w", waiting=("waiting", "chunk"), in_step=("chunk",), begun=("begun",), decoding=("decoding",), accepted=("come-and-gone", "waiting"))], 101.0)
    taken = placements.lost("w")
    assert sorted(r.request_id for r in taken) == ["unconfirmed", "waiting"]
    assert placements.worker_of("waiting") is None and placements.worker_of("begun") == "w"
    assert sorted(p.request_id for p in placements.failed("w")) == ["begun", "chunk", "decoding"]  # come-and-gone is not in flight
    assert len(placements) == 2  # the two taken back, until placed again


def test_a_request_handed_to_a_decoding_worker_follows_it_and_is_forgotten_once_done() -> None:
    placements = Placements(forget_after=2.0)
    placements.dispatched(request("r"), "prefill")
    placements.observe([status("prefill", waiting=("r",)), status("decode")], 101.0)
    placements.observe([status("decode", incoming=("r",)), status("prefill")], 102.0)  # the decoding side reported first
    assert placements.worker_of("r") == "decode" and placements.lost("prefill") == [] and placements.lost("decode") == []
    placements.observe([status("decode"), status("prefill")], 103.0)
    assert placements.observe([status("decode")], 104.0) == [] and len(placements) == 1
    assert placements.observe([status("decode")], 104.5) == ["r"] and len(placements) == 0


def test_a_worker_it_was_taken_back_from_no_longer_moves_it_and_a_drained_worker_fails_nothing() -> None:
    placements = Placements(forget_after=2.0)
    placements.dispatched(request("r"), "old")
    placements.observe([status("old", waiting=("r",))], 101.0)
    (again,) = placements.lost("old")
    placements.dispatched(again, "new")
    placements.observe([status("old", waiting=("r",)), status("new", decoding=("r",))], 102.0)  # the old one came back, not yet cancelled
    assert placements.worker_of("r") == "new"
    placements.observe([status("new", decoding=("r",), draining=True)], 103.0)
    assert placements.failed("new") == [] and len(placements) == 0
