"""scripts/bench_compiles.py: compilations per window of one engine's run."""

import importlib.util
import os

import pytest

from kvcomm_jax.testing import tiny_loaded_model

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_compiles.py")
_spec = importlib.util.spec_from_file_location("bench_compiles", _PATH)
bench_compiles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_compiles)


def test_windows_count_what_compiled_and_the_second_compiles_less(capsys):
    args = bench_compiles.parse_args(["--model", "tiny", "--agents", "3", "--windows", "2", "--window", "4",
                                      "--batch-size", "2", "--max-new-tokens", "4"])
    rows = bench_compiles.measure_windows(tiny_loaded_model(), args)
    assert [(r["window"], r["questions"]) for r in rows] == [(1, 4), (2, 4)]
    assert rows[0]["compiles"] > 0 and rows[0]["compile_s"] > 0  # a cold process compiles
    assert rows[1]["compiles"] < rows[0]["compiles"]  # the second window meets programs the first compiled
    assert all(r["wall_s"] > 0 and 0 <= r["reuse_rate"] <= 1 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "8", "--window", "4"], "larger than a window"),
    (["--agents", "1"], "must be >= 2"),
    (["--windows", "0"], "must be >= 1"),
])
def test_bad_settings_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_compiles.parse_args(argv)
    assert message in capsys.readouterr().err
