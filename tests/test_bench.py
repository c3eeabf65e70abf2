"""The TTFT and throughput benchmarks on the tiny random model, and their errors for bad settings."""

import math

import pytest

from kvcomm_jax.bench.baselines import exact_prompt
from kvcomm_jax.bench.throughput import (
    ThroughputSettings,
    plot_throughput,
    run_throughput_benchmark,
    throughput_table,
)
from kvcomm_jax.bench.ttft import (
    TTFTSettings,
    plot_ttft,
    run_ttft_benchmark,
    ttft_table,
)
from kvcomm_jax.cli import main
from kvcomm_jax.testing import tiny_loaded_model

AGENTS = 3
AGENT_TIMES = (
    "dense_ttft_ms", "dense_prefix_cached_ttft_ms", "kvcomm_ttft_ms", "floor_ms",
    "speedup_vs_dense", "speedup_vs_prefix_cached", "kvcomm_over_floor",
)


@pytest.fixture(scope="module")
def model():
    return tiny_loaded_model()


@pytest.fixture(scope="module")
def ttft_result(model):
    settings = TTFTSettings(agents=AGENTS, prefix_tokens=32, input_tokens=48, output_tokens=8, samples=2)
    return run_ttft_benchmark(model, settings, progress=False)


@pytest.fixture(scope="module")
def throughput_result(model):
    settings = ThroughputSettings(task="gsm8k", agents=2, limit=2, batch_sizes=(1, 2), max_new_tokens=4)
    return run_throughput_benchmark(model, settings, progress=False)


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_exact_prompt_is_unpadded_and_continues_positions():
    tokens, positions, num_new = exact_prompt([7, 8, 9], start=5)
    assert tokens.tolist() == [[7, 8, 9]] and positions.tolist() == [[5, 6, 7]] and num_new.tolist() == [3]


def test_ttft_reports_every_documented_number_per_agent(ttft_result):
    agents = ttft_result["agents"]
    assert [a["agent"] for a in agents] == [1, 2, 3]
    for a in agents:
        assert a["calls"] == a["reused_calls"] == 2  # gamma 1: every measured call reuses
        for key in AGENT_TIMES:
            assert _positive(a[key]), (a["agent"], key, a[key])
        assert all(_positive(a["breakdown_ms"][part]) for part in ("correction_assembly", "forward"))
        assert a["others_ms"] >= 0
        assert all(_positive(v) for v in a["floor_parts_ms"].values()) and set(a["floor_parts_ms"]) == {"forward", "read"}
        assert a["floor_bytes"] > 0
        assert 0 < a["cached_prefix_tokens"] < a["prompt_tokens"]
        assert a["speedup_vs_dense"] == pytest.approx(a["dense_ttft_ms"] / a["kvcomm_ttft_ms"])
        assert a["kvcomm_over_floor"] == pytest.approx(a["kvcomm_ttft_ms"] / a["floor_ms"])
        assert set(a["compile_ms"]) == {"kvcomm", "dense", "dense_prefix_cached", "floor"}
        assert 0 <= a["first_token_agreement"] <= 1
    # later agents read more placeholders: more anchors and deltas to read
    assert agents[0]["floor_bytes"] < agents[1]["floor_bytes"] < agents[2]["floor_bytes"]


def test_prefix_cached_dense_has_the_first_token_of_plain_dense(ttft_result):
    for a in ttft_result["agents"]:
        assert a["prefix_cached_first_token_agreement"] == 1.0, a["agent"]


def test_ttft_request_totals_machine_and_unmeasured_requests(ttft_result):
    r = ttft_result
    assert set(r["request_ms"]) == {"dense", "dense_prefix_cached", "kvcomm"}
    assert all(_positive(v) for v in r["request_ms"].values())
    assert set(r["request_speedup"]) == {"vs_dense", "vs_prefix_cached"}
    assert r["request_speedup"]["vs_dense"] == pytest.approx(r["request_ms"]["dense"] / r["request_ms"]["kvcomm"])
    assert r["requests_in_totals"] == 2 and r["reuse_rate"] == 1.0
    assert r["anchor_requests"]["count"] == 3  # two anchor requests and one warm-up, in no median
    assert r["anchor_requests"]["paths"][0] == ["dense"] * AGENTS
    assert {"processor", "cpu_count", "devices"} <= set(r["machine"]) and r["date"]


