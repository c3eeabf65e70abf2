"""KVCOMM's selection against CacheBlend's on the same calls, plans and budget."""

import pytest

from kvcomm_jax.kvcomm.engine import EngineConfig, KVCommEngine
from kvcomm_jax.kvcomm.selection_probe import (
    VARIANTS,
    SelectionProbe,
    selection_summary,
)
from kvcomm_jax.testing import tiny_loaded_model
from tests.test_engine import PROMPTS, QUESTIONS, SHORT_QUESTIONS


def _probed_records(ratio: float, questions=QUESTIONS[:2] + SHORT_QUESTIONS[:2]):
    """Agents 0 and 1 on the questions, in one engine probed by the selection probe; every record."""
    config = EngineConfig(max_new_tokens=4, gamma=10.0, recompute_ratio=ratio)
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, config, probes=(SelectionProbe(tokens=4),))
    records = []
    for question in questions:
        request = engine.new_request(question)
        records += [engine.run_agent(request, agent) for agent in (0, 1)]
    return records


@pytest.fixture(scope="module")
def full_budget_records():
    return _probed_records(1.0)


def test_a_full_budget_makes_every_selecting_variant_the_dense_cache(full_budget_records):
    probed = [r.fidelity for r in full_budget_records if r.fidelity]
    assert probed, "no reuse call was probed"
    for f in probed:
        assert f["selection_budget"] == f["approximated_tokens"]
        for variant in ("kvcomm", "kvcomm_cacheblend_rule", "cacheblend"):  # every approximated token recomputed
            assert f["selection"][variant]["top1_agreement"] == 1.0
            assert f["selection"][variant]["kl"] < 1e-6, variant
    # without selection the approximated tokens stay approximated: on the tiny model that shows
    approximating = [f for f in probed if f["approximated_tokens"] > 0]
    assert approximating and max(f["selection"]["kvcomm_no_selection"]["kl"] for f in approximating) > 1e-6


def test_summary_counts_only_calls_whose_budget_added_tokens():
    records = _probed_records(0.25)
    fidelities = [r.fidelity for r in records]
    counted = [f for f in fidelities if f and f["selection_budget"] > 0]
    summary = selection_summary(fidelities)
    assert summary["calls"] == len(counted) > 0
    assert set(VARIANTS) <= set(summary)
    added = sum(f["selection_budget"] for f in counted)
    assert summary["budget_share"] == added / sum(f["approximated_tokens"] for f in counted)
    assert summary["budget_share"] == pytest.approx(0.25, abs=0.15)  # rounding per call
    assert selection_summary([None, {"selection_budget": 0}]) is None


@pytest.mark.parametrize(
    "config, message",
    [(EngineConfig(mode="rotate_only", gamma=10.0, max_new_tokens=2), "not the 'rotate_only' mode"),
     (EngineConfig(gamma=10.0, max_new_tokens=2), "needs a recompute ratio above 0")],
)
def test_the_probe_refuses_engines_it_cannot_compare(config, message):
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, config, probes=(SelectionProbe(tokens=2),))
    with pytest.raises(ValueError, match=message):
        for question in QUESTIONS[:2]:
            request = engine.new_request(question)
            for agent in (0, 1):
                engine.run_agent(request, agent)
