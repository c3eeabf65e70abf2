"""Reuse plans: partial reuse, exact question, selective recompute and CacheBlend, on the recompute forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvcomm_jax.kvcomm.cacheblend import CHECK_LAYER, first_layers_deviation
from kvcomm_jax.kvcomm.engine import EngineConfig, KVCommEngine
from kvcomm_jax.kvcomm.layout import Layout, Span
from kvcomm_jax.kvcomm.plans import (
    add_selected,
    plan_call,
    plan_targets,
    selection_budget,
    selection_candidates,
)
from kvcomm_jax.kvcomm.reuse import build_reuse_cache
from kvcomm_jax.kvcomm.slot_book import SlotBook
from kvcomm_jax.model.generation import pad_prompts
from kvcomm_jax.model.registry import load_model
from kvcomm_jax.testing import tiny_loaded_model
from tests.test_engine import PROMPTS, QUESTIONS, SHORT_QUESTIONS

# prefix0 [0, 5), question [5, 12), prefix1 [12, 15), response [15, 25), prefix2 [25, 28)
LAYOUT = Layout.build(("user_question", "agent_0_current"), (5, 3, 3), (7, 10))
WARM_QUESTIONS = QUESTIONS[:3]  # the anchors every warm engine here starts from
SHORT_QUESTION = SHORT_QUESTIONS[0]


# ---- plans ----


def test_every_placeholder_reusable_computes_only_the_last_token():
    plan = plan_call(LAYOUT, [None, None], partial_reuse=True, exact_question=False)
    assert (plan.path, plan.reason, plan.spans, plan.exact) == ("reuse", None, (Span(27, 1),), ())


def test_a_blocked_placeholder_computes_everything_from_its_content_on():
    plan = plan_call(LAYOUT, [None, "{agent_0_current}: new"], partial_reuse=True, exact_question=False)
    assert (plan.path, plan.reason, plan.spans, plan.exact) == ("partial", "{agent_0_current}: new", (Span(15, 13),), (1,))
    dense = plan_call(LAYOUT, [None, "{agent_0_current}: new"], partial_reuse=False, exact_question=False)
    assert (dense.path, dense.reason, dense.spans) == ("dense", "{agent_0_current}: new", ())


def test_exact_question_computes_the_question_and_its_gate_no_longer_decides():
    plan = plan_call(LAYOUT, [None, None], partial_reuse=False, exact_question=True)
    assert (plan.path, plan.spans, plan.exact) == ("reuse", (Span(5, 7), Span(27, 1)), ())
    blocked = plan_call(LAYOUT, ["{user_question}: new", None], partial_reuse=False, exact_question=True)
    assert (blocked.path, blocked.spans, blocked.exact) == ("reuse", (Span(5, 10), Span(27, 1)), (0,))
    both = plan_call(LAYOUT, ["{user_question}: new", "{agent_0_current}: new"], partial_reuse=True, exact_question=True)
    assert (both.path, both.spans, both.exact) == ("partial", (Span(5, 23),), (0, 1))


def test_targets_and_candidates_follow_the_spans():
    plans = [
        plan_call(LAYOUT, [None, None], partial_reuse=True, exact_question=True),
        plan_call(LAYOUT, [None, "x"], partial_reuse=True, exact_question=False),
    ]
    targets, counts = plan_targets(plans)
    assert counts.tolist() == [8, 13]
    assert targets[0, :8].tolist() == [5, 6, 7, 8, 9, 10, 11, 27]
    assert targets[1, :13].tolist() == list(range(15, 28))
    candidates = selection_candidates(plans, [5, 5], 32)
    assert np.flatnonzero(candidates[0]).tolist() == list(range(12, 27))
    assert np.flatnonzero(candidates[1]).tolist() == list(range(5, 15))


def test_add_selected_takes_each_rows_best_candidates_in_order():
    rng = np.random.RandomState(0)
    scores = rng.rand(2, 40).astype(np.float32)
    candidates = np.zeros((2, 40), bool)
    candidates[:, 3:30] = True
    targets = np.array([[31, 32, 0], [30, 0, 0]], np.int32)
    counts = np.array([2, 1], np.int32)
    picks = np.array([4, 6], np.int32)
    out, new_counts = add_selected(targets, counts, scores, candidates, picks, extra=8)
    for b in range(2):
        ranked = sorted(np.flatnonzero(candidates[b]), key=lambda s: -scores[b, s])[: picks[b]]
        expected = sorted([*targets[b, : counts[b]], *ranked])
        assert np.asarray(out[b, : new_counts[b]]).tolist() == expected
        assert not np.asarray(out[b, new_counts[b] :]).any()
    assert np.asarray(new_counts).tolist() == [6, 7]


# ---- the engine's reuse forward under each plan (tiny model, float32) ----


def _relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _warm(config, model=None):
    """An engine whose pools hold both questions' anchors for both agents (gamma 10: shared when possible)."""
    engine = KVCommEngine(model or tiny_loaded_model(), PROMPTS, config)
    for question in WARM_QUESTIONS:
        request = engine.new_request(question)
        engine.run_agents([request], 0)
        engine.run_agents([request], 1)
    return engine


