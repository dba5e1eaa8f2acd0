"""Multiplexing worker: continuous-batching decode that also takes prefills when slack allows."""
