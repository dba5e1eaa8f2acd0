"""Markdown tables for docs/results.md from the goodput JSONs `scripts/results.sh` writes.

Usage: python scripts/results_tables.py [FOLDER]   (default docs/figures/equal-terms)

Files are `<setting>-<mode>-seed<k>[-<part>].json`; parts of one setting, mode
and seed are merged (a run may be split by policy), except `-infaas` files,
which hold the baselines behind INFaaS placement and are tabled apart.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

NAME = re.compile(r"^(?P<setting>.+)-(?P<mode>none|hopeless|own)-seed(?P<seed>\d+)(?:-(?P<part>[\w-]+))?\.json$")
POLICIES = ("vllm", "sarathi", "distserve", "tropical", "kairos", "unified")
BASELINES = ("vllm", "sarathi", "distserve")
Key = tuple[str, str]  # (setting, mode)


Found = dict[Key, dict[int, dict[str, Any]]]  # {(setting, mode): {seed: {policy: its JSON}}}
Replays = dict[tuple[str, int], dict[str, Any]]  # {(setting, seed): the JSON's `replay`}


def load(folder: Path) -> tuple[Found, Found, Replays]:
    """The default placement's results, INFaaS placement's, and which requests each setting and seed replayed."""
    found: Found = defaultdict(lambda: defaultdict(dict))
    infaas: Found = defaultdict(lambda: defaultdict(dict))
    replays: Replays = {}
    for path in sorted(folder.glob("*.json")):
        match = NAME.match(path.name)
        if not match:
            continue
        target = infaas if match["part"] == "infaas" else found
        report = json.loads(path.read_text())
        seed = int(match["seed"])
        target[(match["setting"], match["mode"])][seed].update(report["policies"])
        replays[(match["setting"], seed)] = report["replay"]
    return found, infaas, replays


def spread(values: list[float]) -> str:
    """Mean, and the range over seeds when there is more than one."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ({min(values):.4g}–{max(values):.4g})"


def goodputs(seeds: dict[int, dict[str, Any]], policy: str) -> list[float]:
    return [runs[policy]["goodput_rps"] for _, runs in sorted(seeds.items()) if policy in runs]


