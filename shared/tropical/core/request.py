"""One request as the core tracks it, from arrival to its end, on whichever worker holds it."""

from __future__ import annotations

from tropical.policies.records import RequestId, RequestView


class RequestState:
    """Mutable bookkeeping of one request; only the core writes it.

    `prefilled` counts the tokens of `prompt + generated` whose KV exists (a
    preemption resets it to 0 and the request is recomputed); `generated`
    counts output tokens, the first included. `output` is the true output
    length: drivers that know it (the simulator, a benchmark forcing lengths)
    set it; a live request that stops at its own end of sequence is ended by
    its driver instead. A request in a running decode batch keeps its progress
    in closed form there (see `WorkerState.join`): `generated` is brought up to
    date when it leaves the batch.
    """

    __slots__ = (
        "_view",
        "arrival",
        "decode_worker",
        "dropped",
        "finish",
        "first_token",
        "generated",
        "id",
        "in_transfer",
        "infeasible",
        "join_gen",
        "join_step",
        "kv",
        "kv_ready",
        "on_time",
        "output",
        "placed",
        "preemptions",
        "prefill_start",
        "prefill_worker",
        "prefilled",
        "prompt",
        "token",
        "tpot_slo",
        "ttft_slo",
    )

    def __init__(self, request_id: RequestId, arrival: float, prompt: int, output: int, ttft_slo: float, tpot_slo: float) -> None:
        self.id = request_id
        self.arrival = arrival
        self.prompt = prompt
        self.output = output
        self.ttft_slo = ttft_slo
        self.tpot_slo = tpot_slo
        self.prefilled = 0
        self.generated = 0
        self.first_token: float | None = None
        self.finish: float | None = None
        self.kv = 0  # KV tokens allocated to it outside a running batch
        self.placed: float | None = None
        self.prefill_start: float | None = None
        self.prefill_worker: int | None = None
        self.decode_worker: int | None = None
        self.kv_ready: float | None = None
        self.preemptions = 0
        self.dropped = False
        self.infeasible = False
        self.in_transfer = False
        self.on_time = False  # first token out within its TTFT, and a TPOT it can meet (`WorkerState.first_token_out`)
        self.join_step = 0
        self.join_gen = 0
        self.token = 0  # identifies its current membership of a running batch (0: none)
        self._view: RequestView | None = None

    @property
    def view(self) -> RequestView:
        """What a policy may know of it (never `output`); cached until the request changes."""
        view = self._view
        if view is None:
            view = self._view = RequestView(
                self.id, self.arrival, self.prompt, self.ttft_slo, self.tpot_slo, self.prefilled, self.generated, self.first_token
            )
        return view

    def changed(self) -> None:
        self._view = None

    @property
    def remaining_prefill(self) -> int:
        return self.prompt + self.generated - self.prefilled
