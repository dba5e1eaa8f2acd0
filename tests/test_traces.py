"""Trace loading: formats recognised by columns, windows and rate scaling, refusals, the real files."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tropical.data import shipped_file
from tropical.traces import TraceError, TraceRequest, describe, load_trace, locate_trace, synthetic_arrivals


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def arrivals(requests: list[TraceRequest]) -> list[float]:
    return [r.arrival for r in requests]


def original_text(path: Path) -> str:
    """A shipped file's text as published: gunzipped when stored compressed."""
    content = path.read_bytes()
    return (gzip.decompress(content) if path.suffix == ".gz" else content).decode()


AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.5000000,374,44
2023-11-16 18:15:47.0000000,396,109
2023-11-16 18:15:48.5000000,10,1
2023-11-16 18:15:50.5000000,20,2
"""


def test_azure_timestamps_become_seconds_from_the_first_request(tmp_path: Path) -> None:
    requests = load_trace(write(tmp_path, "a.csv", AZURE))
    assert requests[:2] == [TraceRequest(0.0, 374, 44), TraceRequest(0.5, 396, 109)]
    assert arrivals(requests) == pytest.approx([0.0, 0.5, 2.0, 4.0])


def test_format_comes_from_columns_not_file_name(tmp_path: Path) -> None:
    # An Azure trace saved as .jsonl, columns in another order with an extra one.
    text = "GeneratedTokens,note,TIMESTAMP,ContextTokens\n5,x,2023-11-16 00:00:00,7\n6,y,2023-11-16 00:00:02,8\n"
    assert load_trace(write(tmp_path, "trace.jsonl", text)) == [TraceRequest(0.0, 7, 5), TraceRequest(2.0, 8, 6)]


def test_mooncake_buckets_are_spread_evenly(tmp_path: Path) -> None:
    lines = [
        '{"timestamp": 3000, "input_length": 10, "output_length": 1, "hash_ids": [0]}',
        '{"timestamp": 3000, "input_length": 11, "output_length": 2, "hash_ids": [0, 1]}',
        '{"timestamp": 3000, "input_length": 12, "output_length": 3, "hash_ids": []}',
        '{"timestamp": 6000, "input_length": 13, "output_length": 4, "hash_ids": [2]}',
        '{"timestamp": 9000, "input_length": 14, "output_length": 5, "hash_ids": [3]}',
        '{"timestamp": 9000, "input_length": 15, "output_length": 6, "hash_ids": [4]}',
    ]
    requests = load_trace(write(tmp_path, "m.jsonl", "\n".join(lines) + "\n"))
    # Three in the first bucket at 0, 1, 2 s; one alone at 3 s; two at 6 and 7.5 s; file order kept.
    assert arrivals(requests) == pytest.approx([0.0, 1.0, 2.0, 3.0, 6.0, 7.5])
    assert [r.prompt_tokens for r in requests] == [10, 11, 12, 13, 14, 15]


def test_only_stamps_on_the_bucket_grid_are_spread(tmp_path: Path) -> None:
    """A trace in Mooncake's format with real times keeps them: only stamps on the 3-second grid are bucket starts."""
    lines = [
        '{"timestamp": 1234, "input_length": 10, "output_length": 1}',
        '{"timestamp": 1234, "input_length": 11, "output_length": 1}',
        '{"timestamp": 4500, "input_length": 12, "output_length": 1}',
        '{"timestamp": 6000, "input_length": 13, "output_length": 1}',
        '{"timestamp": 6000, "input_length": 14, "output_length": 1}',
    ]
    requests = load_trace(write(tmp_path, "real.jsonl", "\n".join(lines) + "\n"))
    # 1.234 s twice and 4.5 s are real times (kept, less the first); the two at 6 s share a bucket: 6 and 7.5 s
    assert arrivals(requests) == pytest.approx([0.0, 0.0, 3.266, 4.766, 6.266])


