"""Latency models: how long prefills and decode steps take, fitted from profiles."""

from tropical.latency.correction import OnlineCorrection
from tropical.latency.fit import DecodeFit, PrefillFit, fit_decode, fit_latency_model, fit_prefill
from tropical.latency.model import Chunk, LatencyModel
from tropical.latency.profiles import available_profiles, load_profile

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
