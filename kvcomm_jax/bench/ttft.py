"""The TTFT benchmark on the "CopyMachine" workload (the paper's TTFT setting: 5 agents, 512-token prefixes, 1K-token inputs, 512 output tokens).

Every agent gets a long system prompt, a long random question of Ω/Δ symbols,
and the outputs of all agents before it, and is asked to copy symbols for a
fixed number of tokens (EOS ignored, so every output has exactly that length).
The engine runs in ``kvcomm`` mode with the :func:`~kvcomm_jax.bench.fidelity.kv_fidelity`
probe: right after each reuse call it prefills the very same prompt densely, so
dense and KVCOMM TTFT are measured in one process on identical prompts. The first requests only
create anchors (dense) and one more warms up the reuse path's compilation;
neither counts towards the speedups.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import statistics

from tqdm import tqdm

from kvcomm_jax.bench.fidelity import kv_fidelity
from kvcomm_jax.kvcomm.engine import EngineConfig, KVCommEngine
from kvcomm_jax.kvcomm.records import reuse_rate
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


def _median(values):
    return statistics.median(values) if values else None


def run_ttft_benchmark(model: LoadedModel, settings: TTFTSettings, progress: bool = True) -> dict:
    """Run the workload; returns the JSON-ready result (medians over the measured samples)."""
    tokenizer = model.tokenizer
    engine = KVCommEngine(
        model,
        copy_machine_prompts(tokenizer, settings),
        EngineConfig(
            mode="kvcomm", gamma=settings.gamma, max_new_tokens=settings.output_tokens, lead_in=LEAD_IN,
            impl=settings.impl, ignore_eos=True,
        ),
        probes=(kv_fidelity,),
    )
    rng = random.Random(settings.seed)
    unmeasured = settings.anchor_requests + settings.warmup_requests
    measured = []
    anchor_calls = []
    for r in tqdm(range(unmeasured + settings.samples), desc="bench-ttft requests", disable=not progress):
        request = engine.new_request(symbol_question(tokenizer, settings.input_tokens, rng))
        records = [engine.run_agent(request, agent) for agent in range(settings.agents)]
        (measured if r >= unmeasured else anchor_calls).append(records)

    calls = [rec for records in measured for rec in records]
    agents = []
    for i in range(settings.agents):
        mine = [rec for rec in calls if rec.agent_id == i]
        reused = [rec for rec in mine if rec.fidelity is not None]
        dense = [rec.fidelity["dense_ttft_ms"] for rec in reused] + [rec.ttft_ms for rec in mine if rec.fidelity is None]
        kvcomm = [rec.ttft_ms for rec in mine]
        breakdown = {
            part: _median([rec.breakdown_ms[part] for rec in reused])
            for part in ("matching_offset", "assembly", "forward")
        }
        breakdown["others"] = _median([rec.others_ms for rec in mine])
        d, k = _median(dense), _median(kvcomm)
        agents.append({
            "agent": i + 1,
            "prompt_tokens": _median([rec.prompt_tokens for rec in mine]),
            "dense_ttft_ms": d,
            "kvcomm_ttft_ms": k,
            "speedup": d / k if d and k else None,
            "reused_calls": len(reused),
            "calls": len(mine),
            "breakdown_ms": breakdown,
            "first_token_agreement": _median([float(rec.fidelity["first_token_agrees"]) for rec in reused]),
        })
    return {
        "agents": agents,
        "reuse_rate": reuse_rate(calls),
        "anchor_requests": {
            "count": len(anchor_calls),
            "paths": [[rec.path for rec in records] for records in anchor_calls],
            "ttft_ms": [[round(rec.ttft_ms, 1) for rec in records] for records in anchor_calls],
        },
        "settings": dataclasses.asdict(settings),
        "model": model.source,
    }
