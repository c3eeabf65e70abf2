"""Per-layer fidelity tables: layers of a sliding-window model listed by kind."""

import pytest

from kvcomm_jax.bench.fidelity import layer_kind_table


def _summary(kvcomm, rotate):
    return {"kvcomm_key": kvcomm, "rotate_only_key": rotate, "kvcomm_value": kvcomm, "rotate_only_value": rotate}


def test_layers_are_listed_by_kind_with_means_over_layers_after_the_first():
    summary = _summary([0.0, 0.1, 0.2, 0.5], [0.0, 0.3, 0.4, 0.4])
    rows = layer_kind_table(summary, [True, True, False, True]).splitlines()[2:]
    assert [r.split(" | ")[1] for r in rows[:4]] == ["local", "local", "global", "local"]
    assert rows[0].endswith("| no |")  # layer 0: equal errors are not below
    assert rows[1].endswith("| yes |") and rows[2].endswith("| yes |") and rows[3].endswith("| no |")
    local, global_ = rows[4], rows[5]
    assert local.startswith("| local 1+ (mean) | local | **0.3000** | **0.3500** |") and local.endswith("| no |")
    assert global_.startswith("| global 1+ (mean) | global | **0.2000** | **0.4000** |") and global_.endswith("| yes |")


def test_a_layer_count_mismatch_is_refused():
    with pytest.raises(ValueError, match="3 layer kinds for 4 layers"):
        layer_kind_table(_summary([0.0] * 4, [0.0] * 4), [True, False, True])