def test_distserve_csv_and_integral_floats(tmp_path: Path) -> None:
    text = "req_id,arrival_s,prompt_len,output_len\n0,0.0,55,4\n1,1.25,829.0,170\n2,3.0,12,1\n"
    requests = load_trace(write(tmp_path, "d.csv", text))
    assert requests == [TraceRequest(0.0, 55, 4), TraceRequest(1.25, 829, 170), TraceRequest(3.0, 12, 1)]


def test_unsorted_arrivals_are_sorted_stably(tmp_path: Path) -> None:
    text = "arrival_s,prompt_len,output_len\n2.0,1,1\n0.0,2,1\n2.0,3,1\n1.0,4,1\n"
    assert [r.prompt_tokens for r in load_trace(write(tmp_path, "u.csv", text))] == [2, 4, 1, 3]


def test_length_tables_need_a_rate(tmp_path: Path) -> None:
    path = write(tmp_path, "l.csv", "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n10,5,15,2\n20,4,24,5\n30,3,33,10\n")
    with pytest.raises(TraceError, match="rate") as error:
        load_trace(path)
    assert "l.csv" in str(error.value)
    requests = load_trace(path, rate=2.0, seed=7)
    assert [(r.prompt_tokens, r.output_tokens) for r in requests] == [(10, 5), (20, 4), (30, 3)]
    assert requests[0].arrival == 0.0
    assert requests == load_trace(path, rate=2.0, seed=7), "same seed, same arrivals"
    assert requests != load_trace(path, rate=2.0, seed=8)


def test_rate_rescales_gaps_and_keeps_their_shape(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", AZURE)  # gaps 0.5, 1.5, 2.0: mean gap 4/3 s
    scaled = arrivals(load_trace(path, rate=1.5))  # mean gap 2/3 s: half of every gap
    assert scaled == pytest.approx([0.0, 0.25, 1.0, 2.0])
    assert describe(load_trace(path, rate=1.5))["rate"] == pytest.approx(1.5)


def test_window_then_count_then_rate(tmp_path: Path) -> None:
    text = "arrival_s,prompt_len,output_len\n" + "".join(f"{t},{t + 1},1\n" for t in range(10))
    path = write(tmp_path, "w.csv", text)
    window = load_trace(path, start_s=2.0, duration_s=5.0)  # arrivals 2..6, re-based
    assert [r.prompt_tokens for r in window] == [3, 4, 5, 6, 7]
    assert arrivals(window) == pytest.approx([0, 1, 2, 3, 4])
    cut = load_trace(path, start_s=2.0, duration_s=5.0, num_requests=3, rate=4.0)
    assert [r.prompt_tokens for r in cut] == [3, 4, 5]
    assert arrivals(cut) == pytest.approx([0.0, 0.25, 0.5])  # the 3 kept requests at 4 req/s
    assert load_trace(path, start_s=100.0) == []
    assert load_trace(path, num_requests=0) == []


def test_gamma_arrivals_have_the_requested_rate_and_burstiness() -> None:
    for cv in (1.0, 3.0):
        times = synthetic_arrivals(40_001, rate=5.0, arrival="gamma", cv=cv, seed=3)
        gaps = np.diff(times)
        assert gaps.mean() == pytest.approx(0.2, rel=0.05 * cv)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)
    poisson = np.diff(synthetic_arrivals(40_001, rate=5.0, seed=3))
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.05)


