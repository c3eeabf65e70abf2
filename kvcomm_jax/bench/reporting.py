"""Tables, JSON files and plots for pipeline and benchmark results."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Sequence


def check_writable(path: str | None, what: str) -> None:
    """Fail before any work if ``path`` cannot be written (its folder is created if missing)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory")
    probe = f"{path}.{os.getpid()}.tmp"  # one per process: every process of a job checks
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{what} {path!r} is not writable: {err.strerror}") from None


def run_info() -> dict:
    """Where and when a benchmark ran: ``{"machine": {...}, "date": ISO 8601 UTC}``."""
    import jax

    return {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()],
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


OUTCOME_FIELDS = ("path", "reason", "first_token", "text", "prompt_tokens", "reused_tokens", "recomputed_tokens")
OUTCOME_RATES = ("reuse_rate", "partial_reuse_rate", "token_reuse_rate", "recomputed_token_rate", "accuracy")


def run_outcome(payload: dict) -> dict:
    """What a pipeline JSON says was computed, leaving out timings and where it ran.

    Per call: :data:`OUTCOME_FIELDS`; per mode: :data:`OUTCOME_RATES`; and the agreement of
    each mode with dense. Two runs of the same job (another mesh, another process count)
    must have equal outcomes.
    """
    return {
        "calls": {
            mode: [[{k: r.get(k) for k in OUTCOME_FIELDS} for r in q["records"]] for q in questions]
            for mode, questions in payload["calls"].items()
        },
        "rates": {mode: {k: m.get(k) for k in OUTCOME_RATES} for mode, m in payload["modes"].items()},
        "agreement": payload.get("agreement"),
    }


def fmt(value, spec: str = ".1f") -> str:
    """``value`` formatted by ``spec``, or "-" for None."""
    return "-" if value is None else format(value, spec)


def fmt_ratio(value) -> str:
    """A speedup or ratio as "1.23x", or "-" for None."""
    return "-" if value is None else f"{value:.2f}x"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pipeline_table(summary: dict) -> str:
    """One row per mode: accuracy, reuse by calls (full / partial) and tokens, tokens recomputed,
    teacher-forced fidelity against dense, TTFT mean/median and per agent."""
    rows = []
    for mode, m in summary["modes"].items():
        t, f = m["ttft_ms"], m.get("fidelity") or {}
        rows.append([
            mode, fmt(_percent(m["accuracy"])), fmt(_percent(m["reuse_rate"])), fmt(_percent(m["partial_reuse_rate"])),
            fmt(_percent(m["token_reuse_rate"])), fmt(_percent(m["recomputed_token_rate"])),
            fmt(_percent(f.get("top1_agreement"))), fmt(f.get("kl"), ".4f"), fmt(_percent(f.get("response_agreement"))),
            fmt(t["mean"]), fmt(t["median"]), " / ".join(fmt(v, ".0f") for v in t["per_agent"]),
        ])
    table = markdown_table(
        ["mode", "accuracy %", "reuse % (calls)", "partial % (calls)", "reuse % (tokens)", "recomputed %",
         "top-1 %", "KL", "same response %", "TTFT mean ms", "TTFT median ms", "median TTFT per agent ms"],
        rows,
    )
    for mode, a in summary["agreement"].items():
        table += (
            f"\n\n{mode} vs dense: final answer agreement {fmt(_percent(a['final_answer']))}%, "
            f"first-token agreement on probed calls {fmt(_percent(a['first_token']))}% ({a['first_token_calls']} calls)"
        )
    return table


def _percent(value):
    return None if value is None else value * 100


def plot_per_agent(path: str, labels: Sequence[str], series: dict[str, Sequence[float | None]], title: str, ylabel: str) -> None:
    """Grouped bars: one group per agent, one bar per series (e.g. dense vs KVCOMM TTFT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 3.8))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, [v or 0.0 for v in values], width, label=name)
        ax.bar_label(bars, labels=[fmt(v, ".0f") for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lines(path: str, series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str) -> None:
    """One line per series, each ``(xs, ys)``, points marked and labelled (e.g. questions/s vs batch size per mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, "-o", label=name)
        for x, y in zip(xs, ys):
            ax.annotate(fmt(y, ".2f"), (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    ax.set_xticks(sorted({x for xs, _ in series.values() for x in xs}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
