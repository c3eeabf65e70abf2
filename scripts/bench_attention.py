"""One layer's attention on this machine: blocked (the model's), full-matrix softmax, ``jax.nn.dot_product_attention``.

Shapes of the default model (SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64), one
row, float32. Causal prefill from an empty cache of N tokens, and one decode query over a
cache of S slots of which the first ``valid`` hold keys. Each function is jitted and
warmed once; the table shows the median milliseconds of ``--repeats`` calls, each ended by
``block_until_ready``, and the largest difference from the full-matrix result.

    python scripts/bench_attention.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvcomm_jax.model.attention import blocked_attention, cache_source, slice_reader

HQ, HKV, D = 9, 3, 64
PREFILL_TOKENS = (256, 1024, 3072)
DECODE_CACHES = ((1280, 1100), (4096, 1000))  # (capacity S, valid slots)


def full_matrix(q, keys, values, query_slots):
    """Softmax over the whole masked ``[B, Hkv, G, T, S]`` score matrix (the model's attention before blocking)."""
    scores = jnp.einsum("bhgtd,bhsd->bhgts", q, keys) / jnp.sqrt(jnp.float32(D))
    visible = jnp.arange(keys.shape[2])[None, None, :] <= query_slots[:, :, None]  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhgts,bhsd->bhgtd", jax.nn.softmax(scores, axis=-1), values)


def library(q, keys, values, query_slots):
    """``jax.nn.dot_product_attention`` with the same mask, in the layout it wants (``[B, T, H, D]``)."""
    B, _, G, T, _ = q.shape
    visible = (jnp.arange(keys.shape[2])[None, None, :] <= query_slots[:, :, None])[:, None]  # [B, 1, T, S]
    out = jax.nn.dot_product_attention(
        q.reshape(B, HQ, T, D).swapaxes(1, 2), keys.swapaxes(1, 2), values.swapaxes(1, 2), mask=visible
    )  # [B, T, Hq, D]
    return out.swapaxes(1, 2).reshape(B, HKV, G, T, D)


def blocked(q, new_keys, new_values, keys, values, starts):
    """The model's attention: the queries' own ``new_keys, new_values [B, Hkv, T, D]`` after ``starts [B]`` slots."""
    T, S = q.shape[3], keys.shape[2]
    cached = None if T == S else cache_source(slice_reader(keys, values), S, starts)
    return blocked_attention(q, new_keys, new_values, jnp.full(starts.shape, T, jnp.int32), cached)


def blocked_inputs(q, keys, values, query_slots):
    """:func:`blocked`'s arguments for a case: the queries' own keys/values are the slots ``query_slots[:, 0] ..``."""
    start, T = int(query_slots[0, 0]), q.shape[3]
    return q, keys[:, :, start : start + T], values[:, :, start : start + T], keys, values, query_slots[:, 0]


def case(T: int, S: int, valid: int):
    """Random ``q [1, Hkv, G, T, D]``, ``keys, values [1, Hkv, S, D]``; the ``T`` queries' slots end at ``valid``."""
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(1, HKV, HQ // HKV, T, D), jnp.float32)
    keys, values = (jnp.asarray(rng.randn(1, HKV, S, D), jnp.float32) for _ in range(2))
    return q, keys, values, jnp.arange(valid - T, valid, dtype=jnp.int32)[None]


def median_ms(fn, args, repeats: int) -> tuple[float, jax.Array]:
    """Median milliseconds of ``repeats`` warm calls of ``fn(*args)``, and its output."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def row(label: str, args, repeats: int) -> str:
    """One markdown table row: the three implementations on ``args``."""
    results = [median_ms(jax.jit(blocked), blocked_inputs(*args), repeats)]
    results += [median_ms(jax.jit(fn), args, repeats) for fn in (full_matrix, library)]
    reference = results[1][1]
    diff = max(float(jnp.max(jnp.abs(out - reference))) for _, out in results)
    return f"| {label} | " + " | ".join(f"{ms:,.2f}" for ms, _ in results) + f" | {diff:.1e} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; median ms of {args.repeats} calls\n")
    print("| case | blocked ms | full matrix ms | jax.nn.dot_product_attention ms | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for n in PREFILL_TOKENS:
        print(row(f"prefill {n} tokens", case(n, n, n), args.repeats), flush=True)
    for S, valid in DECODE_CACHES:
        print(row(f"decode, {valid} of {S} slots", case(1, S, valid), args.repeats), flush=True)


if __name__ == "__main__":
    main()