def _reuse_and_dense(engine, question, agent=1):
    """The reuse cache (after the call's forward) and a dense prefill's, for ``agent`` on a new request."""
    request = engine.new_request(question)
    for earlier in range(agent):
        engine.run_agent(request, earlier)
    call = engine.prepare_call(request, agent)
    plan = engine.strategy.decide(engine.context, call)
    key = jax.random.PRNGKey(0)
    first, cache, breakdown, _, computed = engine.reuse_prefill([call], [plan], call.capacity, key)
    dense_first, dense, _, _ = engine.runner.prefill([call.ids], call.capacity, key)
    return call, plan, (first, cache, breakdown, computed[0]), (dense_first, dense)


def _assert_equals_dense(cache, dense, n, tol=1e-5):
    for name in ("keys", "values"):
        assert _relative(getattr(cache, name)[:, 0, :, :n], getattr(dense, name)[:, 0, :, :n]) < tol, name


@pytest.mark.parametrize("mode", ["kvcomm", "cacheblend"])
def test_recomputing_every_approximated_token_equals_dense(mode):
    """Ratio 1: the selection adds every token after prefix 0, so the cache is the dense one."""
    engine = _warm(EngineConfig(mode=mode, max_new_tokens=4, gamma=10.0, recompute_ratio=1.0))
    call, plan, (first, cache, breakdown, computed), (dense_first, dense) = _reuse_and_dense(engine, SHORT_QUESTION)
    assert plan.path == "reuse" and set(breakdown) == {"correction_assembly", "forward"}
    assert computed == len(call.ids) - call.layout.prefix(0).length
    _assert_equals_dense(cache, dense, len(call.ids))
    assert int(first[0]) == int(dense_first[0])


def test_partial_plan_over_prefix_zero_equals_dense():
    """A blocked question: everything after prefix 0 computed in context over the exact template prefix."""
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, EngineConfig(max_new_tokens=4))
    call, plan, (first, cache, _, computed), (dense_first, dense) = _reuse_and_dense(engine, QUESTIONS[0], agent=0)
    assert plan.path == "partial" and "predicted a new anchor (fewer than two anchors held)" in plan.reason
    assert computed == len(call.ids) - call.layout.prefix(0).length
    _assert_equals_dense(cache, dense, len(call.ids))
    assert int(first[0]) == int(dense_first[0])


def test_exact_question_makes_the_question_exact():
    engine = _warm(EngineConfig(max_new_tokens=4, gamma=10.0, exact_question=True))
    call, plan, (_, cache, _, computed), (_, dense) = _reuse_and_dense(engine, SHORT_QUESTION)
    question = call.layout.content(0)
    assert plan.path == "reuse" and question in plan.spans and computed == question.length + 1
    for name in ("keys", "values"):
        got = getattr(cache, name)[:, 0, :, : question.end]  # prefix 0 and the question
        assert _relative(got, getattr(dense, name)[:, 0, :, : question.end]) < 1e-5, name
    # the rest is approximated: not the dense cache
    n = len(call.ids) - 1
    assert _relative(cache.values[1:, 0, :, question.end : n], dense.values[1:, 0, :, question.end : n]) > 1e-4


