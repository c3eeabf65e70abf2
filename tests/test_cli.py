"""The command line, end to end on the real model, and its errors for bad input."""

import json

import pytest

from kvcomm_jax.cli import main


def _paths(rows):
    return [[record["path"] for record in row["records"]] for row in rows]


@pytest.mark.real_model
def test_pipeline_both_modes_reuses_and_writes_the_documented_json(tmp_path, capsys):
    # GSM8K questions 16-18 are 53, 58 and 29 tokens long: after two questions every pool holds two
    # anchors long enough for the third question's contents, and gamma 100 lets it share them.
    out, plot = tmp_path / "run.json", tmp_path / "ttft.png"
    code = main([
        "pipeline", "--task", "gsm8k", "--agents", "3", "--mode", "both", "--offset", "16", "--limit", "3",
        "--max-new-tokens", "4", "--gamma", "100", "--json", str(out), "--plot", str(plot),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert (result["task"], result["agents"], result["questions"], result["offset"]) == ("gsm8k", 3, 3, 16)
    assert "SmolLM2-135M-Instruct" in result["model"]
    assert set(result["modes"]) == set(result["calls"]) == {"dense", "kvcomm"}
    calls = result["calls"]
    assert _paths(calls["dense"]) == [["dense"] * 3] * 3
    kvcomm_paths = _paths(calls["kvcomm"])
    # fewer than two anchors per pool: every content is an anchor, computed in context after prefix 0
    assert kvcomm_paths[:2] == [["partial"] * 3] * 2
    assert kvcomm_paths[2][0] == "reuse"  # agent 0 reads only the question, which two anchors now serve
    for mode, rows in calls.items():
        records = [r for row in rows for r in row["records"]]
        summary = result["modes"][mode]
        assert summary["calls"] == len(records) == 9
        assert summary["accuracy"] == pytest.approx(sum(row["correct"] for row in rows) / 3)
        assert summary["reuse_rate"] == pytest.approx(sum(r["path"] == "reuse" for r in records) / 9)
        assert summary["partial_reuse_rate"] == pytest.approx(sum(r["path"] == "partial" for r in records) / 9)
        reused = sum(r["reused_tokens"] for r in records)
        assert summary["token_reuse_rate"] == pytest.approx(reused / sum(r["prompt_tokens"] for r in records))
        reusing = [r for r in records if r["path"] != "dense"]
        recomputed = sum(r["recomputed_tokens"] for r in reusing) / max(1, sum(r["prompt_tokens"] for r in reusing))
        assert summary["recomputed_token_rate"] == pytest.approx(recomputed)
        assert sum(summary["reasons"].values()) == sum(r["path"] != "reuse" for r in records)
        assert summary["ttft_ms"]["mean"] > 0 and summary["ttft_ms"]["median"] > 0
        assert len(summary["ttft_ms"]["per_agent"]) == 3
    kvcomm = [r for row in calls["kvcomm"] for r in row["records"]]
    assert all(r["reused_tokens"] == r["prompt_tokens"] - 1 for r in kvcomm if r["path"] == "reuse")
    assert all(r["reused_tokens"] + r["recomputed_tokens"] == r["prompt_tokens"] for r in kvcomm)
    assert all(0 <= r["fidelity"]["top1_agreement"] <= 1 and r["fidelity"]["kl"] >= 0 for r in kvcomm)
    fidelity = result["modes"]["kvcomm"]["fidelity"]
    assert fidelity["calls"] == 9
    assert fidelity["top1_agreement"] == pytest.approx(sum(r["fidelity"]["top1_agreement"] for r in kvcomm) / 9)
    assert result["modes"]["kvcomm"]["pools"]["user_question"]["anchors"] == 2
    agreement = result["agreement"]["kvcomm"]
    assert agreement["first_token_calls"] == 9
    same = [a["answer"] == d["answer"] for a, d in zip(calls["kvcomm"], calls["dense"], strict=True)]
    assert agreement["final_answer"] == pytest.approx(sum(same) / 3)
    assert plot.stat().st_size > 0
    assert "| dense |" in capsys.readouterr().out


@pytest.mark.real_model
def test_perplexity_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert main(["perplexity", "--text", "The quick brown fox jumps over the lazy dog.", "--json", str(out)]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("perplexity: ")]
    value = float(line[0].split(": ")[1])
    result = json.loads(out.read_text())
    assert result["perplexity"] == pytest.approx(value, rel=1e-4) and result["tokens"] == 10


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pipeline", "--task", "chess"], "invalid choice: 'chess'"),
        (["pipeline", "--task", "gsm8k", "--agents", "1"], "counts the decision agent"),
        (["pipeline", "--task", "gsm8k", "--limit", "0"], "--limit must be >= 1"),
        (["pipeline", "--task", "gsm8k", "--recompute-ratio", "1.5"], "--recompute-ratio must be in [0, 1]"),
        (["pipeline", "--task", "gsm8k", "--recompute-ratio", "-0.1"], "--recompute-ratio must be in [0, 1]"),
        (["pipeline", "--task", "gsm8k", "--recompute-ratio", "half"], "--recompute-ratio must be a number"),
        (["pipeline", "--task", "gsm8k", "--mode", "no_such_plan"], "invalid choice: 'no_such_plan'"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_json_path_fails_before_any_work(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")
    code = main(["pipeline", "--task", "gsm8k", "--limit", "1", "--json", str(blocked / "out.json")])
    assert code == 2
    assert "is not writable" in capsys.readouterr().err


def test_unknown_model_name_is_reported(capsys):
    assert main(["generate", "--prompt", "hi", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mode", "cacheblend", "--no-partial-reuse"], "--no-partial-reuse: no mode of --mode cacheblend"),
        (["--mode", "rotate_only", "--recompute-ratio", "0.1"], "--recompute-ratio: no mode of --mode rotate_only"),
        (["--mode", "dense", "--recompute-ratio", "0.1"], "--recompute-ratio: no mode of --mode dense"),
    ],
)
def test_plan_settings_no_chosen_mode_uses_are_refused_before_any_work(argv, message, capsys):
    assert main(["pipeline", "--task", "gsm8k", "--limit", "1", *argv]) == 2
    assert message in capsys.readouterr().err