def goodput_table(found: Found) -> str:
    rows = ["| setting | admission | seeds | " + " | ".join(POLICIES) + " |", "|---|---|---|" + "---|" * len(POLICIES)]
    for (setting, mode), seeds in sorted(found.items()):
        cells = [spread(goodputs(seeds, policy)) for policy in POLICIES]
        rows.append(f"| {setting} | {mode} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ratio_table(found: Found, bounds: dict[tuple[str, int], float] | None = None) -> str:
    """unified over the better of Tropical and Kairos, and over the best classical baseline, seed by seed."""
    head = "| setting | admission | unified ÷ max(tropical, kairos) (goal ≥ 1.15) | unified ÷ best baseline (goal ≥ 1.5) |"
    rows = [head + (" unified, % of the non-clairvoyant bound (goal ≥ 95) |" if bounds else ""), "|---|---|---|---|" + ("---|" if bounds else "")]
    for (setting, mode), seeds in sorted(found.items()):
        vs_ours, vs_base, share = [], [], []
        for seed, runs in sorted(seeds.items()):
            if "unified" not in runs:
                continue
            unified = runs["unified"]["goodput_rps"]
            ours = max(runs[p]["goodput_rps"] for p in ("tropical", "kairos") if p in runs)
            base = max(runs[p]["goodput_rps"] for p in BASELINES if p in runs)
            vs_ours.append(unified / ours if ours else float("inf"))
            vs_base.append(unified / base if base else float("inf"))
            if bounds and (setting, seed) in bounds:
                share.append(100.0 * unified / bounds[(setting, seed)])
        line = f"| {setting} | {mode} | {spread(vs_ours)} | {spread(vs_base)} |"
        rows.append(line + (f" {spread(share)} |" if bounds else ""))
    return "\n".join(rows)


def tuning_table(found: Found) -> str:
    """Which tuning and split each policy was measured at, per seed."""
    rows = ["| setting | admission | policy | tuning (seeds 0, 1, 2) | prefill workers |", "|---|---|---|---|---|"]
    for (setting, mode), seeds in sorted(found.items()):
        for policy in POLICIES:
            runs = [seeds[s][policy] for s in sorted(seeds) if policy in seeds[s]]
            if not runs:
                continue
            tunings = "; ".join(sorted({run["tuning"] for run in runs}))
            splits = ", ".join(str(run["prefill_workers"]) for run in runs)
            rows.append(f"| {setting} | {mode} | {policy} | {tunings} | {splits} |")
    return "\n".join(rows)


def placement_table(found: Found, infaas: Found) -> str:
    rows = ["| setting | admission | policy | placement searched | INFaaS only | searched ÷ INFaaS |", "|---|---|---|---|---|---|"]
    for key, seeds in sorted(infaas.items()):
        for policy in BASELINES:
            theirs = goodputs(seeds, policy)
            ours = goodputs(found.get(key, {}), policy)
            if not theirs or not ours:
                continue
            ratios = [a / b for a, b in zip(ours, theirs, strict=False) if b]
            rows.append(f"| {key[0]} | {key[1]} | {policy} | {spread(ours)} | {spread(theirs)} | {spread(ratios)} |")
    return "\n".join(rows)


def bounds_for(replays: Replays) -> dict[tuple[str, int], tuple[float, float]]:
    """(non-clairvoyant, clairvoyant) capacity bounds at 90 %, per setting and seed, on the requests the searches replayed."""
    from tropical.capacity import capacity_bound
    from tropical.experiments import Replay, setting_named

    bounds = {}
    for (name, seed), replay in sorted(replays.items()):
        setting = setting_named(name)
        replayed = Replay(**replay)
        bounds[(name, seed)] = (
            capacity_bound(setting, setting.trace, attainment=0.9, clairvoyant=False, seed=seed, replay=replayed).rate,
            capacity_bound(setting, setting.trace, attainment=0.9, clairvoyant=True, seed=seed, replay=replayed).rate,
        )
    return bounds


def share_table(found: Found, bounds: dict[tuple[str, int], tuple[float, float]]) -> str:
    """Every policy's goodput as a percentage of the non-clairvoyant bound."""
    rows = ["| setting | admission | bound (req/s): non-clairvoyant / clairvoyant | " + " | ".join(POLICIES) + " |",
            "|---|---|---|" + "---|" * len(POLICIES)]
    for (setting, mode), seeds in sorted(found.items()):
        cells = []
        for policy in POLICIES:
            shares = [100.0 * runs[policy]["goodput_rps"] / bounds[(setting, seed)][0] for seed, runs in sorted(seeds.items()) if policy in runs]
            cells.append(spread(shares))
        caps = [bounds[(setting, seed)] for seed in sorted(seeds)]
        bound = f"{spread([c[0] for c in caps])} / {spread([c[1] for c in caps])}"
        rows.append(f"| {setting} | {mode} | {bound} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(folder: Path) -> None:
    found, infaas, replays = load(folder)
    if not found:
        sys.exit(f"error: no goodput JSON named <setting>-<mode>-seed<k>.json in {folder}")
    print("### Goodput (req/s), mean (min–max over seeds)\n")
    print(goodput_table(found))
    bounds = bounds_for(replays)
    print("\n### Share of the non-clairvoyant capacity bound (%)\n")
    print(share_table(found, bounds))
    print("\n### unified against the rest, seed by seed\n")
    print(ratio_table(found, {key: value[0] for key, value in bounds.items()}))
    print("\n### Tunings and layouts chosen by the searches\n")
    print(tuning_table(found))
    if infaas:
        print("\n### Placement searched (vLLM, Sarathi; DistServe load-aware) against INFaaS only (req/s)\n")
        print(placement_table(found, infaas))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/figures/equal-terms"))
