"""Curves as PNGs, every policy: attainment, P90 TTFT and P90 TPOT against the request rate; attainment against the SLO scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tropical.experiments import SearchSettings, Setting, rate_sweep

SWEEP_POINTS = 10


def sweep_rates(report: dict[str, Any], points: int = SWEEP_POINTS) -> list[float]:
    """Rates from a fifth to 1.5 times the highest goodput in the report."""
    top = max((p["goodput_rps"] for p in report["policies"].values()), default=0.0) or 1.0
    return [top * (0.2 + 1.3 * i / (points - 1)) for i in range(points)]


def sweep_and_plot(setting: Setting, trace: Path, report: dict[str, Any], prefix: Path, search: SearchSettings,
                   options: dict[str, Any] | None = None) -> list[str]:
    """Sweep every policy of `report` at its best split and tuning (with the search's `options`), store the curves
    in it, and draw them."""
    rates = sweep_rates(report)
    curves: dict[str, list[dict[str, float]]] = {}
    for name, found in report["policies"].items():
        points = rate_sweep(setting, trace, name, rates, prefill_workers=found["prefill_workers"], tuning=found.get("tuning"),
                            search=search, options=options)
        curves[name] = [
            {
                "rate": rate,
                "attainment": s.attainment,
                "ttft_attainment": s.ttft_attainment,
                "tpot_attainment": s.tpot_attainment,
                "p90_ttft_ms": s.p90_ttft_ms,
                "p90_tpot_ms": s.p90_tpot_ms,
            }
            for rate, s in points
        ]
    report["sweep"] = curves
    return plot_curves(setting, curves, report["policies"], prefix, search.target)


def plot_curves(setting: Setting, curves: dict[str, list[dict[str, float]]], goodputs: dict[str, Any], prefix: Path, target: float = 0.9) -> list[str]:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    title = f"{setting.name}: {setting.model}, {setting.workers}×TP{setting.tensor_parallel} ({setting.slo.describe()})"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        line = ax.plot([p["rate"] for p in points], [100 * p["attainment"] for p in points], marker="o", ms=3, label=name)[0]
        rate = goodputs[name]["goodput_rps"]
        if rate > 0:
            ax.axvline(rate, color=line.get_color(), ls=":", lw=1)
    ax.axhline(100 * target, color="grey", ls="--", lw=1)
    ax.set_xlabel("request rate (req/s, whole cluster)")
    ax.set_ylabel("joint SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    attainment_path = Path(f"{prefix}-attainment.png")
    fig.savefig(attainment_path, dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in curves.items():
        rates = [p["rate"] for p in points]
        left.plot(rates, [p["p90_ttft_ms"] / 1000 for p in points], marker="o", ms=3, label=name)
        right.plot(rates, [p["p90_tpot_ms"] for p in points], marker="o", ms=3, label=name)
    left.set_yscale("log")
    left.set_xlabel("request rate (req/s)")
    left.set_ylabel("P90 TTFT (s)")
    right.axhline(setting.slo.tpot * 1000, color="grey", ls="--", lw=1)
    right.set_xlabel("request rate (req/s)")
    right.set_ylabel("P90 TPOT (ms)")
    right.set_ylim(bottom=0)
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    latency_path = Path(f"{prefix}-latency.png")
    fig.savefig(latency_path, dpi=120)
    plt.close(fig)
    return [str(attainment_path), str(latency_path)]


def plot_slo_sweep(setting: Setting, report: dict[str, Any], path: Path) -> str:
    """Joint attainment against the SLO scale at the report's rate, one line per policy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, found in report["policies"].items():
        points = sorted((float(scale), value) for scale, value in found["attainment_at_scale"].items())
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", ms=3, label=name)
    ax.axhline(100 * report["target_attainment"], color="grey", ls="--", lw=1)
    ax.set_xlabel(f"SLO scale (1 = {report['slo_at_scale_1']})")
    ax.set_ylabel("joint SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title(f"{setting.name}: {setting.model}, {setting.workers}×TP{setting.tensor_parallel}, {report['rate']:g} req/s", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_bench_sweep(records: list[dict[str, Any]], path: Path) -> str:
    """A `tropical bench` sweep, one point per rate: goodput, SLO attainment, p99 TTFT and p99 TPOT against the rate.

    A rate of `inf` (every request at once) is drawn to the right of the finite ones and labelled so.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    finite = [float(r["request_rate"]) for r in records if r["request_rate"] != "inf"]
    far = 1.5 * max(finite, default=1.0)
    records = sorted(records, key=lambda r: far if r["request_rate"] == "inf" else float(r["request_rate"]))
    xs = [far if r["request_rate"] == "inf" else float(r["request_rate"]) for r in records]

    def series(key: str, scale: float = 1.0) -> list[float]:
        return [float("nan") if r[key] is None else scale * r[key] for r in records]

    first = records[0]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    goodput, attainment, ttft, tpot = axes.flat
    goodput.plot(xs, series("request_goodput"), marker="o", ms=3, label="goodput")
    goodput.plot(xs, series("request_throughput"), marker="o", ms=3, ls="--", label="throughput")
    goodput.set_ylabel("requests/s")
    goodput.legend(fontsize=8)
    for key, label in (("slo_attainment", "both"), ("ttft_slo_attainment", "TTFT"), ("tpot_slo_attainment", "TPOT")):
        attainment.plot(xs, series(key, 100.0), marker="o", ms=3, label=label)
    attainment.axhline(90, color="grey", ls="--", lw=1)
    attainment.set_ylabel("SLO attainment (%)")
    attainment.set_ylim(0, 102)
    attainment.legend(fontsize=8)
    ttft.plot(xs, series("p99_ttft_ms"), marker="o", ms=3)
    ttft.set_ylabel("P99 TTFT (ms)")
    tpot.plot(xs, series("p99_tpot_ms"), marker="o", ms=3)
    tpot.set_ylabel("P99 TPOT (ms)")
    for ax in axes.flat:
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylim(bottom=0)
        if len(finite) < len(records):
            ax.set_xticks(sorted(set(xs)), [("inf" if x == far else f"{x:g}") for x in sorted(set(xs))])
    fig.suptitle(f"{first['backend']} {first['model_id'] or ''}: {first['dataset']}, {first['num_prompts']} requests per rate", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
