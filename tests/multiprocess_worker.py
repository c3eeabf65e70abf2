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

from kvcomm_jax.kvcomm.anchor_pool import ConsumerDeltas
from kvcomm_jax.kvcomm.reuse import AnchorInputs, PlaceholderInputs, correct_segments
from kvcomm_jax.kvcomm.segments import SegmentKV
from kvcomm_jax.model.config import tiny_config
from kvcomm_jax.model.kv_cache import init_cache
from kvcomm_jax.model.rope import rope_tables
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
        content = SegmentKV(normal(L, H, content_tokens, D), normal(L, H, content_tokens, D), np.int32(length))
        prefix = SegmentKV(normal(L, H, prefix_tokens, D), normal(L, H, prefix_tokens, D), np.int32(prefix_tokens - 2))
        anchor_keys, anchor_values = normal(V, L, H, content_tokens, D), normal(V, L, H, content_tokens, D)
        usable = np.asarray([True, True, False, True])
        deltas = ConsumerDeltas(
            placeholder_keys=normal(V, L, H, content_tokens, D, scale=0.1),
            placeholder_values=normal(V, L, H, content_tokens, D, scale=0.1),
            prefix_keys=normal(V, L, H, prefix_tokens, D, scale=0.1),
            prefix_values=normal(V, L, H, prefix_tokens, D, scale=0.1),
            present=usable,
        )
        return PlaceholderInputs(
            content=content,
            prefix=prefix,
            content_start=np.int32(start),
            prefix_start=np.int32(start + length),
            anchors=AnchorInputs(
                keys=anchor_keys,
                values=anchor_values,
                lengths=np.asarray([length, content_tokens, length + 1, content_tokens - 1], np.int32),
                usable=usable,
                deltas=deltas,
            ),
        )

    return dict(
        config=config,
        params=jax.tree.map(np.asarray, init_params(config, seed=seed)),
        tokens=rng.randint(0, config.vocab_size, (BATCH, PROMPT)).astype(np.int32),
        positions=np.broadcast_to(np.arange(PROMPT, dtype=np.int32), (BATCH, PROMPT)).copy(),
        placeholders=(placeholder(16, 11, 8, 5), placeholder(32, 27, 16, 30)),
        rope=rope_tables(config),
    )


def run_reference(case: dict, apply_offsets: bool = True) -> dict:
    """The case on one device, with the unsharded functions: name -> numpy array."""
    config = case["config"]
    logits, cache = forward(case["params"], case["tokens"], case["positions"], init_cache(config, BATCH, CAPACITY), config)
    segments = correct_segments(case["placeholders"], case["rope"], apply_offsets=apply_offsets, impl="reference")
    return _named(logits, cache, segments)


def run_sharded(case: dict, mesh, apply_offsets: bool = True) -> dict:
    """The case on ``mesh``: inputs placed by :mod:`kvcomm_jax.scale.sharding`, the same jitted functions.

    Returns name -> global jax array.
    """
    config = case["config"]
    params = sharding.place(case["params"], mesh, sharding.params_shardings(config, mesh))
    cache_sh = sharding.shardings_for(jax.eval_shape(lambda: init_cache(config, BATCH, CAPACITY)), mesh)
    cache = jax.jit(init_cache, static_argnums=(0, 1, 2), out_shardings=cache_sh)(config, BATCH, CAPACITY)  # made in place
    rows = sharding.logical_sharding(("batch", "tokens"), (BATCH, PROMPT), mesh)
    tokens, positions = sharding.place((case["tokens"], case["positions"]), mesh, (rows, rows))
    logits, cache = forward(params, tokens, positions, cache, config)
    inputs = sharding.place(case["placeholders"], mesh)
    rope = sharding.place(case["rope"], mesh)
    segments = correct_segments(inputs, rope, apply_offsets=apply_offsets, impl="reference")
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
