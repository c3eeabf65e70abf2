"""Per-device memory of an anchor pool, a KV cache and the params for Llama-3.1-8B shapes, from the real shardings.

Nothing is allocated: shapes come from ``jax.eval_shape`` and per-device bytes from
``NamedSharding.shard_shape`` of the layouts in :mod:`kvcomm_jax.scale.sharding`, on
simulated CPU devices. Prints a markdown table.

    python scripts/memory_table.py
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from kvcomm_jax.kvcomm.persistence import abstract_pool  # noqa: E402
from kvcomm_jax.model.config import ModelConfig, RopeScaling  # noqa: E402
from kvcomm_jax.model.kv_cache import init_cache  # noqa: E402
from kvcomm_jax.model.params import param_shapes  # noqa: E402
from kvcomm_jax.scale import sharding  # noqa: E402

LLAMA_31_8B = ModelConfig(
    architecture="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, intermediate_size=14336, rope_theta=500000.0, max_position_embeddings=131072,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), dtype="bfloat16",
)
ANCHORS, CONSUMERS, CONTENT_TOKENS, PREFIX_TOKENS = 20, 4, 1024, 64
CACHE_BATCH, CACHE_TOKENS = 1, 8192
MESHES = ({"data": 1, "model": 1}, {"data": 1, "model": 4}, {"data": 2, "model": 2}, {"data": 2, "model": 4}, {"data": 1, "model": 8})


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    c = LLAMA_31_8B
    pool = abstract_pool({
        "capacity": ANCHORS, "slots": ANCHORS, "num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads,
        "tokens": CONTENT_TOKENS, "head_dim": c.head_dim, "dtype": c.dtype,
        "consumers": {str(i): PREFIX_TOKENS for i in range(CONSUMERS)},
    })
    cache = jax.eval_shape(lambda: init_cache(c, CACHE_BATCH, CACHE_TOKENS))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, c.jnp_dtype), param_shapes(c), is_leaf=lambda x: isinstance(x, tuple))
    print(f"Llama-3.1-8B shapes, bf16. Anchor pool: V={ANCHORS} anchors, {CONSUMERS} consumers, "
          f"T={CONTENT_TOKENS} content tokens, Tp={PREFIX_TOKENS}. KV cache: batch {CACHE_BATCH}, S={CACHE_TOKENS}.\n")
    print("| devices | mesh | anchor pool / device | KV cache / device | params / device |")
    print("|---|---|---|---|---|")
    for sizes in MESHES:
        n = sizes["data"] * sizes["model"]
        mesh = sharding.make_mesh(sizes, jax.devices()[:n])
        spec = ",".join(f"{k}={v}" for k, v in sizes.items())
        row = [
            sharding.bytes_per_device(pool, sharding.shardings_for(pool, mesh)),
            sharding.bytes_per_device(cache, sharding.shardings_for(cache, mesh)),
            sharding.bytes_per_device(params, sharding.params_shardings(c, mesh)),
        ]
        print(f"| {n} | {spec} | " + " | ".join(_gib(b) for b in row) + " |")


if __name__ == "__main__":
    main()
