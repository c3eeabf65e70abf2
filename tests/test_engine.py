"""The KVCOMM engine end to end: exactness, reuse path, compilation, decisions and bad input."""


import jax
import jax.numpy as jnp
import pytest

from kvcomm_jax.compile_counter import CompileCounter
from kvcomm_jax.kvcomm.anchor_pool import empty_pool
from kvcomm_jax.kvcomm.engine import EngineConfig, KVCommEngine
from kvcomm_jax.kvcomm.layout import Span
from kvcomm_jax.kvcomm.plans import Plan
from kvcomm_jax.kvcomm.strategies import RotateOnly
from kvcomm_jax.kvcomm.templates import AgentPrompt
from kvcomm_jax.model.kv_cache import init_cache
from kvcomm_jax.model.registry import load_model
from kvcomm_jax.model.rope import apply_rope, inverse_frequencies
from kvcomm_jax.model.transformer import forward, forward_last
from kvcomm_jax.testing import tiny_loaded_model

PROMPTS = (
    AgentPrompt(0, "You are a careful math solver.", "The task is:\n\n{user_question}\nSolve it step by step."),
    AgentPrompt(
        1,
        "You are the final decision maker.",
        "The task is:\n\n{user_question}\nAgent 0 as a solver answered: {agent_0_current}\nGive the final answer.",
    ),
)
QUESTIONS = (
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A train travels 60 miles per hour for 2 hours. How far does it go?",
    "Sara had 10 candies and ate 4. How many candies are left?",
    "There are 7 birds on a tree and 3 fly away. How many birds remain?",
)
# Shorter than every question above (so two anchors are long enough to serve them) but in the
# same 17-32 token bucket (so serving them compiles nothing new).
SHORT_QUESTIONS = (
    "Ann has 4 pens and loses 1 of them. How many pens remain?",
    "A cat has 4 legs. How many legs do 2 big cats have?",
)


def _relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _dense_cache(engine, call):
    first, cache, _, _ = engine.runner.prefill([call.ids], call.capacity, jax.random.PRNGKey(0))
    return first, cache


@pytest.mark.real_model
def test_rotating_cached_keys_equals_computing_them_at_the_new_positions():
    model = load_model()
    c = model.config
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog near the river bank.")
    n, delta = len(ids), 37
    tokens = jnp.asarray([ids], jnp.int32)
    _, at_zero = forward(model.params, tokens, jnp.arange(n)[None], init_cache(c, 1, 64), c)
    _, shifted = forward(model.params, tokens, jnp.arange(n)[None] + delta, init_cache(c, 1, 64), c)
    inv = inverse_frequencies(c)
    rotated = apply_rope(at_zero.keys[:, 0, :, :n], jnp.full((n,), delta), inv)  # [L, H, n, D]
    for layer in range(c.num_layers):
        assert _relative(rotated[layer], shifted.keys[layer, 0, :, :n]) < 1e-5, layer
        assert _relative(at_zero.values[layer, 0, :, :n], shifted.values[layer, 0, :, :n]) < 1e-5, layer


@pytest.mark.real_model
def test_single_anchor_from_the_same_request_reproduces_the_dense_cache():
    engine = KVCommEngine(load_model(), PROMPTS, EngineConfig(max_new_tokens=16, partial_reuse=False))
    request = engine.new_request(QUESTIONS[0])
    for agent in (0, 1):
        assert engine.run_agent(request, agent).path == "dense"  # empty pools: contents become anchors
    for agent in (0, 1):
        call = engine.prepare_call(request, agent)
        assert all(int(engine.anchors.books[n].valid.sum()) == 1 for n in call.contents)
        plan = Plan("reuse", spans=(Span(len(call.ids) - 1, 1),))  # forced: the gate would call these new anchors
        first, cache, _, _, computed = engine.reuse_prefill([call], [plan], call.capacity, jax.random.PRNGKey(0))
        assert computed == [1]
        dense_first, dense = _dense_cache(engine, call)
        n = len(call.ids) - 1
        for layer in range(engine.model.config.num_layers):
            assert _relative(cache.keys[layer, 0, :, :n], dense.keys[layer, 0, :, :n]) < 1e-4, layer
            assert _relative(cache.values[layer, 0, :, :n], dense.values[layer, 0, :, :n]) < 1e-4, layer
        assert int(first[0]) == int(dense_first[0])
        assert int(first[0]) == request.records[agent].first_token


