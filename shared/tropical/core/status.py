"""A worker's view on the wire and back: the one place a heartbeat becomes a `WorkerView`.

Inside one process the core names requests and workers by small integers; on
the wire they are the clients' request ids and the workers' names, the same
for every service. `RequestIds` keeps one process's mapping between the two.
Building a status from a worker's state and turning it back into a view gives
the view that worker's own planner sees.
"""

from __future__ import annotations

from collections.abc import Iterable

from tropical.core.worker import WorkerState
from tropical.policies.records import BatchSummary, RequestId, RequestView, Role, WorkerView
from tropical.protocol import (
    BatchSnapshot,
    ChunkInStep,
    DecodeLoad,
    RequestSnapshot,
    WorkerRole,
    WorkerStatus,
)


class RequestIds:
    """Names ↔ the core's integer ids, assigned in order of first sight; one table per process."""

    def __init__(self) -> None:
        self._ids: dict[str, RequestId] = {}
        self._names: list[str] = []

    def id_of(self, name: str) -> RequestId:
        request_id = self._ids.get(name)
        if request_id is None:
            request_id = self._ids[name] = len(self._names)
            self._names.append(name)
        return request_id

    def name_of(self, request_id: RequestId) -> str:
        return self._names[request_id]

    def forget(self, name: str) -> None:
        """Nothing refers to the request any more; its name is not reused, its id is not freed (ids stay unique)."""
        self._ids.pop(name, None)


def status_of(
    worker: WorkerState,
    now: float,
    *,
    worker_id: str,
    queue: str,
    names: RequestIds,
    accepted: Iterable[RequestId] = (),
    draining: bool = False,
) -> WorkerStatus:
    """The heartbeat of `worker` at `now`: its view, with request names instead of ids."""
    view = worker.view(now)

    def snapshots(requests: Iterable[RequestView]) -> list[RequestSnapshot]:
        return [_snapshot(r, names) for r in requests]

    batch = view.batch
    return WorkerStatus(
        worker_id=worker_id,
        role=WorkerRole(view.role.value),
        queue=queue,
        sent_at=max(now, 0.0),
        kv_capacity_tokens=view.kv_capacity,
        kv_free_tokens=max(view.kv_free, 0),
        queued_prefills=len(view.prefills),
        queued_prefill_tokens=view.prefill_load,
        decodes=_decodes(worker, now, names),
        busy_until=max(view.step_end, 0.0),
        draining=draining,
        busy=view.busy,
        step_begin=view.step_begin,
        step_end=view.step_end,
        placed_since_step=view.placed_since_step,
        prefills=snapshots(view.prefills),
        batch=BatchSnapshot(
            size=batch.size,
            context_tokens=batch.context_tokens,
            prompt_tokens=batch.prompt_tokens,
            next_token_deadline=batch.next_token_deadline,
            reserve_deadline=batch.reserve_deadline,
            tpot_slo_s=batch.tpot_slo,
            on_time_deadline=batch.on_time_deadline,
        ),
        waiting=snapshots(view.waiting),
        incoming=snapshots(view.incoming),
        decode_load=view.decode_load,
        in_step=[ChunkInStep(request_id=names.name_of(r), tokens=tokens) for r, tokens in view.in_step],
        accepted=[names.name_of(r) for r in accepted],
    )


def view_of(status: WorkerStatus, index: int, ids: RequestIds) -> WorkerView:
    """The router's view of the worker at position `index` of its worker list, from its latest status."""

    def views(snapshots: list[RequestSnapshot]) -> tuple[RequestView, ...]:
        return tuple(_view(s, ids) for s in snapshots)

    batch = status.batch
    return WorkerView(
        id=index,
        role=Role(status.role.value),
        kv_capacity=status.kv_capacity_tokens,
        kv_used=status.kv_capacity_tokens - status.kv_free_tokens,
        busy=status.busy,
        step_begin=status.step_begin,
        step_end=status.step_end,
        placed_since_step=status.placed_since_step,
        prefills=views(status.prefills),
        prefill_load=status.queued_prefill_tokens,
        batch=BatchSummary(
            batch.size,
            batch.context_tokens,
            batch.prompt_tokens,
            batch.next_token_deadline,
            batch.reserve_deadline,
            batch.tpot_slo_s,
            batch.on_time_deadline,
        ),
        waiting=views(status.waiting),
        incoming=views(status.incoming),
        decode_load=status.decode_load,
        in_step=tuple((ids.id_of(c.request_id), c.tokens) for c in status.in_step),
    )


def resident_requests(status: WorkerStatus) -> list[str]:
    """Every request a status shows on its worker now: prompts, decodes running, waiting or on their way."""
    resident = [s.request_id for group in (status.prefills, status.waiting, status.incoming) for s in group]
    return resident + [d.request_id for d in status.decodes]


def held_requests(status: WorkerStatus) -> list[str]:
    """Every request a status shows its worker holding or having taken: what confirms the router's dispatches."""
    return resident_requests(status) + status.accepted


def _snapshot(r: RequestView, names: RequestIds) -> RequestSnapshot:
    return RequestSnapshot(
        request_id=names.name_of(r.id),
        arrival=r.arrival,
        prompt_tokens=r.prompt_tokens,
        ttft_slo_s=r.ttft_slo,
        tpot_slo_s=r.tpot_slo,
        prefilled=r.prefilled,
        generated=r.generated,
        first_token=r.first_token,
    )


def _view(s: RequestSnapshot, ids: RequestIds) -> RequestView:
    return RequestView(
        ids.id_of(s.request_id), s.arrival, s.prompt_tokens, s.ttft_slo_s, s.tpot_slo_s, s.prefilled, s.generated, s.first_token
    )


def _decodes(worker: WorkerState, now: float, names: RequestIds) -> list[DecodeLoad]:
    """Each running decode with its banked TPOT budget at `now` (negative when it is behind)."""
    steps = worker.current_steps(now)
    loads = []
    for job in worker.running.values():
        generated = worker.generated(job, steps)
        view = RequestView(job.id, job.arrival, job.prompt, job.ttft_slo, job.tpot_slo, 0, generated, job.first_token)
        loads.append(
            DecodeLoad(
                request_id=names.name_of(job.id),
                context_tokens=view.context_tokens,
                tpot_slo_ms=job.tpot_slo * 1000.0,
                slack_s=view.token_deadline - now,
            )
        )
    return loads
