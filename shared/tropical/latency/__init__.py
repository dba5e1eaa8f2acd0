"""Latency models: how long prefills and decode steps take, fitted from profiles."""

from tropical.latency.correction import OnlineCorrection
from tropical.latency.fit import DecodeFit, PrefillFit, fit_decode, fit_latency_model, fit_prefill
from tropical.latency.model import Chunk, LatencyModel
from tropical.latency.profiles import available_profiles, load_profile
from tropical.latency.profiling import (
    EngineLimits,
    GridPoint,
    Profile,
    ProfileGrid,
    StepSample,
    default_grid,
    default_latency_model,
    default_latency_spec,
    profile_engine,
)

__all__ = [
    "Chunk",
    "DecodeFit",
    "EngineLimits",
    "GridPoint",
    "LatencyModel",
    "OnlineCorrection",
    "PrefillFit",
    "Profile",
    "ProfileGrid",
    "StepSample",
    "available_profiles",
    "default_grid",
    "default_latency_model",
    "default_latency_spec",
    "fit_decode",
    "fit_latency_model",
    "fit_prefill",
    "load_profile",
    "profile_engine",
]
