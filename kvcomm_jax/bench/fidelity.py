"""Fidelity of reused caches: per-layer relative KV error against dense, KVCOMM vs rotation only.

:func:`kv_fidelity` is an engine probe (see :class:`~kvcomm_jax.kvcomm.engine.KVCommEngine`):
on every reuse call it prefills the identical prompt densely, outside the call's
TTFT, and compares the reuse cache, and the same cache without offsets, with it.
:func:`aggregate` and the table/plot below summarize those measurements.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kvcomm_jax.bench.reporting import markdown_table
from kvcomm_jax.kvcomm.strategies import RotateOnly
from kvcomm_jax.model.kv_cache import KVCache


@jax.jit
def layer_relative_errors(a: KVCache, b: KVCache, n):
    """Per-layer ``||a - b||_F / ||b||_F`` over the first ``n`` slots of row 0, keys and values: ``([L], [L])``."""
    S = min(a.capacity, b.capacity)
    mask = (jnp.arange(S) < n)[None, None, :, None]  # [1, 1, S, 1]

    def err(x, y):
        x, y = x[:, 0, :, :S].astype(jnp.float32), y[:, 0, :, :S].astype(jnp.float32)  # [L, H, S, D]
        num = jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(x - y), 0.0), axis=(1, 2, 3)))
        den = jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(y), 0.0), axis=(1, 2, 3)))
        return num / jnp.maximum(den, 1e-30)

    return err(a.keys, b.keys), err(a.values, b.values)


def kv_fidelity(engine, call, reuse_cache: KVCache, reuse_first, key) -> dict:
    """Engine probe: per-layer relative KV error of the reuse cache vs a dense prefill of the same prompt.

    Also reports the same cache without offsets (rotation only), first-token agreement
    with dense, and the dense prefill's warm TTFT on the identical prompt.
    """
    dense_first, dense_cache, dense_ms, _ = engine.runner.prefill([call.ids], call.capacity, key)
    n = len(call.ids) - 1
    k_err, v_err = layer_relative_errors(reuse_cache, dense_cache, n)
    k_rot, v_rot = layer_relative_errors(engine.reuse_cache(call, RotateOnly()), dense_cache, n)
    return {
        "key_error": np.asarray(k_err).tolist(),
        "value_error": np.asarray(v_err).tolist(),
        "rotate_only_key_error": np.asarray(k_rot).tolist(),
        "rotate_only_value_error": np.asarray(v_rot).tolist(),
        "first_token_agrees": bool(int(dense_first[0]) == int(reuse_first[0])),
        "dense_first_token": int(dense_first[0]),
        "dense_ttft_ms": dense_ms,
    }

_SERIES = {
    "kvcomm_key": "key_error",
    "rotate_only_key": "rotate_only_key_error",
    "kvcomm_value": "value_error",
    "rotate_only_value": "rotate_only_value_error",
}


def aggregate(fidelities: Iterable[dict]) -> dict:
    """Mean per-layer errors over reuse calls, and first-token agreement with dense."""
    fidelities = [f for f in fidelities if f]
    if not fidelities:
        raise ValueError("no reuse call recorded a fidelity measurement (no reuse happened, or it was not measured)")
    out = {name: np.mean([f[key] for f in fidelities], axis=0).tolist() for name, key in _SERIES.items()}
    out["calls"] = len(fidelities)
    out["first_token_agreement"] = float(np.mean([f["first_token_agrees"] for f in fidelities]))
    return out


def fidelity_table(summary: dict, group: int = 3) -> str:
    """Markdown table of mean relative error per layer group (layer 0 alone, then ``group`` layers a row)."""
    layers = len(summary["kvcomm_key"])
    spans = [(0, 1)] + [(s, min(s + group, layers)) for s in range(1, layers, group)]
    rows = []
    for a, b in spans:
        cells = [np.mean(summary[name][a:b]) for name in _SERIES]
        rows.append([f"{a}" if b == a + 1 else f"{a}-{b - 1}"] + [f"{c:.4f}" for c in cells])
    deep = [np.mean(summary[name][1:]) for name in _SERIES]
    rows.append(["1-%d (mean)" % (layers - 1)] + [f"**{c:.4f}**" for c in deep])
    return markdown_table(["layers", "KVCOMM K", "rotate-only K", "KVCOMM V", "rotate-only V"], rows)


def plot_fidelity(path: str, summary: dict, title: str) -> None:
    """Per-layer relative error curves, KVCOMM vs rotation only, keys and values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, kind in zip(axes, ("key", "value")):
        for method, style in (("kvcomm", "-o"), ("rotate_only", "--s")):
            values = summary[f"{method}_{kind}"]
            ax.plot(range(len(values)), values, style, markersize=3, label=method.replace("_", " "))
        ax.set_title(f"{kind}s")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative error vs dense")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
