"""What a fault did to the requests, counted from the clients' side only.

Every request gets a deadline: its arrival + its TTFT SLO + its output tokens
× its TPOT SLO + a grace. Its final message is `finished` or an `error` reply;
the counts are:

- **completed**: it finished; **errored**: an error reply ended it (the
  refused ones, code `overloaded`, are also counted apart);
- **hung**: no final message by its deadline (a late one, or none at all);
- **lost**: none at all, by the end of the run (its deadline + the run's drain
  wait): so lost <= hung, and offered = completed + errored + lost.

`recovery_s` is the time from the fault to the first moment requests complete
normally again: the earliest finish, less the fault's time, among the requests
that arrived at or after the fault and finished within both their SLOs (None
without a fault, or when none did). `admitted_attainment` is the joint SLO
attainment of the requests the deployment admitted, that is all but the
refused (one errored, hung or lost counts as a miss). A refusal is timed from
the request's arrival to the client's receipt of it; a late one came only
after the request's TTFT SLO had passed.

Times are seconds on one clock, the replay's (0 at its start).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tropical.metrics import RequestOutcome
from tropical.protocol import ErrorCode

DEFAULT_GRACE_S = 10.0
REFUSED = ErrorCode.OVERLOADED.value


def deadline(arrival: float, ttft_slo: float, tpot_slo: float, output_tokens: int, grace_s: float = DEFAULT_GRACE_S) -> float:
    """When a request must have had its final message: all its tokens within its SLOs, plus the grace."""
    return arrival + ttft_slo + output_tokens * tpot_slo + grace_s


@dataclass(frozen=True)
class Tracked:
    """One request as its client saw it end: when its final message came (None: never), and the error it carried."""

    outcome: RequestOutcome  # its SLO view (arrival, first token, finish)
    deadline: float
    final_at: float | None
    error: str | None = None  # the error reply's code; None when it finished or nothing came

    @property
    def request_id(self) -> str:
        return self.outcome.request_id

    @property
    def arrival(self) -> float:
        return self.outcome.arrival

    @property
    def completed(self) -> bool:
        return self.final_at is not None and self.error is None

    @property
    def errored(self) -> bool:
        return self.final_at is not None and self.error is not None

    @property
    def refused(self) -> bool:
        return self.errored and self.error == REFUSED

    @property
    def refused_late(self) -> bool:
        """Refused only after its TTFT SLO had passed: its client waited longer than a first token would have taken."""
        return self.refused and self.final_at is not None and self.final_at - self.arrival > self.outcome.ttft_slo

    @property
    def lost(self) -> bool:
        return self.final_at is None

    @property
    def hung(self) -> bool:
        return self.final_at is None or self.final_at > self.deadline

    def in_flight_at(self, t: float) -> bool:
        """Sent, and not yet ended, at `t`."""
        return self.arrival <= t and (self.final_at is None or self.final_at > t)


@dataclass(frozen=True)
class Accounts:
    """A run's counts (see the module's docstring)."""

    offered: int
    completed: int
    errored: int
    refused: int
    lost: int
    hung: int
    recovery_s: float | None
    admitted_attainment: float | None  # None when everything was refused
    slo_attainment: float | None  # of every request offered
    p50_refusal_ms: float | None  # arrival → the refusal's arrival at the client
    p99_refusal_ms: float | None
    late_refusals: int  # refusals that came after the request's TTFT SLO had passed
    in_flight_at_fault: int | None
    error_codes: dict[str, int]
    hung_ids: tuple[str, ...]
    lost_ids: tuple[str, ...]

    @property
    def clean(self) -> bool:
        """Every request had its final message in time."""
        return self.lost == 0 and self.hung == 0

    def as_json(self, ids_shown: int = 20) -> dict[str, Any]:
        return {
            "offered": self.offered,
            "completed": self.completed,
            "errored": self.errored,
            "lost": self.lost,
            "hung": self.hung,
            "recovery_s": self.recovery_s,
            "admitted_attainment": self.admitted_attainment,
            "refused": self.refused,
            "p50_refusal_ms": self.p50_refusal_ms,
            "p99_refusal_ms": self.p99_refusal_ms,
            "late_refusals": self.late_refusals,
            "slo_attainment": self.slo_attainment,
            "in_flight_at_fault": self.in_flight_at_fault,
            "error_codes": self.error_codes,
            "hung_ids": list(self.hung_ids[:ids_shown]),
            "lost_ids": list(self.lost_ids[:ids_shown]),
        }


def account(tracked: Sequence[Tracked], fault_at: float | None = None) -> Accounts:
    """The counts of one run; `fault_at` is when the fault began (None: a run without one, such as overload)."""
    admitted = [t for t in tracked if not t.refused]
    refusals = np.array([(t.final_at - t.arrival) * 1000.0 for t in tracked if t.refused and t.final_at is not None], dtype=float)
    return Accounts(
        offered=len(tracked),
        completed=sum(t.completed for t in tracked),
        errored=sum(t.errored for t in tracked),
        refused=sum(t.refused for t in tracked),
        lost=sum(t.lost for t in tracked),
        hung=sum(t.hung for t in tracked),
        recovery_s=recovery(tracked, fault_at),
        admitted_attainment=_share(admitted),
        slo_attainment=_share(tracked),
        p50_refusal_ms=float(np.percentile(refusals, 50)) if len(refusals) else None,
        p99_refusal_ms=float(np.percentile(refusals, 99)) if len(refusals) else None,
        late_refusals=sum(t.refused_late for t in tracked),
        in_flight_at_fault=None if fault_at is None else sum(t.in_flight_at(fault_at) for t in tracked),
        error_codes=dict(Counter(t.error for t in tracked if t.error is not None)),
        hung_ids=tuple(t.request_id for t in tracked if t.hung),
        lost_ids=tuple(t.request_id for t in tracked if t.lost),
    )


def recovery(tracked: Sequence[Tracked], fault_at: float | None) -> float | None:
    """Fault → the earliest finish of a request that arrived at or after it and met both its SLOs."""
    if fault_at is None:
        return None
    finishes = [finish for t in tracked if t.arrival >= fault_at and t.completed and t.outcome.meets_both and (finish := t.outcome.finish) is not None]
    return min(finishes) - fault_at if finishes else None


def _share(tracked: Sequence[Tracked]) -> float | None:
    """Joint SLO attainment: finished within both SLOs, out of all given."""
    if not tracked:
        return None
    return sum(t.completed and t.outcome.meets_both for t in tracked) / len(tracked)