@settings(max_examples=40, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=2, max_size=40).filter(lambda g: sum(g) > 1e-3),
    rate=st.floats(0.01, 1000.0),
)
def test_rate_scaling_hits_the_rate_and_keeps_order(tmp_path_factory: pytest.TempPathFactory, gaps: list[float], rate: float) -> None:
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    text = "arrival_s,prompt_len,output_len\n" + "".join(f"{t!r},{i + 1},1\n" for i, t in enumerate(times.tolist()))
    path = write(tmp_path_factory.mktemp("trace"), "t.csv", text)
    requests = load_trace(path, rate=rate)
    assert [r.prompt_tokens for r in requests] == list(range(1, len(times) + 1))
    assert np.all(np.diff(arrivals(requests)) >= 0)
    assert (len(requests) - 1) / requests[-1].arrival == pytest.approx(rate, rel=1e-9)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("   \n\n", "empty"),
        ("a,b,c\n1,2,3\n", "unrecognised columns"),
        ("arrival_s,prompt_len,output_len\n", "no requests"),
        ("arrival_s,prompt_len,output_len\n0.0,-5,3\n", "at least one"),
        ("arrival_s,prompt_len,output_len\n0.0,5,0\n", "at least one"),
        ("arrival_s,prompt_len,output_len\n0.0,5.5,3\n", "whole number"),
        ("arrival_s,prompt_len,output_len\n0.0,five,3\n", "not a number"),
        ("arrival_s,prompt_len,output_len\nsoon,5,3\n", "arrival time"),
        ("arrival_s,prompt_len,output_len\nnan,5,3\n", "not finite"),
        ("arrival_s,prompt_len,output_len\n0.0,5\n", "fields"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,5,3\n", "arrival time"),
        ('{"timestamp": 0, "input_length": 5}\n', "lacks"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 2}\n{oops\n', "not valid JSON"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 2}\n[1, 2]\n', "not a JSON object"),
    ],
)
def test_bad_files_raise_trace_errors_naming_file_and_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, "bad.csv", text)
    with pytest.raises(TraceError, match=problem) as error:
        load_trace(path, rate=1.0)
    assert str(path) in str(error.value)
    assert error.value.path == str(path)