def test_ttft_table_and_plot(ttft_result, tmp_path):
    table = ttft_table(ttft_result)
    assert "prefix-cached dense ms" in table and "KVCOMM / floor" in table
    assert table.count("\n| ") == AGENTS and "per request" in table
    plot_ttft(str(tmp_path / "ttft.png"), ttft_result)
    assert (tmp_path / "ttft.png").stat().st_size > 0


def test_throughput_runs_every_combination_warm(throughput_result, tmp_path):
    r = throughput_result
    assert [(run["mode"], run["batch_size"]) for run in r["runs"]] == [("dense", 1), ("kvcomm", 1), ("dense", 2), ("kvcomm", 2)]
    for run in r["runs"]:
        assert set(run) >= {"mode", "batch_size", "questions", "wall_s", "questions_per_s", "generated_tokens_per_s",
                            "reuse_rate", "compile_s"}
        assert run["questions"] == 2 and _positive(run["wall_s"]) and _positive(run["generated_tokens_per_s"])
        assert run["questions_per_s"] == pytest.approx(2 / run["wall_s"])
        assert run["timed_compiles"] == 0  # the warm-up pass compiled every shape
        assert 0 <= run["reuse_rate"] <= 1
    assert r["baseline_batch_size"] == 1
    assert set(r["speedup_over_batch_size"]) == {"dense", "kvcomm"}
    assert all(s["1"] == 1.0 and _positive(s["2"]) for s in r["speedup_over_batch_size"].values())
    assert r["question_ids"] == ["gsm8k/0", "gsm8k/1"] and "machine" in r and "date" in r
    assert throughput_table(r).count("\n| ") == 4
    plot_throughput(str(tmp_path / "throughput.png"), r)
    assert (tmp_path / "throughput.png").stat().st_size > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"samples": 0}, "samples must be >= 1"),
        ({"input_tokens": -4}, "input-tokens must be >= 1"),
        ({"anchor_requests": -1}, "anchor-requests must be >= 0"),
    ],
)
def test_ttft_settings_reject_bad_sizes(overrides, message):
    with pytest.raises(ValueError, match=message):
        TTFTSettings(**overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_sizes": (1, 0)}, "batch sizes must be >= 1"),
        ({"batch_sizes": (), "limit": 2}, "at least one of the batch sizes"),
        ({"batch_sizes": (1, 4), "limit": 2}, "larger than the 2 questions"),
        ({"modes": ("dense", "fast")}, "unknown mode"),
        ({"modes": ("dense", "dense")}, "modes repeat"),
        ({"limit": 0}, "limit must be >= 1"),
        ({"agents": 1}, "agents counts the decision agent"),
        ({"task": "chess"}, "unknown task"),
    ],
)
def test_throughput_settings_reject_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        ThroughputSettings(**{"limit": 16, **overrides})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench-ttft", "--samples", "0"], "--samples must be >= 1"),
        (["bench-ttft", "--agents", "-2"], "--agents must be >= 1"),
        (["bench-ttft", "--prefix-tokens", "many"], "--prefix-tokens must be an integer"),
        (["bench-ttft", "--impl", "magic"], "invalid choice: 'magic'"),
        (["bench-throughput", "--task", "gsm8k", "--modes", "dense,turbo"], "unknown mode 'turbo'"),
        (["bench-throughput", "--task", "gsm8k", "--batch-sizes", "1,x"], "--batch-sizes must be an integer, got 'x'"),
        (["bench-throughput", "--task", "gsm8k", "--batch-sizes", "1,0"], "--batch-sizes must be >= 1"),
        (["bench-throughput", "--task", "gsm8k", "--limit", "0"], "--limit must be >= 1"),
        (["bench-throughput", "--task", "chess"], "invalid choice: 'chess'"),
        (["bench-throughput"], "the following arguments are required: --task"),
    ],
)
def test_bench_clis_reject_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-sizes", "1,8", "--limit", "4"], "batch size 8 is larger than the 4 questions"),
        (["--modes", "dense,dense"], "modes repeat"),
        (["--offset", "-1"], "offset must be >= 0"),
    ],
)
def test_bench_throughput_rejects_inconsistent_settings_before_loading_the_model(argv, message, capsys):
    assert main(["bench-throughput", "--task", "gsm8k", "--model", "no-such-model", *argv]) == 2
    assert message in capsys.readouterr().err
