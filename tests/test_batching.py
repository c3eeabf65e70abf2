"""Batched agent steps: B requests in one step give what the same requests give one by one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvcomm_jax.compile_counter import CompileCounter
from kvcomm_jax.kvcomm.engine import EngineConfig, KVCommEngine
from kvcomm_jax.model.generation import prefill
from kvcomm_jax.model.registry import load_model
from kvcomm_jax.testing import tiny_loaded_model
from tests.test_engine import PROMPTS, QUESTIONS, SHORT_QUESTIONS

# 15, 15 and 14 tokens with the tiny tokenizer: one length bucket, and the warm pools hold two
# anchors long enough for each
NEW_QUESTIONS = (
    "Tom has 3 pens and buys 2 more. How many pens?",
    "Sara had 8 candies and ate 3. How many are left?",
    "Ann has 5 pens and loses 2. How many remain?",
)


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _warm(engine, questions):
    for question in questions:
        request = engine.new_request(question)
        for agent in (0, 1):
            engine.run_agent(request, agent)


def _first_logits(engine, prompts, cache):
    """Logits of each row's last prompt token over ``cache`` (which holds all but that token): ``[B, V]``.

    ``prefill`` donates its cache, so it runs on a copy and ``cache`` stays usable.
    """
    cache = jax.tree.map(jnp.copy, cache)
    tokens = jnp.asarray([[ids[-1]] for ids in prompts], jnp.int32)
    positions = jnp.asarray([[len(ids) - 1] for ids in prompts], jnp.int32)
    _, logits, _ = prefill(
        engine.model.params, tokens, positions, jnp.ones((len(prompts),), jnp.int32), cache, jax.random.PRNGKey(0),
        engine.model.config, engine.config.sampling,
    )
    return logits


def test_batched_dense_prefill_logits_equal_one_by_one():
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, EngineConfig(mode="dense", max_new_tokens=4))
    prompts = [engine.model.tokenizer.encode(q) for q in QUESTIONS[:3]]  # 18, 20 and 17 tokens
    capacity = 64
    _, batched, _, _ = engine.runner.prefill(prompts, capacity, jax.random.PRNGKey(0))
    for row, ids in enumerate(prompts):
        _, alone, _, _ = engine.runner.prefill([ids], capacity, jax.random.PRNGKey(0))
        n = len(ids)
        assert _relative(batched.keys[:, row, :, :n], alone.keys[:, 0, :, :n]) < 1e-5
        assert _relative(batched.values[:, row, :, :n], alone.values[:, 0, :, :n]) < 1e-5
    # the last token's logits over a batch of caches holding the rest, against each row alone
    _, cache, _, _ = engine.runner.prefill([ids[:-1] for ids in prompts], capacity, jax.random.PRNGKey(0))
    batched_logits = _first_logits(engine, prompts, cache)  # [3, V]
    for row, ids in enumerate(prompts):
        _, alone, _, _ = engine.runner.prefill([ids[:-1]], capacity, jax.random.PRNGKey(0))
        assert _relative(batched_logits[row], _first_logits(engine, [ids], alone)[0]) < 1e-5


def test_batched_reuse_cache_and_logits_equal_one_by_one():
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, EngineConfig(max_new_tokens=8, gamma=10.0))
    _warm(engine, QUESTIONS[:3])
    requests = [engine.new_request(q) for q in SHORT_QUESTIONS]
    engine.run_agents(requests, 0)
    calls = [engine.prepare_call(r, 1) for r in requests]
    assert all(engine.strategy.decide(engine.context, c).reuses for c in calls)
    capacity = max(c.capacity for c in calls)
    batched = engine.strategy.build_cache(engine.context, calls, capacity)
    batched_logits = _first_logits(engine, [c.ids for c in calls], batched)
    for row, call in enumerate(calls):
        alone = engine.strategy.build_cache(engine.context, [call], capacity)
        n = len(call.ids) - 1
        assert _relative(batched.keys[:, row, :, :n], alone.keys[:, 0, :, :n]) < 1e-5
        assert _relative(batched.values[:, row, :, :n], alone.values[:, 0, :, :n]) < 1e-5
        assert _relative(batched_logits[row], _first_logits(engine, [call.ids], alone)[0]) < 1e-5


def test_batched_step_takes_the_same_paths_and_responses_when_pools_agree():
    """Two engines with identical pools: one runs three requests one by one, the other as one batch.

    With gamma high every content is shareable, so no prediction depends on an update made
    inside the step: the pool snapshots agree and so must the paths and greedy responses.
    """
    model = tiny_loaded_model()
    config = EngineConfig(max_new_tokens=6, gamma=10.0)
    single, batched = KVCommEngine(model, PROMPTS, config), KVCommEngine(model, PROMPTS, config)
    for engine in (single, batched):
        _warm(engine, QUESTIONS[:3])
    one_by_one = []
    for question in NEW_QUESTIONS:
        request = single.new_request(question)
        one_by_one.append([single.run_agent(request, agent) for agent in (0, 1)])
    requests = [batched.new_request(q) for q in NEW_QUESTIONS]
    together = list(zip(*[batched.run_agents(requests, agent) for agent in (0, 1)]))
    paths = [[r.path for r in records] for records in one_by_one]
    assert paths == [[r.path for r in records] for records in together]
    assert "reuse" in sum(paths, [])
    assert [[r.response_ids for r in x] for x in one_by_one] == [[r.response_ids for r in x] for x in together]


def test_run_agents_rejects_an_empty_batch():
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, EngineConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="at least one request"):
        engine.run_agents([], 0)


@pytest.mark.real_model
def test_dense_responses_in_a_batch_equal_one_by_one_on_the_real_model():
    model = load_model()
    config = EngineConfig(mode="dense", max_new_tokens=16)
    single, batched = KVCommEngine(model, PROMPTS, config), KVCommEngine(model, PROMPTS, config)
    questions = QUESTIONS
    alone = []
    for question in questions:
        request = single.new_request(question)
        alone.append([single.run_agent(request, agent).response_ids for agent in (0, 1)])
    requests = [batched.new_request(q) for q in questions]
    together = list(zip(*[[r.response_ids for r in batched.run_agents(requests, agent)] for agent in (0, 1)]))
    assert [list(x) for x in together] == alone


def _questions(first: int, count: int) -> list[str]:
    """``count`` questions of one shape (17-20 tokens with the tiny tokenizer), numbers from ``first`` on."""
    names = ("Tom", "Sara", "Ann", "Ben", "Mia")
    return [
        f"{names[i % 5]} has {first + i} apples and buys {i % 7 + 2} more. How many apples does {names[i % 5]} have?"
        for i in range(count)
    ]


def test_a_warm_engine_compiles_nothing_in_steady_state():
    """After 20 questions have filled the pools (two slots, full from the start), 20 new questions of the
    same length buckets run without a single compilation."""
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, EngineConfig(max_new_tokens=4, gamma=10.0, anchor_capacity=2))
    _warm(engine, _questions(10, 20))
    with CompileCounter() as counter:
        records = [engine.run_agent(engine.new_request(q), agent) for q in _questions(40, 20) for agent in (0,)]
    assert counter.count == 0
    assert all(r.compile_ms == 0.0 for r in records)
    assert sum(r.path == "reuse" for r in records) >= 10  # the steady state reuses
    assert all(pool.slots == 2 for pool in engine.pools.values())


def _short_questions(first: int, count: int) -> list[str]:
    """``count`` questions of 14-16 tokens with the tiny tokenizer (a smaller length bucket than :func:`_questions`)."""
    names = ("Tom", "Sara", "Ann", "Ben", "Mia")
    return [f"{names[i % 5]} has {first + i} pens and loses {i % 3 + 1}. How many remain?" for i in range(count)]


def test_a_warm_batched_engine_compiles_nothing_for_new_questions():
    """Batches of 4 requests through two agents: once 20 long questions have filled the pools (their
    slot axes grown to capacity) and a batch of short ones has met the forward width short questions
    need (under half the long ones', so they get their own program), 20 new questions in batches of
    short ones and of short and long mixed run without a compilation: contents are corrected and
    written at their pools' widths, so a batch of shorter contents meets the programs longer ones compiled."""
    config = EngineConfig(max_new_tokens=4, ignore_eos=True, gamma=10.0, anchor_capacity=4, exact_question=True,
                          recompute_ratio=0.2)
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, config)
    tokenizer = engine.model.tokenizer
    assert {len(tokenizer.encode_segment(q)) for q in _short_questions(0, 5)} <= set(range(9, 17))  # bucket 16
    assert {len(tokenizer.encode_segment(q)) for q in _questions(0, 5)} <= set(range(17, 33))  # bucket 32

    def run(questions):
        records = []
        for start in range(0, len(questions), 4):
            requests = [engine.new_request(q) for q in questions[start : start + 4]]
            for agent in (0, 1):
                records += engine.run_agents(requests, agent)
        return records

    run(_questions(10, 20))
    with CompileCounter() as counter:
        run(_short_questions(30, 4))
    assert counter.count > 0  # the short questions' own forward width
    mixed = [q for pair in zip(_questions(40, 4), _short_questions(40, 4)) for q in pair]
    with CompileCounter() as counter:
        records = run(_short_questions(60, 12) + mixed)
    assert counter.count == 0
    assert all(pool.slots == 4 for pool in engine.pools.values())
    assert sum(r.path == "reuse" for r in records) >= 30  # the steady state reuses


def test_step_sizes_settle_on_the_largest_needed_but_never_pad_past_twice_the_need():
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, EngineConfig(max_new_tokens=4))
    assert [engine._settled(("rows", 0), n) for n in (4, 10, 7, 5, 4, 10, 12)] == [4, 10, 10, 10, 4, 10, 12]
    assert engine._settled(("rows", 1), 3) == 3  # sizes are kept per key
