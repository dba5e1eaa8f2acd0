"""Prefill worker: runs prefills in policy order, streams the first token, hands the KV cache on."""
