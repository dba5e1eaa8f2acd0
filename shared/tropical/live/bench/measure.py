"""One request as the client saw it: when each content chunk came, and the outcome, gaps and hops made of that.

Every target records a stream into a `Seen` and turns it into a `Measured`
with `measured`, so the bus and HTTP are timed by the same rules: no first
token means failed, never a TTFT of 0, and ITL never includes the TTFT.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tropical.live.bench.load import BenchRequest
from tropical.metrics import RequestOutcome, phase_seconds
from tropical.protocol import Timings


@dataclass(frozen=True)
class ControlHops:
    """What the control plane added to one request (seconds): the time its messages spent between the services.

    `to_router`: published → the router took it off the queue; `to_worker`: the
    router dispatched it → its worker took it; `to_client`: its first token
    left the worker → the client had it. Queueing by the policy and engine time
    are not in it: they are the serving itself, which the simulator also has.
    """

    to_router: float
    to_worker: float
    to_client: float

    @property
    def total(self) -> float:
        return self.to_router + self.to_worker + self.to_client


@dataclass(frozen=True)
class Measured:
    """One request seen from the client: its outcome, how late it was sent, its gaps between content chunks."""

    outcome: RequestOutcome
    send_lag: float
    chunk_gaps: tuple[float, ...] = ()
    error: str | None = None  # the error reply's code (bus), `http_<status>`, `stream_<code>`, `connection_error`, ...
    timed_out: bool = False
    hops: ControlHops | None = None
    tokens_seen: int = 0

    @property
    def cause(self) -> str | None:
        """Why the request failed (None: it finished)."""
        if self.outcome.finished:
            return None
        if self.timed_out:
            return "timeout"
        return self.error or "no_first_token"


@dataclass
class Seen:
    """What the client saw of one stream: when each content chunk came, and what the server told at the end."""

    times: list[float] = field(default_factory=list)  # content chunks' arrivals, on the replay's clock
    listed_tokens: int | None = None  # Σ len(token_ids), where the chunks carry them
    usage_tokens: int | None = None  # the server's `usage.completion_tokens`
    timings: Timings | None = None
    first_emitted: float | None = None  # Unix time the first token left its worker, where the chunk says
    first_received: float | None = None  # Unix time the client had it
    error: str | None = None  # an error the stream itself carried

    def content(self, at: float, token_ids: Sequence[int] | None) -> None:
        if not self.times:
            self.first_received = time.time()
        self.times.append(at)
        if token_ids is not None:
            self.listed_tokens = (self.listed_tokens or 0) + len(token_ids)

    def openai_chunk(self, at: float, data: Mapping[str, Any]) -> None:
        """One streamed chunk of /v1/completions (`text`) or /v1/chat/completions (`delta.content`)."""
        error = data.get("error")
        if error is not None:
            code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
            self.error = "stream_error" if code is None else f"stream_{code}"
            return
        for choice in data.get("choices") or ():
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            token_ids = choice.get("token_ids")
            if text or token_ids:
                self.content(at, token_ids)
        usage = data.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
        if isinstance(data.get("timings"), dict):
            try:
                self.timings = msgspec.convert(data["timings"], Timings)
            except msgspec.ValidationError:
                self.timings = None  # milestones this client cannot read are milestones not sent

    @property
    def output_tokens(self) -> int:
        if self.usage_tokens is not None:
            return self.usage_tokens
        return self.listed_tokens if self.listed_tokens is not None else len(self.times)


def measured(
    request_id: str, request: BenchRequest, arrival: float, sent: float, seen: Seen, *, error: str | None = None, timed_out: bool = False
) -> Measured:
    """The outcome of one request from what its stream showed; it finished only if its first token came and nothing failed."""
    error = error or seen.error
    done = error is None and not timed_out and bool(seen.times)
    t = seen.timings
    outcome = RequestOutcome(
        request_id=request_id,
        arrival=arrival,
        first_token=seen.times[0] if seen.times else None,
        finish=seen.times[-1] if done else None,
        output_tokens=seen.output_tokens if done else request.output_tokens,
        ttft_slo=request.ttft_slo,
        tpot_slo=request.tpot_slo,
        dropped=error is not None,
        prompt_tokens=len(request.prompt_token_ids),
        **(phase_seconds(t) if t is not None else {}),
    )
    gaps = tuple(b - a for a, b in zip(seen.times, seen.times[1:]))
    hops = None
    if t is not None and seen.first_received is not None:
        emitted = seen.first_emitted if seen.first_emitted is not None else t.first_token  # the chunk's own stamp, else the milestone
        hops = None if emitted is None else _hops(t, emitted, seen.first_received)
    tokens = seen.output_tokens if seen.times else 0
    return Measured(outcome, sent - arrival, gaps, error=error, timed_out=timed_out, hops=hops, tokens_seen=tokens)


def _hops(t: Timings, first_emitted: float, first_received: float) -> ControlHops | None:
    if t.routed is None or t.dispatched is None or t.taken is None:
        return None
    return ControlHops(t.routed - t.arrival, t.taken - t.dispatched, first_received - first_emitted)


