"""The TTFT benchmark on the "CopyMachine" workload (the paper's TTFT setting: 5 agents, 512-token prefixes, 1K-token inputs, 512 output tokens).

Every agent gets a long system prompt, a long random question of Ω/Δ symbols,
and the outputs of all agents before it, and is asked to copy symbols for a
fixed number of tokens (EOS ignored, so every output has exactly that length).
The engine runs in ``kvcomm`` mode with the
:class:`~kvcomm_jax.bench.baselines.BaselineProbe`: right after each reuse call it
times, on the very same prompt, a dense prefill of the exact prompt, a dense
prefill with the agent's prefix 0 cached, and the reuse call's floor (a one-token
forward at its cache length plus one read of the bytes its correction reads). So
every number comes from one process and identical prompts, warm (compilation is
reported apart). The first requests only create anchors (dense) and one more
warms up compilation; they count towards no median and are reported apart.

Per agent: medians over the measured calls. Per request: the sum over agents of
each mode's TTFT plus what the request pays before those first tokens outside
TTFT (for KVCOMM the calls' ``others_ms``: base KV of the question, segment
extraction and publishing; nothing for either dense baseline), median over the
measured requests whose every call reused (only those have baselines).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import statistics
from typing import Sequence

from tqdm import tqdm

from kvcomm_jax.bench.baselines import BaselineProbe
from kvcomm_jax.bench.reporting import (
    fmt,
    fmt_ratio,
    markdown_table,
    plot_per_agent,
    run_info,
)
from kvcomm_jax.kvcomm.engine import EngineConfig, KVCommEngine
from kvcomm_jax.kvcomm.probes import per_call
from kvcomm_jax.kvcomm.records import CallRecord, reuse_rate
from kvcomm_jax.kvcomm.templates import AgentPrompt, field, response_placeholder
from kvcomm_jax.model.registry import LoadedModel
from kvcomm_jax.model.tokenizer import Tokenizer

LEAD_IN = "The task is:\n\n"
_FILLER = (
    "You are a meticulous copy machine in a team of agents. Read the task, look at what the other agents wrote, "
    "and reproduce the sequence of symbols faithfully, one symbol after another, without commentary. "
)


@dataclasses.dataclass(frozen=True)
class TTFTSettings:
    """The workload (sizes in tokens) and the run: ``anchor_requests`` + ``warmup_requests`` unmeasured, then ``samples``."""

    agents: int = 5
    prefix_tokens: int = 512
    input_tokens: int = 1024
    output_tokens: int = 512
    samples: int = 5
    gamma: float = 1.0
    anchor_requests: int = 2
    warmup_requests: int = 1
    seed: int = 0
    impl: str = "auto"

    def __post_init__(self):
        for name in ("agents", "prefix_tokens", "input_tokens", "output_tokens", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("anchor_requests", "warmup_requests"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


def text_of_tokens(tokenizer: Tokenizer, pieces, n: int) -> str:
    """Join ``pieces`` (an endless iterator of strings) until the text is ``n`` tokens long."""
    text = ""
    while len(tokenizer.encode(text)) < n:
        text += next(pieces)
    while len(tokenizer.encode(text)) > n:
        text = text[:-1]
    return text


def _words(text: str):
    """``text``'s words, each followed by a space, repeated forever."""
    return (word + " " for word in itertools.cycle(text.split()))


def symbol_question(tokenizer: Tokenizer, n: int, rng: random.Random) -> str:
    """A random Ω/Δ sequence of ``n`` tokens."""
    return text_of_tokens(tokenizer, iter(lambda: rng.choice("ΩΔ") + " ", None), n)


def copy_machine_prompts(tokenizer: Tokenizer, settings: TTFTSettings) -> list[AgentPrompt]:
    """Agent i: a ``prefix_tokens``-long system prompt, the question, and every agent j < i's output."""
    prompts = []
    for i in range(settings.agents):
        system = text_of_tokens(tokenizer, _words(f"Agent {i}. " + _FILLER), settings.prefix_tokens)
        user = LEAD_IN + "{user_question}"
        for j in range(i):
            user += f"\n\nAgent {j}, role is copy machine, output is: " + field(response_placeholder(j))
        user += f"\n\nCopy the symbols of the task exactly, {settings.output_tokens} symbols."
        prompts.append(AgentPrompt(i, system, user))
    return prompts


