"""The command line, end to end on the real model, and its errors for bad input."""

import json

import pytest

from kvcomm_jax.cli import main


@pytest.mark.real_model
def test_pipeline_both_modes_writes_the_documented_json(tmp_path, capsys):
    out, plot = tmp_path / "run.json", tmp_path / "ttft.png"
    code = main([
        "pipeline", "--task", "gsm8k", "--agents", "3", "--mode", "both", "--limit", "2", "--max-new-tokens", "16",
        "--json", str(out), "--plot", str(plot),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["task"] == "gsm8k" and result["agents"] == 3 and result["questions"] == 2
    assert "SmolLM2-135M-Instruct" in result["model"]
    assert set(result["modes"]) == {"dense", "kvcomm"}
    for mode in result["modes"].values():
        assert 0.0 <= mode["accuracy"] <= 1.0
        assert 0.0 <= mode["reuse_rate"] <= 1.0 and 0.0 <= mode["token_reuse_rate"] <= 1.0
        assert mode["ttft_ms"]["mean"] > 0 and mode["ttft_ms"]["median"] > 0
        assert len(mode["ttft_ms"]["per_agent"]) == 3
    assert result["modes"]["dense"]["reuse_rate"] == 0.0
    assert set(result["agreement"]) >= {"final_answer", "first_token"}
    assert 0.0 <= result["agreement"]["final_answer"] <= 1.0
    assert len(result["calls"]["kvcomm"]) == 2 and len(result["calls"]["kvcomm"][0]["records"]) == 3
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
