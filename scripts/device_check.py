"""Compiled kernels against their references, with achieved bandwidth.

On a TPU or GPU backend: Llama-3.1-8B shapes (L=32, H=8, D=128, bf16), T in {1024, 4096},
A in {1, 20}, both weight layouts. Per kernel it prints the max abs error against the
reference, the median time of several runs after a warm-up, the achieved GB/s from the
bytes model of docs/kernels.md, the same for the XLA-compiled reference, and the device's
streaming bandwidth (one read and one write of a large array) as the yardstick.

``--small`` runs small shapes with ``impl="interpret"``, so the script can be checked on
a CPU. Exits non-zero when a kernel's error exceeds two bf16 ulps of the output scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

FULL = dict(layers=32, heads=8, head_dim=128, tokens=(1024, 4096), anchors=(1, 20))
SMALL = dict(layers=2, heads=2, head_dim=128, tokens=(64, 100), anchors=(1, 3))
DTYPE = jnp.bfloat16
ERROR_BOUND = 2.0**-7  # two bf16 ulps, relative to max(1, max |reference|)


def bytes_moved(kernel: str, *, L, H, T, D, A, itemsize: int, layout: str) -> int:
    """HBM bytes one call moves (docs/kernels.md): reads and writes, tables and weights."""
    row = L * H * D * itemsize  # one token's keys, all layers and heads
    deltas = A * (L - 1) * H * D * itemsize  # one token's deltas; layer 0 is never read
    tables = 2 * L * (D // 2) * 4  # cos and sin per layer, float32
    if kernel == "rotate":
        return T * (2 * row + tables)
    weights = 4 * A * T if layout == "token" else 4 * A * L * H * D
    corrected = T * (2 * row + deltas) + weights
    return corrected if kernel == "correct" else corrected + T * tables


def median_seconds(fn: Callable, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` runs after one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """GB/s of reading and writing a ``num_bytes`` bf16 array (negation: not elided)."""
    x = jnp.ones((num_bytes // 2,), DTYPE)
    seconds = median_seconds(jax.jit(jnp.negative), x, repeats=repeats)
    return 2 * num_bytes / seconds / 1e9


def make_inputs(key, *, L, H, T, D, A, layout):
    """bf16 base/deltas, softmax weights over valid anchors, anchor 1 invalid (NaN).

    RoPE frequencies ``[L, D/2]`` differ from layer to layer (base 1e4 on even layers, 1e6
    on odd ones), so a kernel that reads the wrong row of ``inv_freq`` disagrees with the
    reference.
    """
    k = jax.random.split(key, 4)
    base = jax.random.normal(k[0], (L, H, T, D), DTYPE)  # [L, H, T, D]
    deltas = (0.5 * jax.random.normal(k[1], (A, L, H, T, D))).astype(DTYPE)  # [A, L, H, T, D]
    w_shape = (A, 1, 1, T, 1) if layout == "token" else (A, L, H, 1, D)
    valid = jnp.arange(A) != 1  # [A]
    logits = jnp.where(valid.reshape(-1, 1, 1, 1, 1), jax.random.normal(k[2], w_shape), -jnp.inf)
    weights = jax.nn.softmax(logits, axis=0)  # [A, ...] float32, NaN-free for valid anchors
    weights = jnp.where(valid.reshape(-1, 1, 1, 1, 1), weights, jnp.nan)
    deltas = jnp.where(valid.reshape(-1, 1, 1, 1, 1), deltas, jnp.nan)
    positions = jax.random.randint(k[3], (T,), 0, 8192, jnp.int32)
    bases = jnp.where(jnp.arange(L) % 2 == 1, 1e6, 1e4)[:, None]  # [L, 1]
    inv_freq = (1.0 / bases ** (jnp.arange(0, D, 2) / D)).astype(jnp.float32)  # [L, D/2]
    return base, deltas, weights, valid, positions, inv_freq, jnp.int32(T - 7)


def checks(inputs, impl: str):
    """(name, kernel fn, reference fn, args) for the kernels on one set of inputs."""
    base, deltas, weights, valid, positions, inv_freq, num_valid = inputs
    rot = (positions, inv_freq, num_valid)
    corr = (base, deltas, weights, valid)
    return [
        ("rotate", lambda *a: pk.rotate_keys(*a, impl=impl), pk.rotate_keys_reference,
         (base, *rot)),
        ("correct", lambda *a: pk.apply_correction(*a, impl=impl), pk.apply_correction_reference,
         corr),
        ("fused", lambda *a: pk.correct_and_rotate_keys(*a, impl=impl),
         pk.correct_and_rotate_keys_reference, (*corr, *rot)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes, impl='interpret'")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per kernel")
    args = parser.parse_args()
    backend = jax.default_backend()
    if not args.small and backend not in ("tpu", "gpu"):
        print(f"default backend is {backend!r}: full shapes need a TPU or GPU (try --small)")
        return 2
    shapes = SMALL if args.small else FULL
    impl = "interpret" if args.small else "pallas"
    repeats = args.repeats or (3 if args.small else 10)
    L, H, D = shapes["layers"], shapes["heads"], shapes["head_dim"]
    itemsize = jnp.dtype(DTYPE).itemsize

    print(f"device: {jax.devices()[0].device_kind} ({backend}), impl={impl}, "
          f"L={L} H={H} D={D} bf16, median of {repeats}")
    copy_gbs = copy_bandwidth((1 << 30) if not args.small else (64 << 20), repeats)
    print(f"streaming copy bandwidth (read + write): {copy_gbs:.1f} GB/s\n")
    header = (f"{'kernel':8} {'T':>5} {'A':>3} {'layout':7} {'max_abs_err':>11} "
              f"{'ms':>8} {'GB/s':>8} {'%copy':>6} {'ref_ms':>8} {'ref_GB/s':>8}")
    print(header)
    print("-" * len(header))

    failed = False
    key = jax.random.key(0)
    for T in shapes["tokens"]:
        for A in shapes["anchors"]:
            for layout in ("token", "channel"):
                inputs = make_inputs(key, L=L, H=H, T=T, D=D, A=A, layout=layout)
                for name, kernel, reference, kargs in checks(inputs, impl):
                    if name == "rotate" and (A, layout) != (shapes["anchors"][0], "token"):
                        continue  # the rotation depends on neither
                    reference = jax.jit(reference)
                    out = np.asarray(kernel(*kargs), np.float32)
                    expected = np.asarray(reference(*kargs), np.float32)
                    err = float(np.max(np.abs(out - expected)))
                    bound = ERROR_BOUND * max(1.0, float(np.max(np.abs(expected))))
                    ok = np.isfinite(out).all() and err <= bound
                    failed |= not ok
                    seconds = median_seconds(kernel, *kargs, repeats=repeats)
                    ref_seconds = median_seconds(reference, *kargs, repeats=repeats)
                    moved = bytes_moved(name, L=L, H=H, T=T, D=D, A=A, itemsize=itemsize,
                                        layout=layout)
                    gbs, ref_gbs = moved / seconds / 1e9, moved / ref_seconds / 1e9
                    shown_layout = "-" if name == "rotate" else layout
                    shown_a = "-" if name == "rotate" else A
                    print(f"{name:8} {T:>5} {shown_a:>3} {shown_layout:7} {err:>11.3e} "
                          f"{seconds * 1e3:>8.3f} {gbs:>8.1f} {100 * gbs / copy_gbs:>5.0f}% "
                          f"{ref_seconds * 1e3:>8.3f} {ref_gbs:>8.1f}{'' if ok else '  FAIL'}")
                    sys.stdout.flush()
    print("\nFAILED: a kernel disagrees with its reference" if failed else "\nall kernels match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