def test_selective_recompute_adds_the_rounded_share_of_approximated_tokens():
    engine = _warm(EngineConfig(max_new_tokens=4, gamma=10.0, recompute_ratio=0.25))
    call, plan, (_, cache, _, computed), (_, dense) = _reuse_and_dense(engine, SHORT_QUESTION)
    approximated = len(call.ids) - call.layout.prefix(0).length - 1
    assert plan.path == "reuse" and computed == 1 + round(0.25 * approximated)


@pytest.mark.parametrize("mode, ratio", [("kvcomm", 0.3), ("kvcomm", 0.0), ("cacheblend", 0.3), ("rotate_only", None)])
def test_the_reuse_program_equals_its_parts_run_one_after_another(mode, ratio):
    """``reuse_cache_and_targets`` then the forward = the strategy's cache, its selection scores,
    ``add_selected`` and the forward, each a program of its own."""
    engine = _warm(EngineConfig(mode=mode, max_new_tokens=4, gamma=10.0, recompute_ratio=ratio))
    request = engine.new_request(SHORT_QUESTION)
    engine.run_agent(request, 0)
    call = engine.prepare_call(request, 1)
    plan = engine.strategy.decide(engine.context, call)
    key = jax.random.PRNGKey(0)
    first, cache, _, _, computed = engine.reuse_prefill([call], [plan], call.capacity, key)

    parts = engine.strategy.build_cache(engine.context, [call], call.capacity)
    targets, counts = plan_targets([plan])
    tokens, _, lengths = pad_prompts([call.ids])
    scores = None
    if engine.strategy.score_rule == "first_layers":
        parts, scores = first_layers_deviation(engine.model.params, tokens, lengths, parts, engine.model.config)
    candidates = selection_candidates([plan], [call.layout.prefix(0).length], call.capacity)
    picks = selection_budget(ratio or 0.0, candidates)
    if picks.max() > 0:
        if scores is None:
            scores = _correction_sizes(engine, call)
        targets, counts = add_selected(targets, counts, scores, candidates, picks, extra=int(picks.max()))
    expected_first, expected, _, _ = engine.runner.recompute(tokens, targets, counts, parts, key)
    assert computed == [int(np.asarray(counts)[0])] and (computed[0] > 1) == bool(ratio)
    assert int(first[0]) == int(expected_first[0])
    n = len(call.ids)
    for name in ("keys", "values"):
        assert _relative(getattr(cache, name)[:, 0, :, :n], getattr(expected, name)[:, 0, :, :n]) < 1e-5, name


def _correction_sizes(engine, call):
    """How far KVCOMM's correction moved each token of ``call`` (``[1, S]``), from a program of its own."""
    i = engine.strategy.step_inputs(engine.context, [call])
    _, sizes = build_reuse_cache(
        i.placeholders, engine.runner.rope, i.prefix0, i.starts, i.lengths, capacity=call.capacity, apply_offsets=True,
        with_sizes=True,
    )
    return sizes


def test_record_counts_and_reasons_follow_the_plan():
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, EngineConfig(max_new_tokens=4, gamma=10.0))
    request = engine.new_request(QUESTIONS[0])
    record = engine.run_agent(request, 0)
    assert record.path == "partial" and record.reused_tokens + record.recomputed_tokens == record.prompt_tokens
    assert record.reason == "{user_question}: predicted a new anchor (fewer than two anchors held)"


def test_cacheblend_first_layers_are_fresh_and_deviation_is_measured_on_layer_one():
    model = tiny_loaded_model()
    config = model.config
    ids = [model.tokenizer.encode(q) for q in QUESTIONS[:2]]
    tokens, positions, lengths = pad_prompts(ids)
    engine = KVCommEngine(model, PROMPTS, EngineConfig(mode="dense", max_new_tokens=4))
    _, dense, _, _ = engine.runner.prefill(ids, 64, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    reused = dense.replace(values=dense.values + jnp.asarray(rng.normal(size=dense.values.shape), dense.values.dtype))
    expected = np.sqrt(np.sum(np.square(np.asarray(reused.values[CHECK_LAYER] - dense.values[CHECK_LAYER])), axis=(1, 3)))
    reused_later = np.asarray(reused.values[CHECK_LAYER + 1 :])
    cache, deviation = first_layers_deviation(model.params, tokens, lengths, reused, config)
    for b, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(np.asarray(deviation[b, :n]), expected[b, :n], rtol=1e-4)
        assert not np.asarray(deviation[b, n:]).any()
        assert _relative(cache.values[: CHECK_LAYER + 1, b, :, :n], dense.values[: CHECK_LAYER + 1, b, :, :n]) < 1e-5
    np.testing.assert_array_equal(np.asarray(cache.values[CHECK_LAYER + 1 :]), reused_later)  # later layers untouched


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(mode="rotate_only", recompute_ratio=0.1), "no rule to select"),
        (dict(mode="dense", recompute_ratio=0.1), "no rule to select"),
        (dict(mode="cacheblend", partial_reuse=False), "partial reuse off means nothing"),
    ],
)
def test_settings_that_mean_nothing_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        KVCommEngine(tiny_loaded_model(), PROMPTS, EngineConfig(**config))


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_recompute_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match=r"recompute_ratio must be in \[0, 1\]"):
        EngineConfig(recompute_ratio=ratio)


