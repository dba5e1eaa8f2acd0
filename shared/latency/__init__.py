"""Latency models: how long prefills and decode steps take, fitted from profiles."""

from shared.latency.correction import OnlineCorrection
from shared.latency.fit import DecodeFit, PrefillFit, fit_decode, fit_latency_model, fit_prefill
from shared.latency.model import Chunk, LatencyModel
from shared.latency.profiles import available_profiles, load_profile

__all__ = [
    "Chunk",
    "DecodeFit",
    "LatencyModel",
    "OnlineCorrection",
    "PrefillFit",
    "available_profiles",
    "fit_decode",
    "fit_latency_model",
    "fit_prefill",
    "load_profile",
]
