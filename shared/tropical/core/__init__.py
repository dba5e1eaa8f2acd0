"""The clock-free core: what workers and the router hold and how decisions are applied.

Events and `now` go in; actions come out (`tropical.core.actions`). The
simulator drives it on a virtual clock, the live services on the real one:
same policy objects, same core, two clocks.
"""

from tropical.core.actions import Abandoned, Action, Placed, Preempted, RouterWake, StepScheduled, TransferStarted, WorkerWake
from tropical.core.cluster import ClusterCore
from tropical.core.request import RequestState
from tropical.core.router import DispatchLedger, RouterState, feasible
from tropical.core.worker import WorkerState

__all__ = [
    "Abandoned",
    "Action",
    "ClusterCore",
    "DispatchLedger",
    "Placed",
    "Preempted",
    "RequestState",
    "RouterState",
    "RouterWake",
    "StepScheduled",
    "TransferStarted",
    "WorkerState",
    "WorkerWake",
    "feasible",
]
