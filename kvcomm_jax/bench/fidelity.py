"""Fidelity of reused caches: per-layer relative KV error against dense, KVCOMM vs rotation only.

Summarizes what the :func:`~kvcomm_jax.kvcomm.probes.kv_fidelity` engine probe records on
reuse calls: :func:`aggregate`, a table and a plot.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from kvcomm_jax.bench.reporting import markdown_table

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
