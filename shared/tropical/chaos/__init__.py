"""`tropical chaos`: faults injected into a local multi-process deployment under load, counted from the clients' side.

Read in this order: `accounting` (deadlines; completed, errored, hung, lost;
recovery and attainment), `servers` (private RabbitMQ and Redis to restart),
`scenarios` (the faults) and `harness` (a scenario run end to end).
"""

from tropical.chaos.accounting import DEFAULT_GRACE_S, Accounts, Tracked, account, deadline, recovery
from tropical.chaos.harness import DEFAULT_DRAIN_S, ChaosPlan, ChaosResult, ChaosTarget, goodput_rps, run_chaos
from tropical.chaos.scenarios import SCENARIOS, Fault, FaultContext, Scenario
from tropical.chaos.servers import PrivateRabbitMQ, PrivateRedis, PrivateServer, ServerMissing, free_port

__all__ = [
    "DEFAULT_DRAIN_S",
    "DEFAULT_GRACE_S",
    "SCENARIOS",
    "Accounts",
    "ChaosPlan",
    "ChaosResult",
    "ChaosTarget",
    "Fault",
    "FaultContext",
    "PrivateRabbitMQ",
    "PrivateRedis",
    "PrivateServer",
    "Scenario",
    "ServerMissing",
    "Tracked",
    "account",
    "deadline",
    "free_port",
    "goodput_rps",
    "recovery",
    "run_chaos",
]