@pytest.fixture(scope="module")
def warm_engine():
    """Real model, gamma high enough that every content with two anchors is shared; three requests run."""
    engine = KVCommEngine(load_model(), PROMPTS, EngineConfig(max_new_tokens=8, gamma=10.0))
    for question in QUESTIONS[:3]:
        request = engine.new_request(question)
        for agent in (0, 1):
            engine.run_agent(request, agent)
    return engine


@pytest.mark.real_model
def test_reuse_cache_keeps_layer_zero_exact_and_corrects_other_layers(warm_engine):
    request = warm_engine.new_request(SHORT_QUESTIONS[0])
    warm_engine.run_agent(request, 0)
    call = warm_engine.prepare_call(request, 1)
    assert warm_engine.strategy.decide(warm_engine.context, call).reuses
    corrected = warm_engine.reuse_cache(call)
    rotated = warm_engine.reuse_cache(call, RotateOnly())
    _, dense = _dense_cache(warm_engine, call)
    n = len(call.ids) - 1
    assert _relative(corrected.keys[0, 0, :, :n], dense.keys[0, 0, :, :n]) < 1e-5
    assert _relative(corrected.values[0, 0, :, :n], dense.values[0, 0, :, :n]) < 1e-5
    deep_corrected = _relative(corrected.values[1:, 0, :, :n], dense.values[1:, 0, :, :n])
    deep_rotated = _relative(rotated.values[1:, 0, :, :n], dense.values[1:, 0, :, :n])
    assert deep_corrected > 1e-3  # other contexts: an approximation, not a copy
    assert deep_corrected < deep_rotated  # the offsets move the cache towards dense


@pytest.mark.real_model
def test_reuse_path_uses_the_corrected_cache_and_runs_one_token(warm_engine, monkeypatch):
    request = warm_engine.new_request(SHORT_QUESTIONS[1])
    warm_engine.run_agent(request, 0)
    call = warm_engine.prepare_call(request, 1)
    cache = warm_engine.reuse_cache(call)
    c = warm_engine.model.config
    last = (jnp.asarray([[call.ids[-1]]]), jnp.asarray([[len(call.ids) - 1]]))
    logits, _ = forward_last(warm_engine.model.params, *last, cache, c, jnp.ones((1,), jnp.int32))
    perturbed = cache.replace(keys=cache.keys.at[5, 0, :, 10:20].multiply(-1.0))
    logits_p, _ = forward_last(warm_engine.model.params, *last, perturbed, c, jnp.ones((1,), jnp.int32))
    assert float(jnp.abs(logits - logits_p).max()) > 1e-3

    widths = []
    real_recompute = warm_engine.runner.recompute

    def recording_recompute(tokens, targets, *args):
        widths.append(tuple(jnp.shape(targets)))
        return real_recompute(tokens, targets, *args)

    monkeypatch.setattr(warm_engine.runner, "recompute", recording_recompute)
    record = warm_engine.run_agent(request, 1)
    assert record.path == "reuse"
    assert widths == [(1, 1)]  # one one-token forward
    assert record.reused_tokens == record.prompt_tokens - 1
    assert set(record.breakdown_ms) == {"correction_assembly", "forward"}


def test_similar_request_reuses_without_recompiling():
    engine = KVCommEngine(tiny_loaded_model(), PROMPTS, EngineConfig(max_new_tokens=8, gamma=10.0))
    for question in QUESTIONS[:3]:
        request = engine.new_request(question)
        for agent in (0, 1):
            engine.run_agent(request, agent)
    request = engine.new_request(SHORT_QUESTIONS[0])
    with CompileCounter() as counter:
        records = [engine.run_agent(request, agent) for agent in (0, 1)]
    assert [r.path for r in records] == ["reuse", "reuse"]
    assert counter.count == 0
    assert all(r.compile_ms == 0.0 for r in records)


def test_compilation_is_reported_apart_from_ttft():
    model = tiny_loaded_model(seed=5, intermediate_size=40)  # shapes no other test compiles
    engine = KVCommEngine(model, PROMPTS[:1], EngineConfig(mode="dense", max_new_tokens=4))
    first = engine.run_agent(engine.new_request(QUESTIONS[0] + " Think."), 0)
    again = engine.run_agent(engine.new_request(QUESTIONS[0] + " Think."), 0)
    assert first.compile_ms > 0.0 and again.compile_ms == 0.0
    assert first.ttft_ms < 10 * again.ttft_ms + 50  # the compilation is not inside the first TTFT


