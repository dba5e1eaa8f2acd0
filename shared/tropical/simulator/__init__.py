"""Discrete-event simulator: the same policy objects as the live router, on a modelled cluster."""

from tropical.simulator.cluster import ClusterSpec, Link, RequestTimeline, SimRequest, WorkerGroup
from tropical.simulator.simulation import (
    Simulation,
    SimulationResult,
    StepRecord,
    simulate,
)

__all__ = ["ClusterSpec", "Link", "RequestTimeline", "SimRequest", "Simulation", "SimulationResult", "StepRecord", "WorkerGroup", "simulate"]