@pytest.mark.real_model
def test_real_model_partial_and_exact_plans_are_exact_where_computed():
    """On the default model: a partial call over prefix 0 is the dense cache, and the exact question is exact."""
    model = load_model()
    engine = KVCommEngine(model, PROMPTS, EngineConfig(max_new_tokens=8, exact_question=True))
    call, plan, (first, cache, _, _), (dense_first, dense) = _reuse_and_dense(engine, QUESTIONS[0], agent=0)
    assert plan.path == "reuse" and plan.exact == (0,)  # the question is new: it and prefix 1 are computed
    _assert_equals_dense(cache, dense, len(call.ids), tol=1e-4)
    assert int(first[0]) == int(dense_first[0])


def test_pool_telemetry_counts_anchors_hits_and_evictions():
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, EngineConfig(max_new_tokens=4, gamma=0.0, anchor_capacity=2))
    for question in WARM_QUESTIONS + (SHORT_QUESTION,):  # gamma 0: every content becomes an anchor
        request = engine.new_request(question)
        engine.run_agent(request, 0)
    stats = engine.anchors.stats()["user_question"]
    assert stats["anchors"] == 2 and stats["slots"] == 2 and len(stats["hits"]) == 2
    assert stats["evictions"] == 2  # the third and fourth questions each replaced one
    pool = engine.pools["user_question"]
    assert stats["bytes"] == sum(leaf.nbytes for leaf in jax.tree.leaves(pool)) > pool.keys.nbytes
    for name, pool in engine.pools.items():  # the device bookkeeping is the host book, written from it
        book, on_device = engine.anchors.books[name], SlotBook.read(pool)
        assert on_device.next_age == book.next_age and on_device.present.keys() == book.present.keys()
        for a, b in [(on_device.lengths, book.lengths), (on_device.valid, book.valid), (on_device.ages, book.ages),
                     (on_device.activations, book.activations), *zip(on_device.present.values(), book.present.values())]:
            np.testing.assert_array_equal(a, b)


def test_uncovered_tokens_of_a_reused_content_are_computed():
    plan = plan_call(LAYOUT, [None, None], partial_reuse=True, exact_question=False, uncovered=[Span(20, 5)])
    assert (plan.path, plan.spans) == ("reuse", (Span(20, 5), Span(27, 1)))


def test_anchor_coverage_reuses_a_content_longer_than_every_anchor():
    """Anchors from short questions serve a longer one: its uncovered tail is computed in context."""
    config = EngineConfig(max_new_tokens=4, gamma=10.0, anchor_coverage=True)
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, config)
    for question in SHORT_QUESTIONS[:2]:
        request = engine.new_request(question)
        engine.run_agent(request, 0)
    request = engine.new_request(QUESTIONS[1])  # longer than both anchors
    call = engine.prepare_call(request, 0)
    question = call.layout.content(0)
    covered = engine.anchors.covered("user_question", 0, question.length)
    assert 0 < covered < question.length
    plan = engine.strategy.decide(engine.context, call)
    assert plan.path == "reuse" and Span(question.start + covered, question.length - covered) in plan.spans
    gated = KVCommEngine(tiny_loaded_model(), PROMPTS, dataclasses.replace(config, anchor_coverage=False))
    gated.anchors.pools = engine.anchors.pools
    assert gated.strategy.decide(gated.context, call).path == "partial"  # the paper's gate blocks it
