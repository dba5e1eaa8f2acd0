"""scripts/results_tables.py: the tables of docs/results.md from the goodput JSONs, merged by setting, mode and seed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_tables.py"


def tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("results_tables", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(folder: Path, name: str, goodputs: dict[str, float]) -> None:
    policies = {p: {"goodput_rps": g, "tuning": "as built", "prefill_workers": None} for p, g in goodputs.items()}
    (folder / name).write_text(json.dumps({"policies": policies, "replay": {"requests": 100, "start_s": None, "duration_s": None,
                                                                            "arrival": "poisson", "cv": 1.0}}))


def test_parts_of_a_run_are_merged_and_infaas_kept_apart(tmp_path: Path) -> None:
    module = tables()
    for seed, unified in ((0, 12.0), (1, 15.0)):
        write(tmp_path, f"chat-13b-none-seed{seed}-baselines.json", {"vllm": 8.0, "sarathi": 9.0, "distserve": 7.0, "tropical": 10.0, "kairos": 9.5})
        write(tmp_path, f"chat-13b-none-seed{seed}-unified.json", {"unified": unified})
        write(tmp_path, f"chat-13b-none-seed{seed}-infaas.json", {"vllm": 4.0})
    found, infaas, replays = module.load(tmp_path)
    assert set(found[("chat-13b", "none")][0]) == {"vllm", "sarathi", "distserve", "tropical", "kairos", "unified"}
    assert infaas[("chat-13b", "none")][1] == {"vllm": {"goodput_rps": 4.0, "tuning": "as built", "prefill_workers": None}}
    assert replays[("chat-13b", 1)]["requests"] == 100
    assert "| chat-13b | none | 2 | 8 (8–8) | 9 (9–9) | 7 (7–7) | 10 (10–10) | 9.5 (9.5–9.5) | 13.5 (12–15) |" in module.goodput_table(found)
    # unified ÷ max(tropical, kairos): 1.2 and 1.5; ÷ best baseline (sarathi 9): 1.333 and 1.667; % of a 20 req/s bound: 60 and 75
    ratios = module.ratio_table(found, {("chat-13b", 0): 20.0, ("chat-13b", 1): 20.0})
    assert "| chat-13b | none | 1.35 (1.2–1.5) | 1.5 (1.333–1.667) | 67.5 (60–75) |" in ratios
    assert "| chat-13b | none | vllm | 8 (8–8) | 4 (4–4) | 2 (2–2) |" in module.placement_table(found, infaas)
