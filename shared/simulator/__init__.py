"""Discrete-event simulator: the same policy objects as the live router, on a modelled cluster."""

from shared.simulator.cluster import ClusterSpec, RequestTimeline, SimRequest
from shared.simulator.simulation import (
    Simulation,
    SimulationResult,
    StepRecord,
    simulate,
)

__all__ = ["ClusterSpec", "RequestTimeline", "SimRequest", "Simulation", "SimulationResult", "StepRecord", "simulate"]