BREAKDOWN = ("correction_assembly", "forward")
BASELINES = ("dense", "dense_prefix_cached")


def _median(values):
    return statistics.median(values) if values else None


def _mean(values):
    return statistics.fmean(values) if values else None


def _ratio(a, b):
    return a / b if a and b else None


def _compile_ms(records: Sequence[CallRecord]) -> dict:
    """Compile time (ms) of every path over ``records``, excluded from all the times."""
    baselines = [r.fidelity["baseline_compile_ms"] for r in records if r.fidelity is not None]
    return {
        "kvcomm": sum(r.compile_ms for r in records),
        **{k: sum(b[k] for b in baselines) for k in (*BASELINES, "floor")},
    }


def agent_summary(agent: int, measured: Sequence[CallRecord], all_calls: Sequence[CallRecord]) -> dict:
    """Medians over one agent's measured calls; baselines and floor over its reuse calls (those the probe saw).

    First-token agreements (KVCOMM vs dense, prefix-cached vs dense) are fractions of those
    calls. ``all_calls`` (warm-up included) only feed the compile times.
    """
    reused = [r for r in measured if r.fidelity is not None]
    probe = [r.fidelity for r in reused]
    dense = _median([p["dense_ttft_ms"] for p in probe])
    cached = _median([p["dense_prefix_cached_ttft_ms"] for p in probe])
    kvcomm = _median([r.ttft_ms for r in measured])
    floor = _median([p["floor_ms"] for p in probe])
    return {
        "agent": agent + 1,
        "prompt_tokens": _median([r.prompt_tokens for r in measured]),
        "cached_prefix_tokens": _median([p["cached_prefix_tokens"] for p in probe]),
        "dense_ttft_ms": dense,
        "dense_prefix_cached_ttft_ms": cached,
        "kvcomm_ttft_ms": kvcomm,
        "breakdown_ms": {part: _median([r.breakdown_ms[part] for r in reused]) for part in BREAKDOWN},
        "others_ms": _median([r.others_ms for r in measured]),
        "floor_ms": floor,
        "floor_parts_ms": {part: _median([p["floor_parts_ms"][part] for p in probe]) for part in ("forward", "read")},
        "floor_bytes": _median([p["floor_bytes"] for p in probe]),
        "speedup_vs_dense": _ratio(dense, kvcomm),
        "speedup_vs_prefix_cached": _ratio(cached, kvcomm),
        "kvcomm_over_floor": _ratio(kvcomm, floor),
        "reused_calls": len(reused),
        "calls": len(measured),
        "first_token_agreement": _mean([float(p["first_token_agrees"]) for p in probe]),
        "prefix_cached_first_token_agreement": _mean(
            [float(p["prefix_cached_first_token"] == p["dense_first_token"]) for p in probe]
        ),
        "compile_ms": _compile_ms([r for r in all_calls if r.agent_id == agent]),
    }


def request_totals(measured: Sequence[Sequence[CallRecord]]) -> dict:
    """Per request, the sum over agents of each mode's TTFT (KVCOMM: plus the calls' others); medians.

    Only requests whose every call reused count (the others have no baselines).
    """
    complete = [records for records in measured if all(r.fidelity is not None for r in records)]
    totals = {
        **{k: [sum(r.fidelity[f"{k}_ttft_ms"] for r in records) for records in complete] for k in BASELINES},
        "kvcomm": [sum(r.ttft_ms + r.others_ms for r in records) for records in complete],
    }
    request_ms = {k: _median(v) for k, v in totals.items()}
    return {
        "request_ms": request_ms,
        "request_speedup": {
            "vs_dense": _ratio(request_ms["dense"], request_ms["kvcomm"]),
            "vs_prefix_cached": _ratio(request_ms["dense_prefix_cached"], request_ms["kvcomm"]),
        },
        "requests_in_totals": len(complete),
    }


