"""The reuse path through the Pallas kernels (interpret mode) equals the jnp reference path."""

import numpy as np

from kvcomm_jax.kvcomm.engine import EngineConfig, KVCommEngine
from kvcomm_jax.testing import tiny_loaded_model
from tests.test_engine import PROMPTS, QUESTIONS, SHORT_QUESTIONS


def test_interpret_kernels_match_reference_on_the_whole_reuse_path():
    model = tiny_loaded_model(seed=3)
    engines = {
        impl: KVCommEngine(model, PROMPTS, EngineConfig(max_new_tokens=6, gamma=10.0, impl=impl))
        for impl in ("reference", "interpret")
    }
    requests = {impl: [] for impl in engines}
    for question in QUESTIONS[:3] + SHORT_QUESTIONS[:1]:
        for impl, engine in engines.items():
            request = engine.new_request(question)
            for agent in (0, 1):
                engine.run_agent(request, agent)
            requests[impl].append(request)
    ref, interp = requests["reference"][-1], requests["interpret"][-1]
    assert [r.path for r in ref.records] == [r.path for r in interp.records] == ["reuse", "reuse"]
    assert [r.first_token for r in ref.records] == [r.first_token for r in interp.records]
    assert [r.response_ids for r in ref.records] == [r.response_ids for r in interp.records]
    for agent in (0, 1):
        caches = [engines[impl].reuse_cache(engines[impl].prepare_call(requests[impl][-1], agent)) for impl in engines]
        n = len(engines["reference"].prepare_call(ref, agent).ids) - 1
        a, b = (np.asarray(c.keys[:, 0, :, :n]) for c in caches)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        a, b = (np.asarray(c.values[:, 0, :, :n]) for c in caches)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
