"""Fidelity of reused caches against dense: per-layer relative KV error, and teacher-forced agreement per mode.

Summarizes what the :class:`~kvcomm_jax.kvcomm.probes.FidelityProbe` engine probe records:
:func:`aggregate` (KV errors of reuse calls, KVCOMM vs rotation only; per layer kind with
:func:`layer_kind_table` for models with sliding-window layers) and
:func:`~kvcomm_jax.kvcomm.probes.teacher_forced_summary` per mode, as tables and a plot.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from kvcomm_jax.bench.reporting import fmt, markdown_table

_SERIES = {
    "kvcomm_key": "key_error",
    "rotate_only_key": "rotate_only_key_error",
    "kvcomm_value": "value_error",
    "rotate_only_value": "rotate_only_value_error",
}


def aggregate(fidelities: Iterable[dict]) -> dict:
    """Mean per-layer errors over the reuse calls that recorded them, and first-token agreement with dense."""
    fidelities = [f for f in fidelities if f and "key_error" in f]
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


def layer_kind_table(summary: dict, local_layers: Sequence[bool]) -> str:
    """Markdown table, one row per layer with its kind (local: sliding window, or global), then the
    means of each kind over layers 1+; ``below`` says whether KVCOMM's key and value errors are both
    below rotation's on that layer."""
    kinds = ["local" if local else "global" for local in local_layers]
    if len(kinds) != len(summary["kvcomm_key"]):
        raise ValueError(f"{len(kinds)} layer kinds for {len(summary['kvcomm_key'])} layers of errors")

    def below(layers) -> str:
        return "yes" if all(
            summary[f"kvcomm_{kind}"][i] < summary[f"rotate_only_{kind}"][i] for i in layers for kind in ("key", "value")
        ) else "no"

    rows = [[str(i), kinds[i], *(f"{summary[name][i]:.4f}" for name in _SERIES), below([i])] for i in range(len(kinds))]
    for kind in ("local", "global"):
        layers = [i for i in range(1, len(kinds)) if kinds[i] == kind]
        if layers:
            means = [np.mean([summary[name][i] for i in layers]) for name in _SERIES]
            rows.append([f"{kind} 1+ (mean)", kind, *(f"**{m:.4f}**" for m in means), below(layers)])
    return markdown_table(["layer", "kind", "KVCOMM K", "rotate-only K", "KVCOMM V", "rotate-only V", "KVCOMM below"], rows)


def teacher_forced_table(per_mode: dict[str, dict]) -> str:
    """Markdown table, one row per mode, of :func:`~kvcomm_jax.kvcomm.probes.teacher_forced_summary` results."""
    rows = [
        [mode, s["calls"], fmt(s["top1_agreement"] and s["top1_agreement"] * 100), fmt(s["kl"], ".4f"),
         fmt(s["response_agreement"] and s["response_agreement"] * 100)]
        for mode, s in per_mode.items()
    ]
    return markdown_table(["mode", "calls", "top-1 agreement %", "mean KL (nats)", "same response %"], rows)


def plot_fidelity(
    path: str, summary: dict, title: str, per_mode: dict[str, dict] | None = None,
    local_layers: Sequence[bool] | None = None,
) -> None:
    """Per-layer relative error curves, KVCOMM vs rotation only, keys and values.

    ``per_mode``: teacher-forced summaries per mode, drawn as a third panel of bars.
    ``local_layers``: per layer, whether it is a sliding-window layer; the global layers of
    such a model are marked with vertical lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if per_mode else 2, figsize=(15 if per_mode else 10, 3.8))
    axes[1].sharey(axes[0])
    if per_mode:
        _plot_teacher_forced(axes[2], per_mode)
    for ax, kind in zip(axes, ("key", "value")):
        for method, style in (("kvcomm", "-o"), ("rotate_only", "--s")):
            values = summary[f"{method}_{kind}"]
            ax.plot(range(len(values)), values, style, markersize=3, label=method.replace("_", " "))
        if local_layers is not None and any(local_layers):
            for i, layer in enumerate(i for i, local in enumerate(local_layers) if not local):
                ax.axvline(layer, color="gray", linestyle=":", label="global layer" if i == 0 else None)
        ax.set_title(f"{kind}s")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative error vs dense")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_teacher_forced(ax, per_mode: dict[str, dict]) -> None:
    """Top-1 and same-response agreement (%) per mode, as grouped bars."""
    modes = list(per_mode)
    for offset, name, label in ((-0.2, "top1_agreement", "top-1"), (0.2, "response_agreement", "same response")):
        values = [100 * (per_mode[m][name] or 0.0) for m in modes]
        ax.bar([i + offset for i in range(len(modes))], values, 0.4, label=label)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylim(0, 100)
    ax.set_title("teacher-forced")
    ax.set_ylabel("agreement with dense %")
    ax.legend(loc="lower right")