def test_missing_files_and_directories(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        load_trace(tmp_path / "absent.csv")
    with pytest.raises(TraceError, match="directory"):
        load_trace(tmp_path)


# --- compressed files and data-file names --------------------------------------------------

MOONCAKE = (
    '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n'
    '{"timestamp": 3000, "input_length": 11, "output_length": 2, "hash_ids": [0, 1]}\n'
)


def write_gzip(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return path


@pytest.mark.parametrize(("name", "text"), [("a.csv", AZURE), ("m.jsonl", MOONCAKE)])
def test_gzip_files_read_like_their_plain_originals(tmp_path: Path, name: str, text: str) -> None:
    plain = load_trace(write(tmp_path, name, text))
    assert len(plain) > 1
    assert load_trace(write_gzip(tmp_path, name + ".gz", text)) == plain
    # the content says it is compressed, not the name
    assert load_trace(write_gzip(tmp_path, "renamed.txt", text)) == plain


def test_a_missing_file_is_read_from_its_gzip_twin(tmp_path: Path) -> None:
    write_gzip(tmp_path, "a.csv.gz", AZURE)
    assert locate_trace(tmp_path / "a.csv") == tmp_path / "a.csv.gz"
    assert load_trace(tmp_path / "a.csv") == load_trace(write(tmp_path, "b.csv", AZURE))


def test_a_broken_gzip_file_is_a_trace_error(tmp_path: Path) -> None:
    path = tmp_path / "a.csv.gz"
    path.write_bytes(gzip.compress(AZURE.encode())[:40])
    with pytest.raises(TraceError, match="cannot be decompressed") as error:
        load_trace(path)
    assert error.value.path == str(path)


def test_a_shipped_name_loads_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TROPICAL_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    name = "traces/distserve_sharegpt_opt13b.csv"
    assert locate_trace(name) == shipped_file(name)
    assert load_trace(name) == load_trace(shipped_file(name))
    write(tmp_path, "distserve_sharegpt_opt13b.csv", "arrival_s,prompt_len,output_len\n0.0,5,3\n")
    assert load_trace("distserve_sharegpt_opt13b.csv") == [TraceRequest(0.0, 5, 3)]  # a file here wins


def test_a_relative_name_is_looked_up_in_the_configured_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    collection = tmp_path / "collection"
    collection.mkdir()
    write_gzip(collection, "azure.csv.gz", AZURE)
    monkeypatch.setenv("TROPICAL_DATA_DIR", str(collection))
    monkeypatch.chdir(tmp_path)
    assert locate_trace("azure.csv") == collection / "azure.csv.gz"
    assert len(load_trace("azure.csv")) == 4
    with pytest.raises(TraceError, match="no such file") as error:
        load_trace("traces/absent.csv")
    assert error.value.path == "traces/absent.csv"


@pytest.mark.parametrize(
    "kwargs",
    [{"rate": 0.0}, {"rate": -1.0}, {"arrival": "uniform"}, {"cv": 0.0}, {"num_requests": -1}, {"duration_s": 0.0}, {"start_s": -1.0}],
)
def test_nonsense_options_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        load_trace(write(tmp_path, "a.csv", AZURE), **kwargs)


def test_arrival_processes_apply_to_length_tables_only(tmp_path: Path) -> None:
    timed = write(tmp_path, "a.csv", AZURE)
    with pytest.raises(TraceError, match="own arrival times"):
        load_trace(timed, arrival="gamma", cv=2.0)
    table = write(tmp_path, "l.csv", "num_prefill_tokens,num_decode_tokens\n10,5\n20,4\n")
    with pytest.raises(ValueError, match="Gamma"):
        load_trace(table, rate=1.0, cv=2.0)  # Poisson gaps have cv 1: a cv asks for Gamma
    assert len(load_trace(table, rate=1.0, arrival="gamma", cv=2.0)) == 2


def test_describe_by_hand() -> None:
    requests = [TraceRequest(0.0, 10, 1), TraceRequest(1.0, 20, 3), TraceRequest(4.0, 30, 5)]
    summary = describe(requests)
    assert summary["count"] == 3 and summary["duration_s"] == 4.0 and summary["rate"] == 0.5
    assert summary["prompt_mean"] == 20.0 and summary["prompt_p50"] == 20.0 and summary["prompt_p90"] == pytest.approx(28.0)
    assert summary["output_p99"] == pytest.approx(4.96) and summary["output_max"] == 5.0
    assert describe([])["count"] == 0


# --- the real traces ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "count", "prompt_mean", "output_mean", "rate"),
    [
        ("traces/azure_conv_2023.csv", 19_366, 1_155, 211, 5.53),
        ("traces/mooncake_conversation_fast25.jsonl", 12_031, 12_035, 343, 3.40),
        ("traces/distserve_sharegpt_opt13b.csv", 1_600, 759, 186, None),
    ],
)
def test_real_traces_load_quickly_and_match_their_statistics(
    relative: str, count: int, prompt_mean: float, output_mean: float, rate: float | None
) -> None:
    path = shipped_file(relative)
    started = time.perf_counter()
    requests = load_trace(path)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"loading took {elapsed:.2f} s"
    summary = describe(requests)
    assert summary["count"] == count
    assert summary["prompt_mean"] == pytest.approx(prompt_mean, abs=1)
    assert summary["output_mean"] == pytest.approx(output_mean, abs=1)
    if rate is not None:
        assert summary["rate"] == pytest.approx(rate, abs=0.01)


def test_mooncake_replay_spreads_each_request_within_its_own_bucket() -> None:
    path = shipped_file("traces/mooncake_conversation_fast25.jsonl")
    stamps = np.array([json.loads(line)["timestamp"] / 1000 for line in original_text(path).splitlines()])
    replayed = np.array(arrivals(load_trace(path)))
    assert np.all(np.diff(replayed) > 0.0), "no two requests arrive at once"
    offset = replayed - (stamps - stamps[0])  # the file is sorted, so the order is the file's
    assert np.all(offset >= 0.0) and np.all(offset < 3.0)


def test_real_length_table_with_gamma_arrivals() -> None:
    requests = load_trace(shipped_file("lengths/sharegpt_8k_llama2_tokenizer.csv"), rate=4.0, arrival="gamma", cv=2.0, num_requests=2_000)
    assert len(requests) == 2_000
    assert describe(requests)["rate"] == pytest.approx(4.0, rel=0.15)
    assert requests[0] == TraceRequest(0.0, 74, 918)
