"""One sharded computation, checked on one device, on a local mesh, and across processes.

The case: a tiny model's batched prefill, and a KVCOMM offset (``correct_segments``)
for two placeholders, all from fixed seeds. ``tests/test_sharding.py`` imports the
helpers; ``tests/test_multiprocess.py`` runs this file as a script, once per
process, with ``KVCOMM_COORDINATOR`` / ``KVCOMM_NUM_PROCESSES`` / ``KVCOMM_PROCESS_ID``
set; each process writes the gathered results to ``<out_dir>/process_<id>.npz``.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from kvcomm_jax.kvcomm.reuse import PlaceholderInputs, correct_segments
from kvcomm_jax.kvcomm.segments import SegmentKV
from kvcomm_jax.model.config import tiny_config
from kvcomm_jax.model.kv_cache import init_cache
from kvcomm_jax.model.rope import inverse_frequencies
from kvcomm_jax.model.transformer import forward, init_params
from kvcomm_jax.scale import sharding
from kvcomm_jax.scale.distributed import maybe_initialize_distributed

CONFIG_OVERRIDES = dict(num_heads=8, num_kv_heads=4, head_dim=8, hidden_size=64, vocab_size=128)
MESH_SPEC = "data=2,model=4"
SEED = 0
BATCH, PROMPT, CAPACITY = 2, 12, 32


def make_case(seed: int = SEED) -> dict:
    """Host (numpy) inputs: params, tokens/positions ``[B, T]``, and placeholder inputs for ``correct_segments``."""
    config = tiny_config(**CONFIG_OVERRIDES)
    rng = np.random.RandomState(seed)
    L, H, D, V = config.num_layers, config.num_kv_heads, config.head_dim, 4

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def placeholder(content_tokens, length, prefix_tokens, start):
        return PlaceholderInputs(
            content=SegmentKV(normal(L, H, content_tokens, D), normal(L, H, content_tokens, D), np.int32(length)),
            prefix=SegmentKV(normal(L, H, prefix_tokens, D), normal(L, H, prefix_tokens, D), np.int32(prefix_tokens - 2)),
            content_start=np.int32(start),
            prefix_start=np.int32(start + length),
            anchor_keys=normal(V, L, H, content_tokens, D),
            anchor_values=normal(V, L, H, content_tokens, D),
            anchor_lengths=np.asarray([length, content_tokens, length + 1, content_tokens - 1], np.int32),
            usable=np.asarray([True, True, False, True]),
            ph_keys=normal(V, L, H, content_tokens, D, scale=0.1),
            ph_values=normal(V, L, H, content_tokens, D, scale=0.1),
            pf_keys=normal(V, L, H, prefix_tokens, D, scale=0.1),
            pf_values=normal(V, L, H, prefix_tokens, D, scale=0.1),
        )

    return dict(
        config=config,
        params=jax.tree.map(np.asarray, init_params(config, seed=seed)),
        tokens=rng.randint(0, config.vocab_size, (BATCH, PROMPT)).astype(np.int32),
        positions=np.broadcast_to(np.arange(PROMPT, dtype=np.int32), (BATCH, PROMPT)).copy(),
        placeholders=(placeholder(16, 11, 8, 5), placeholder(32, 27, 16, 30)),
        inv_freq=inverse_frequencies(config),
    )


def run_reference(case: dict, apply_offsets: bool = True) -> dict:
    """The case on one device, with the unsharded functions: name -> numpy array."""
    config = case["config"]
    logits, cache = forward(case["params"], case["tokens"], case["positions"], init_cache(config, BATCH, CAPACITY), config)
    segments = correct_segments(case["placeholders"], case["inv_freq"], apply_offsets=apply_offsets, impl="reference")
    return _named(logits, cache, segments)


def run_sharded(case: dict, mesh, apply_offsets: bool = True) -> dict:
    """The case on ``mesh`` through :mod:`kvcomm_jax.scale.sharding`: name -> global jax array."""
    config = case["config"]
    params = sharding.shard(case["params"], sharding.params_shardings(config, mesh))
    cache_sh = sharding.cache_shardings((config.num_layers, BATCH, config.num_kv_heads, CAPACITY, config.head_dim), mesh)
    cache = jax.jit(init_cache, static_argnums=(0, 1, 2), out_shardings=cache_sh)(config, BATCH, CAPACITY)  # made in place
    rows = sharding.logical_sharding(("batch", "tokens"), (BATCH, PROMPT), mesh)
    tokens, positions = sharding.shard((case["tokens"], case["positions"]), (rows, rows))
    logits, cache = sharding.forward(params, tokens, positions, cache, config, mesh)
    inputs = sharding.shard(case["placeholders"], tuple(sharding.placeholder_shardings(p, mesh) for p in case["placeholders"]))
    inv_freq = sharding.shard(case["inv_freq"], sharding.replicated(mesh))
    segments = sharding.correct_segments(inputs, inv_freq, mesh, apply_offsets=apply_offsets, impl="reference")
    return _named(logits, cache, segments)


def _named(logits, cache, segments) -> dict:
    out = {"logits": logits, "cache_keys": cache.keys, "cache_values": cache.values, "cache_lengths": cache.lengths}
    for i, (content, prefix) in enumerate(segments):
        out.update({
            f"content{i}_keys": content.keys, f"content{i}_values": content.values,
            f"prefix{i}_keys": prefix.keys, f"prefix{i}_values": prefix.values,
        })
    return out


def main(out_dir: str) -> None:
    maybe_initialize_distributed()  # from the KVCOMM_* env vars, before any backend starts
    mesh = sharding.make_mesh(MESH_SPEC)
    out = run_sharded(make_case(), mesh)
    gathered = multihost_utils.process_allgather(out, tiled=True)
    np.savez(os.path.join(out_dir, f"process_{jax.process_index()}.npz"), **gathered,
             process_count=jax.process_count(), local_devices=len(jax.local_devices()),
             global_devices=jax.device_count())


if __name__ == "__main__":
    main(sys.argv[1])
