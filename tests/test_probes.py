"""Fidelity probes: teacher-forced agreement with a dense reference, and the dense_bf16 pipeline mode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvcomm_jax.agents.graphs import make_graph
from kvcomm_jax.agents.pipeline import MODE_CHOICES, run_pipeline, summarize
from kvcomm_jax.agents.tasks import Example, get_task
from kvcomm_jax.kvcomm.engine import EngineConfig, KVCommEngine
from kvcomm_jax.kvcomm.plans import Plan
from kvcomm_jax.kvcomm.probes import (
    FidelityProbe,
    teacher_forced_metrics,
    with_capacity,
)
from kvcomm_jax.model.kv_cache import take_rows
from kvcomm_jax.model.registry import load_model, with_dtype
from kvcomm_jax.testing import tiny_loaded_model
from tests.test_engine import PROMPTS, QUESTIONS, SHORT_QUESTIONS

TOKENS = 16  # teacher-forced positions: with ~50-token prompts, more than a 64-slot cache holds


DENSE = [Plan("dense")]  # the plan of a dense row, for probes called directly


@pytest.fixture(scope="module")
def dense_engine():
    """A tiny dense engine probing every call against its own dense path."""
    probe = FidelityProbe(tokens=TOKENS, kv_errors=False, all_calls=True)
    return KVCommEngine(tiny_loaded_model(), PROMPTS, EngineConfig(mode="dense", max_new_tokens=4), probes=(probe,))


@pytest.fixture(scope="module")
def dense_rows(dense_engine):
    """Agent 0's calls for three questions and their dense prefill, cut to 64 slots (the prompts' bucket)."""
    engine = dense_engine
    calls = [engine.prepare_call(engine.new_request(q), 0) for q in QUESTIONS[:3]]
    first, cache, _, _ = engine.runner.prefill([c.ids for c in calls], calls[0].capacity, jax.random.PRNGKey(0))
    small = cache.replace(keys=cache.keys[:, :, :, :64], values=cache.values[:, :, :, :64], positions=cache.positions[:, :64])
    return engine, calls, small, first


def _perturbed(cache):
    """``cache`` with strong Gaussian noise on the values of every layer but the first."""
    noise = 3.0 * jax.random.normal(jax.random.PRNGKey(1), cache.values.shape, cache.values.dtype)  # [L, B, H, S, D]
    return cache.replace(values=cache.values + noise.at[0].set(0.0))


def _log_softmax(logits):
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_metrics_count_positions_up_to_the_first_stop_token():
    B, N, V, stop = 2, 4, 6, 5
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(B, N, V)).astype(np.float32)
    reference[..., 0] = 5.0  # the reference's argmax: token 0 everywhere
    probed = reference + 0.3 * rng.normal(size=(B, N, V)).astype(np.float32)
    probed[0, 2, 1] = probed[1, 3, 1] = 9.0  # argmax flips: row 0 after its stop token, row 1 at a counted position
    fed = np.array([[1, 2, stop, 3], [1, 2, 3, 4]], np.int32)  # row 0: d_2 is the stop token
    got = jax.device_get(teacher_forced_metrics(reference, probed, fed, jnp.asarray([stop], jnp.int32)))

    counted = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)  # the position predicting d_2 counts, later ones do not
    log_ref, log_probed = _log_softmax(reference), _log_softmax(probed)  # [B, N, V] float64
    kl = np.sum(np.exp(log_ref) * (log_ref - log_probed), axis=-1)  # [B, N]
    np.testing.assert_allclose(got["kl"], (kl * counted).sum(1) / counted.sum(1), rtol=1e-5)
    np.testing.assert_array_equal(got["teacher_forced_tokens"], [2, 4])
    np.testing.assert_allclose(got["top1_agreement"], [1.0, 0.75])
    np.testing.assert_array_equal(got["response_agreement"], [True, False])


def test_dense_against_itself_agrees_exactly(dense_engine):
    requests = [dense_engine.new_request(q) for q in QUESTIONS[:3]]
    for record in dense_engine.run_agents(requests, 0):
        f = record.fidelity
        assert f["kl"] <= 1e-7 and f["top1_agreement"] == 1.0 and f["response_agreement"] is True
        assert 1 <= f["teacher_forced_tokens"] <= TOKENS and f["first_token_agrees"] is True


def test_perturbed_cache_disagrees_and_a_small_cache_grows(dense_rows):
    engine, calls, cache, first = dense_rows
    assert cache.capacity < max(len(c.ids) for c in calls) - 1 + TOKENS  # the probe must grow it
    plans = DENSE * len(calls)
    found = FidelityProbe(tokens=TOKENS, kv_errors=False)(engine, calls, plans, _perturbed(cache), first, jax.random.PRNGKey(0))
    for f in found:
        assert f["kl"] > 1e-3 and f["top1_agreement"] < 1.0 and f["response_agreement"] is False
    exact = FidelityProbe(tokens=TOKENS, kv_errors=False)(engine, calls, plans, cache, first, jax.random.PRNGKey(0))
    assert all(f["kl"] == 0.0 and f["top1_agreement"] == 1.0 for f in exact)


def test_batched_rows_equal_one_by_one(dense_rows):
    engine, calls, cache, first = dense_rows
    probe, key = FidelityProbe(tokens=TOKENS, kv_errors=False), jax.random.PRNGKey(0)
    perturbed = _perturbed(cache)
    batched = probe(engine, calls, DENSE * len(calls), perturbed, first, key)
    for row, call in enumerate(calls):
        rows = jnp.asarray([row], jnp.int32)
        (alone,) = probe(engine, [call], DENSE, take_rows(perturbed, rows), first[rows], key)
        assert alone["teacher_forced_tokens"] == batched[row]["teacher_forced_tokens"]
        assert alone["top1_agreement"] == batched[row]["top1_agreement"]
        assert alone["kl"] == pytest.approx(batched[row]["kl"], rel=1e-4)


def test_with_capacity_pads_only_the_token_axis(dense_rows):
    _, _, cache, _ = dense_rows
    grown = with_capacity(cache, 80)
    assert grown.keys.shape == (*cache.keys.shape[:3], 80, cache.keys.shape[4]) and grown.positions.shape[1] == 80
    assert jnp.array_equal(grown.values[:, :, :, :64], cache.values) and not jnp.any(grown.keys[:, :, :, 64:])
    assert jnp.array_equal(grown.lengths, cache.lengths)
    assert with_capacity(cache, 32) is cache


def test_dense_bf16_mode_compares_every_call_with_float32_dense():
    model = tiny_loaded_model()
    bf16 = with_dtype(model, "bfloat16")
    assert bf16.config.dtype == "bfloat16" and model.config.dtype == "float32"
    assert {p.dtype for p in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    assert MODE_CHOICES["dense_bf16"] == ("dense_bf16",) and MODE_CHOICES["all"][-1] == "dense_bf16"

    task = get_task("gsm8k")
    graph = make_graph("full_connected", 2, task.worker_roles, task.decision_role)
    examples = [Example(f"q{i}", q, "8") for i, q in enumerate(QUESTIONS[:2])]
    summary, results = run_pipeline(
        model, task, graph, examples, ("dense_bf16",), EngineConfig(max_new_tokens=4), progress=False,
        batch_size=2, fidelity_tokens=8,
    )
    records = [r for row in results["dense_bf16"] for r in row.records]
    assert len(records) == 4 and all(1 <= r.fidelity["teacher_forced_tokens"] <= 8 for r in records)
    fidelity = summary["modes"]["dense_bf16"]["fidelity"]
    assert fidelity["calls"] == 4 and fidelity["kl"] > 0.0
    assert 0.0 <= fidelity["top1_agreement"] <= 1.0 and 0.0 <= fidelity["response_agreement"] <= 1.0

    # agreement with dense, the bf16 rows standing in for dense (which is not probed)
    summary = summarize({"dense": [dataclasses.replace(row, records=[]) for row in results["dense_bf16"]], **results}, [0, 1])
    assert summary["modes"]["dense"]["fidelity"] == {"top1_agreement": None, "kl": None, "response_agreement": None, "calls": 0}
    agreement = summary["agreement"]["dense_bf16"]
    assert set(agreement) == {"final_answer", "first_token", "first_token_calls", "response"}
    assert agreement["final_answer"] == 1.0 and 0.0 <= agreement["first_token"] <= 1.0
    assert agreement["first_token_calls"] == 4 and agreement["response"] == fidelity["response_agreement"]


@pytest.mark.real_model
def test_real_reuse_call_against_dense():
    probe = FidelityProbe(tokens=8)
    engine = KVCommEngine(load_model(), PROMPTS, EngineConfig(max_new_tokens=4, gamma=10.0), probes=(probe,))
    for question in QUESTIONS[:2]:  # two anchors, each longer than the next question, with agent 0's deltas
        engine.run_agent(engine.new_request(question), 0)
    request = engine.new_request(SHORT_QUESTIONS[0])
    record = engine.run_agent(request, 0)
    assert record.path == "reuse"
    f = record.fidelity
    assert f["kl"] >= 0.0 and 0.0 <= f["top1_agreement"] <= 1.0 and 1 <= f["teacher_forced_tokens"] <= 8
    assert len(f["key_error"]) == engine.model.config.num_layers and f["key_error"][0] < 1e-4  # layer 0 is exact

    call = engine.prepare_call(request, 0)
    first, dense, _, _ = engine.runner.prefill([call.ids], call.capacity, jax.random.PRNGKey(0))
    (same,) = FidelityProbe(tokens=8, kv_errors=False)(engine, [call], DENSE, dense, first, jax.random.PRNGKey(0))
    assert same["kl"] == 0.0 and same["top1_agreement"] == 1.0 and same["response_agreement"] is True
