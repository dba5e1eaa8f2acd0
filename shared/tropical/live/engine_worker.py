"""One worker's steps on an engine: the core plans, the engine runs exactly that plan.

The core (`WorkerState.start_step`) decides a step with the serving policy and
keeps the worker's bookkeeping; this turns the step it began into the engine's
`EnginePlan` (decodes of the running batch, the prompt chunks, what was
preempted), runs it, and tells the core what only the engine knows: a request
that stopped at its own end of sequence before its `max_tokens`. Nothing here
waits or reads a clock: a live service calls it off its event loop and feeds it
`now`; a test feeds it a fake clock. The engine is a model engine or an
`EmulatedEngine`; both take the same plans.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tropical.core.actions import Abandoned, Action, Preempted
from tropical.core.request import RequestState
from tropical.core.status import RequestIds
from tropical.core.worker import WorkerState
from tropical.engine.kv_transfer import KvExport
from tropical.engine.plan import EnginePlan, StepResult
from tropical.engine.serving import ServingEngine
from tropical.policies.records import Role
from tropical.protocol import SamplingParams


class EngineWorker:
    """The engine side of one worker whose state the core keeps in `state`."""

    def __init__(self, state: WorkerState, engine: ServingEngine, names: RequestIds) -> None:
        self.state = state
        self.engine = engine
        self.names = names
        self.jobs: dict[str, RequestState] = {}  # requests the engine holds, by name
        self.handoffs: list[RequestState] = []  # prompts prefilled here whose decode goes elsewhere (prefill role)

    def add(
        self, job: RequestState, prompt: Sequence[int], sampling: SamplingParams, max_tokens: int, generated: Sequence[int] = ()
    ) -> None:
        """A request placed here (before the core's `place`): the engine holds it from now on.

        `generated`: the answer's tokens already delivered (a resumed request);
        the core counts them as prompt (`job.prompt`), the engine as the outputs
        it continues after. The core expects `max_tokens` outputs in all
        (`job.output`, the rest of them); a request that stops earlier is ended
        when the engine says so.
        """
        name = self.names.name_of(job.id)
        self.engine.add_request(name, prompt, sampling, max_tokens, output_token_ids=generated)
        self.jobs[name] = job

    def plan(self, actions: Iterable[Action]) -> EnginePlan:
        """The engine plan of the step the core just began, given the core's actions since the last plan.

        Requests the core abandoned leave the engine here; the ones it preempted
        lose their KV in this step.
        """
        state, name_of = self.state, self.names.name_of
        preempt = []
        for action in actions:
            if isinstance(action, Abandoned) and action.worker == state.id:
                name = name_of(action.request)
                self.engine.abort(name)
                del self.jobs[name]
            elif isinstance(action, Preempted) and action.worker == state.id:
                preempt.append(name_of(action.request))
        if not state.busy:
            return EnginePlan(preempt=tuple(preempt))
        decode = tuple(name_of(r) for r in state.running) if state.span_decode else ()
        chunks = tuple((name_of(job.id), tokens) for job, tokens in state.span_chunks)
        return EnginePlan(decode=decode, chunks=chunks, preempt=tuple(preempt))

    def run(self, plan: EnginePlan) -> StepResult:
        """Run one plan on the engine (on a live worker, off the event loop: it takes the step's time)."""
        return self.engine.step(plan)

    def end(self, result: StepResult, now: float) -> None:
        """The step ended at `now` on a worker this driver owns alone: the core advances, then hears the engine."""
        self.state.end_step(now, self._hand_off)
        self.reconcile(result, now)

    def reconcile(self, result: StepResult, now: float) -> None:
        """After the core ended the step: requests the engine ended at their own end of sequence end in the core too."""
        for output in result.outputs:
            if output.finished:
                job = self.jobs.pop(output.request_id)
                if job.finish is None:
                    self.state.stop(job, now)
                    if job in self.handoffs:
                        self.handoffs.remove(job)

    def receive(self, job: RequestState, kv: KvExport) -> None:
        """A request prefilled elsewhere continues here: its KV goes into this engine, waiting for a decode."""
        name = self.names.name_of(job.id)
        self.engine.import_kv(kv, request_id=name)
        self.jobs[name] = job

    def export(self, job: RequestState) -> KvExport:
        """The KV of a request prefilled here, for its decoding worker."""
        return self.engine.export_kv(self.names.name_of(job.id))

    def handed_over(self, job: RequestState) -> None:
        """A prefilled request's KV reached its decoding worker: the engine lets it go."""
        name = self.names.name_of(job.id)
        self.engine.abort(name)
        self.jobs.pop(name, None)

    def _hand_off(self, job: RequestState, worker: WorkerState, now: float) -> None:
        assert worker.role is Role.PREFILL
        self.handoffs.append(job)
