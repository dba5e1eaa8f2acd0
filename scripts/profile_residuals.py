"""How much a real engine's decode step costs beyond its forward pass, read from two published profiles.

Splitwise timed whole decode iterations of Llama-2-70B on DGX-A100 (its serving
stack around the forward pass included); Vidur's per-operator tables compose the
forward pass alone for the same model and GPUs. Their difference, fitted as a
cost per step, per decode and per KV token, is the overhead a published profile
could supply to `LatencyModel.with_overhead`, if it carried over between stacks.

Usage: python scripts/profile_residuals.py
"""

from __future__ import annotations

import numpy as np

from tropical.latency.profiles import splitwise_fit, vidur_model


def main() -> None:
    print("TP   samples   per step (ms)   per decode (ms)   per KV token (µs)")
    for tp in (2, 4, 8):
        measured = splitwise_fit("llama-2-70b", "a100-80g", tp).decode_samples
        forward = vidur_model("llama-2-70b", "a100-80g", tp)
        design = np.array([[1.0, batch, context] for batch, context, _ in measured])
        residual = np.array([seconds - forward.decode_time(batch, context) for batch, context, seconds in measured])
        (step, per_decode, per_token), *_ = np.linalg.lstsq(design, residual, rcond=None)
        print(f"{tp:<4} {len(measured):>7}   {1e3 * step:>13.2f}   {1e3 * per_decode:>15.3f}   {1e6 * per_token:>17.3f}")


if __name__ == "__main__":
    main()
