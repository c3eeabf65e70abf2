"""The engine on an 8-device simulated CPU mesh gives the single-device results."""

import jax
import numpy as np

from kvcomm_jax.kvcomm.engine import EngineConfig, KVCommEngine
from kvcomm_jax.kvcomm.probes import kv_fidelity
from kvcomm_jax.scale.sharding import make_mesh
from kvcomm_jax.testing import tiny_loaded_model
from tests.test_engine import PROMPTS, QUESTIONS, SHORT_QUESTIONS


def _run(engine):
    records = []
    for question in QUESTIONS[:3] + SHORT_QUESTIONS:
        request = engine.new_request(question)
        records += [engine.run_agent(request, agent) for agent in (0, 1)]
    return records


def test_sharded_engine_matches_single_device():
    assert jax.device_count() == 8
    model = tiny_loaded_model(num_heads=8, num_kv_heads=4, head_dim=8, hidden_size=64)
    config = EngineConfig(max_new_tokens=6, gamma=10.0, impl="reference")
    mesh = make_mesh("data=2,model=4")
    single = KVCommEngine(model, PROMPTS, config, probes=(kv_fidelity,))
    sharded = KVCommEngine(model, PROMPTS, config, mesh=mesh, probes=(kv_fidelity,))
    a, b = _run(single), _run(sharded)
    assert [r.path for r in a] == [r.path for r in b] and "reuse" in [r.path for r in a]
    for ra, rb in zip(a, b):
        assert ra.response_ids == rb.response_ids
        if ra.fidelity:
            np.testing.assert_allclose(ra.fidelity["key_error"], rb.fidelity["key_error"], rtol=1e-4, atol=1e-6)
    for name, pool in single.pools.items():
        other = sharded.pools[name]
        for x, y in ((pool.keys, other.keys), (pool.values, other.values)):
            x, y = np.asarray(x), np.asarray(y)
            assert np.linalg.norm(x - y) <= 1e-5 * np.linalg.norm(x)  # float32 reduction order differs per layout
        np.testing.assert_array_equal(np.asarray(pool.activations), np.asarray(other.activations))
        assert not other.keys.sharding.is_fully_replicated  # spread over the mesh, not gathered
    params_leaf = sharded.model.params["layers"]["attn"]["q_proj"]["kernel"]
    assert not params_leaf.sharding.is_fully_replicated