def run_ttft_benchmark(model: LoadedModel, settings: TTFTSettings, progress: bool = True) -> dict:
    """Run the workload; returns the JSON-ready result (see the module docstring)."""
    tokenizer = model.tokenizer
    engine = KVCommEngine(
        model,
        copy_machine_prompts(tokenizer, settings),
        EngineConfig(
            mode="kvcomm", gamma=settings.gamma, max_new_tokens=settings.output_tokens, lead_in=LEAD_IN,
            impl=settings.impl, ignore_eos=True, partial_reuse=False,  # the paper's method: reuse or dense
        ),
        probes=(per_call(BaselineProbe()),),
    )
    rng = random.Random(settings.seed)
    unmeasured = settings.anchor_requests + settings.warmup_requests
    requests = []
    for _ in tqdm(range(unmeasured + settings.samples), desc="bench-ttft requests", disable=not progress):
        request = engine.new_request(symbol_question(tokenizer, settings.input_tokens, rng))
        requests.append([engine.run_agent(request, agent) for agent in range(settings.agents)])
    anchor_calls, measured = requests[:unmeasured], requests[unmeasured:]
    calls = [rec for records in measured for rec in records]
    every_call = [rec for records in requests for rec in records]
    return {
        "agents": [
            agent_summary(i, [r for r in calls if r.agent_id == i], every_call) for i in range(settings.agents)
        ],
        **request_totals(measured),
        "reuse_rate": reuse_rate(calls),
        "anchor_requests": {
            "count": len(anchor_calls),
            "paths": [[rec.path for rec in records] for records in anchor_calls],
            "ttft_ms": [[round(rec.ttft_ms, 1) for rec in records] for records in anchor_calls],
        },
        "settings": dataclasses.asdict(settings),
        "model": model.source,
        **run_info(),
    }


def ttft_table(result: dict) -> str:
    """The per-agent table (times in ms, medians), then the request line and the reuse rate."""
    rows = [
        [a["agent"], a["prompt_tokens"], fmt(a["dense_ttft_ms"]), fmt(a["dense_prefix_cached_ttft_ms"]),
         fmt(a["kvcomm_ttft_ms"]), fmt(a["floor_ms"]), fmt_ratio(a["speedup_vs_dense"]),
         fmt_ratio(a["speedup_vs_prefix_cached"]), fmt_ratio(a["kvcomm_over_floor"]),
         *(fmt(a["breakdown_ms"][part]) for part in BREAKDOWN), fmt(a["others_ms"]),
         f"{fmt(a['floor_parts_ms']['forward'])} + {fmt(a['floor_parts_ms']['read'])}", f"{a['reused_calls']}/{a['calls']}"]
        for a in result["agents"]
    ]
    table = markdown_table(
        ["agent", "prompt tokens", "dense ms", "prefix-cached dense ms", "KVCOMM ms", "floor ms", "vs dense",
         "vs prefix-cached", "KVCOMM / floor", "correction + assembly ms", "1-token forward ms", "others ms",
         "floor: forward + read ms", "reused"],
        rows,
    )
    request, speedup = result["request_ms"], result["request_speedup"]
    return (
        f"{table}\n\nper request (sum over agents, median of {result['requests_in_totals']}): "
        f"dense {fmt(request['dense'])} ms, prefix-cached dense {fmt(request['dense_prefix_cached'])} ms, "
        f"KVCOMM with others {fmt(request['kvcomm'])} ms; speedup {fmt_ratio(speedup['vs_dense'])} vs dense, "
        f"{fmt_ratio(speedup['vs_prefix_cached'])} vs prefix-cached dense\n"
        f"reuse rate (measured requests): {result['reuse_rate'] * 100:.1f}%"
    )


def plot_ttft(path: str, result: dict) -> None:
    """Median TTFT per agent: dense, prefix-cached dense, KVCOMM and the floor."""
    series = {"dense": "dense_ttft_ms", "prefix-cached dense": "dense_prefix_cached_ttft_ms", "KVCOMM": "kvcomm_ttft_ms", "floor": "floor_ms"}
    plot_per_agent(
        path, [f"agent {a['agent']}" for a in result["agents"]],
        {name: [a[key] for a in result["agents"]] for name, key in series.items()},
        "CopyMachine: median TTFT per agent", "TTFT (ms)",
    )