@pytest.mark.parametrize("partial_reuse", [False, True])
def test_agent_without_its_own_deltas_does_not_reuse_that_placeholder(partial_reuse):
    model = tiny_loaded_model()
    engine = KVCommEngine(model, PROMPTS, EngineConfig(max_new_tokens=4, gamma=10.0, partial_reuse=partial_reuse))
    for question in QUESTIONS[:2]:
        request = engine.new_request(question)
        engine.run_agent(request, 0)
        engine.run_agent(request, 1)
    # drop agent 1's deltas from the question pool: it may no longer reuse
    pools = dict(engine.pools)
    pools["user_question"] = pools["user_question"].replace(consumers={"0": pools["user_question"].consumers["0"]})
    engine.anchors.replace_all(pools)  # as a restored checkpoint: the bookkeeping is read from the pools
    request = engine.new_request(SHORT_QUESTIONS[0])
    assert engine.run_agent(request, 0).path == "reuse"
    record = engine.run_agent(request, 1)
    assert record.reason == "{user_question}: no anchor holds agent 1's deltas"
    if partial_reuse:  # everything from the question on is computed in context; prefix 0 is reused
        call = engine.prepare_call(request, 1)
        assert record.path == "partial"
        assert record.recomputed_tokens == len(call.ids) - call.layout.content(0).start
        assert record.reused_tokens == call.layout.prefix(0).length
    else:
        assert record.path == "dense" and record.reused_tokens == 0


def test_dense_and_rotate_only_modes_share_the_code_path():
    model = tiny_loaded_model()
    dense = KVCommEngine(model, PROMPTS, EngineConfig(mode="dense", max_new_tokens=4))
    rotate = KVCommEngine(model, PROMPTS, EngineConfig(mode="rotate_only", max_new_tokens=4, gamma=10.0))
    for question in QUESTIONS[:2] + SHORT_QUESTIONS[:1]:
        rd, rr = dense.new_request(question), rotate.new_request(question)
        for agent in (0, 1):
            assert dense.run_agent(rd, agent).path == "dense"
            rotate.run_agent(rr, agent)
    assert not dense.pools
    assert rr.records[0].path == "reuse" and rr.records[0].breakdown_ms["correction_assembly"] >= 0
    # rotate-only skips the offsets: every reused value (values are never rotated) is its base's, bit for bit
    call = rotate.prepare_call(rr, 1)
    cache = rotate.reuse_cache(call)
    template_kv = rotate.templates.kv(1)
    for i, name in enumerate(call.layout.placeholders):
        for span, base in ((call.layout.content(i), call.contents[name].base), (call.layout.prefix(i + 1), template_kv.prefix(i + 1))):
            got = cache.values[:, 0, :, span.start : span.end]  # [L, H, n, D]
            assert jnp.array_equal(got, base.values[:, :, : span.length]), (name, span)


def test_bad_input_gives_clear_errors():
    model = tiny_loaded_model()
    with pytest.raises(ValueError, match=r"unknown placeholder \{agent_x\}"):
        KVCommEngine(model, [AgentPrompt(0, "s", "{agent_x}")])
    with pytest.raises(ValueError, match="there is no agent 3"):
        KVCommEngine(model, [AgentPrompt(0, "s", "{user_question} {agent_3_current}")])
    with pytest.raises(ValueError, match="unknown mode"):
        KVCommEngine(model, PROMPTS, EngineConfig(mode="fast"))
    engine = KVCommEngine(model, PROMPTS, EngineConfig(max_new_tokens=4))
    request = engine.new_request(QUESTIONS[0])
    with pytest.raises(ValueError, match=r"\{condition_0_current\} is referenced by no agent"):
        engine.set_condition(request, 0, "42")
    with pytest.raises(ValueError, match="agent 0 has not run"):
        engine.run_agent(request, 1)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        engine.new_request("word " * 9000)
    with pytest.raises(ValueError, match="empty"):
        engine.new_request("   ")
    c = model.config
    wrong = empty_pool(4, c.num_layers + 1, c.num_kv_heads, c.head_dim, 16, jnp.float32)
    with pytest.raises(ValueError, match="KV shape"):
        engine.set_pools({"user_question": wrong})
