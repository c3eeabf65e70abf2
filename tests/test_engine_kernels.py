"""The reuse path through the Pallas kernels (interpret mode) equals the jnp reference path,
on one device and with the kernels under ``shard_map`` on a ``data=2,model=4`` mesh."""

import numpy as np

from kvcomm_jax.kvcomm.engine import EngineConfig, KVCommEngine
from kvcomm_jax.scale.sharding import make_mesh
from kvcomm_jax.testing import tiny_loaded_model
from tests.test_engine import PROMPTS, QUESTIONS, SHORT_QUESTIONS


def assert_same_reuse_path(reference: KVCommEngine, other: KVCommEngine, atol: float) -> None:
    """Both engines run the same 4 questions (agents 0, 1); the last request's calls reuse in both,
    with the same first tokens and responses, and the same reuse caches within ``atol``."""
    last = {}
    for name, engine in (("reference", reference), ("other", other)):
        for question in QUESTIONS[:3] + SHORT_QUESTIONS[:1]:
            request = engine.new_request(question)
            for agent in (0, 1):
                engine.run_agent(request, agent)
        last[name] = request
    ref, got = last["reference"], last["other"]
    assert [r.path for r in ref.records] == [r.path for r in got.records] == ["reuse", "reuse"]
    assert [r.first_token for r in ref.records] == [r.first_token for r in got.records]
    assert [r.response_ids for r in ref.records] == [r.response_ids for r in got.records]
    for agent in (0, 1):
        calls = [engine.prepare_call(request, agent) for engine, request in ((reference, ref), (other, got))]
        caches = [engine.reuse_cache(call) for engine, call in zip((reference, other), calls)]
        n = len(calls[0].ids) - 1
        for field in ("keys", "values"):
            a, b = (np.asarray(getattr(c, field)[:, 0, :, :n]) for c in caches)  # [L, H, n, D]
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=f"agent {agent} {field}")


def test_interpret_kernels_match_reference_on_the_whole_reuse_path():
    model = tiny_loaded_model(seed=3)
    assert_same_reuse_path(
        KVCommEngine(model, PROMPTS, EngineConfig(max_new_tokens=6, gamma=10.0, impl="reference")),
        KVCommEngine(model, PROMPTS, EngineConfig(max_new_tokens=6, gamma=10.0, impl="interpret")),
        atol=1e-6,
    )


def test_engine_runs_the_kernels_on_the_mesh():
    """Interpret kernels on ``data=2,model=4`` (heads over model, anchors over data) against one device's reference."""
    model = tiny_loaded_model(num_heads=8, num_kv_heads=4, head_dim=8, hidden_size=64)
    sharded = KVCommEngine(model, PROMPTS, EngineConfig(max_new_tokens=6, gamma=10.0, impl="interpret"), mesh=make_mesh("data=2,model=4"))
    assert_same_reuse_path(KVCommEngine(model, PROMPTS, EngineConfig(max_new_tokens=6, gamma=10.0, impl="reference")), sharded, atol=1e-5)
    for pool in sharded.pools.values():  # the kernels' anchors are spread over data
        assert pool.keys.sharding.spec[0] == "data"
