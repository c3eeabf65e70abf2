"""The command line: ``python run.py [generate|perplexity|pipeline|bench-ttft|bench-throughput|models] ...``.

With no arguments it runs the main job: a 4-agent GSM8K pipeline, dense and
KVCOMM side by side, on the default model, writing ``results/``.
"""

from __future__ import annotations

import argparse
import os
import sys

from kvcomm_jax.agents.graphs import GRAPH_KINDS
from kvcomm_jax.agents.pipeline import MODE_CHOICES
from kvcomm_jax.agents.tasks import TASKS
from kvcomm_jax.configs import main_job, paper_ttft
from kvcomm_jax.kvcomm.config import DEFAULT_ANCHOR_CAPACITY, DEFAULT_EVICTION_WINDOW
from kvcomm_jax.kvcomm.strategies import MODES, STRATEGIES
from kvcomm_jax.model.registry import DEFAULT_MODEL
from kvcomm_jax.scale.distributed import failing_together
from pallas_kernels import IMPLS


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def _list_of(parse_item):
    """A comma-separated list, each item parsed by ``parse_item``: ``"1,4,8"`` -> ``(1, 4, 8)``."""
    def parse(text):
        return tuple(parse_item(item.strip()) for item in text.split(","))

    return parse


def _ratio(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--recompute-ratio must be a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--recompute-ratio must be in [0, 1], got {value}")
    return value


def _mode(text):
    if text not in MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {text!r} (known: {', '.join(MODES)})")
    return text


def _agents(text):
    value = _positive("--agents")(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"--agents counts the decision agent and must be >= 2 (one worker + the decision agent), got {value}"
        )
    return value


def _add_model(p):
    p.add_argument("--model", default=DEFAULT_MODEL, help="known name, .gguf path or Hugging Face directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def _add_engine(p, gamma):
    p.add_argument("--gamma", type=float, default=gamma, help="entropy threshold of anchor prediction")
    p.add_argument("--anchors", type=_positive("--anchors"), default=DEFAULT_ANCHOR_CAPACITY, help="anchor capacity V per placeholder")
    p.add_argument("--window", type=_positive("--window"), default=DEFAULT_EVICTION_WINDOW, help="eviction window W")
    p.add_argument("--impl", default="auto", choices=IMPLS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    _add_model(g)

    p = sub.add_parser("perplexity", help="perplexity of a text")
    p.add_argument("--text", required=True)
    p.add_argument("--json")
    _add_model(p)

    pl = sub.add_parser("pipeline", help="a multi-agent pipeline on a benchmark task")
    pl.add_argument("--task", required=True, choices=tuple(TASKS))
    pl.add_argument("--agents", type=_agents, default=4, help="agents including the decision agent")
    pl.add_argument("--mode", default="both", choices=tuple(MODE_CHOICES))
    pl.add_argument("--limit", type=_positive("--limit"), default=10)
    pl.add_argument("--offset", type=int, default=0)
    pl.add_argument("--graph", default="full_connected", choices=tuple(GRAPH_KINDS))
    pl.add_argument("--rounds", type=_positive("--rounds"), default=1)
    pl.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=128)
    pl.add_argument("--batch-size", type=_positive("--batch-size"), default=1,
                    help="questions run together; each agent's calls for them are one batched step")
    pl.add_argument("--no-fidelity", action="store_true", help="skip the untimed dense checks of reuse calls (speed runs)")
    pl.add_argument("--fidelity-tokens", type=_positive("--fidelity-tokens"), default=32,
                    help="tokens of the dense path's greedy continuation fed through both caches (teacher forcing)")
    pl.add_argument("--no-partial-reuse", action="store_true",
                    help="the paper's all-or-nothing decision: a blocked placeholder makes the call dense")
    pl.add_argument("--exact-question", action="store_true",
                    help="compute the question in context when it directly follows prefix 0")
    pl.add_argument("--anchor-coverage", action="store_true",
                    help="anchors shorter than a content serve the tokens they cover (the rest is computed)")
    pl.add_argument("--recompute-ratio", type=_ratio, default=None,
                    help="share of approximated tokens a reuse call also recomputes, chosen by the mode's rule "
                         "(kvcomm: largest correction, default 0; cacheblend: largest layer-1 deviation, default 0.15)")
    pl.add_argument("--json")
    pl.add_argument("--plot")
    pl.add_argument("--mesh", help="device mesh, e.g. data=2,model=4 (product = number of devices)")
    pl.add_argument("--save-pool", metavar="DIR", help="save the anchor pools after the run")
    pl.add_argument("--load-pool", metavar="DIR", help="warm-start from anchor pools saved by --save-pool")
    pl.add_argument("--coordinator", help="multi-host: coordinator address host:port (or $KVCOMM_COORDINATOR)")
    pl.add_argument("--num-processes", type=int, help="multi-host: process count (or $KVCOMM_NUM_PROCESSES)")
    pl.add_argument("--process-id", type=int, help="multi-host: this process's id (or $KVCOMM_PROCESS_ID)")
    _add_model(pl)
    _add_engine(pl, gamma=0.3)

    paper = paper_ttft.config()
    b = sub.add_parser("bench-ttft", help="TTFT benchmark on the CopyMachine workload (defaults: the paper's setting)")
    b.add_argument("--agents", type=_positive("--agents"), default=paper.agents)
    b.add_argument("--prefix-tokens", type=_positive("--prefix-tokens"), default=paper.prefix_tokens)
    b.add_argument("--input-tokens", type=_positive("--input-tokens"), default=paper.input_tokens)
    b.add_argument("--output-tokens", type=_positive("--output-tokens"), default=paper.output_tokens)
    b.add_argument("--samples", type=_positive("--samples"), default=paper.samples)
    b.add_argument("--gamma", type=float, default=paper.gamma)
    b.add_argument("--impl", default="auto", choices=IMPLS)
    b.add_argument("--json")
    b.add_argument("--plot")
    _add_model(b)

    t = sub.add_parser("bench-throughput", help="questions/s of a task pipeline by mode and batch size")
    t.add_argument("--task", required=True, choices=tuple(TASKS))
    t.add_argument("--agents", type=_agents, default=4, help="agents including the decision agent")
    t.add_argument("--limit", type=_positive("--limit"), default=16, help="questions, the same for every combination")
    t.add_argument("--offset", type=int, default=0)
    t.add_argument("--batch-sizes", type=_list_of(_positive("--batch-sizes")), default=(1, 4, 8, 16), help="e.g. 1,4,8,16")
    t.add_argument("--modes", type=_list_of(_mode), default=("dense", "kvcomm"), help=f"e.g. dense,kvcomm (known: {','.join(MODES)})")
    t.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=128)
    t.add_argument("--gamma", type=float, default=0.3)
    t.add_argument("--impl", default="auto", choices=IMPLS)
    t.add_argument("--json")
    t.add_argument("--plot")
    _add_model(t)

    m = sub.add_parser("models", help="the known model names: source, architecture, availability (no weights loaded)")
    m.add_argument("--json")
    return parser


def _generate(args):
    from kvcomm_jax.model.registry import load_model
    from kvcomm_jax.model.sampling import SamplingConfig
    from kvcomm_jax.model.text_generation import generate_text

    model = load_model(args.model, args.dtype)
    result = generate_text(
        model, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
        sampling=SamplingConfig(args.temperature, args.top_p, args.seed),
    )
    print(result.text)
    print(f"[{result.prompt_tokens} prompt tokens, TTFT {result.ttft_s * 1e3:.1f} ms, {result.tokens_per_s:.1f} tokens/s]", file=sys.stderr)


def _perplexity(args):
    from kvcomm_jax.bench.reporting import write_json
    from kvcomm_jax.model.perplexity import perplexity
    from kvcomm_jax.model.registry import load_model

    _check_outputs(args)
    result = perplexity(load_model(args.model, args.dtype), args.text)
    print(f"perplexity: {result.perplexity:.4f}")
    if args.json:
        write_json(args.json, {"perplexity": result.perplexity, "tokens": result.tokens})


def _pipeline(args):
    import jax

    from kvcomm_jax.agents.graphs import make_graph
    from kvcomm_jax.agents.pipeline import run_pipeline
    from kvcomm_jax.agents.tasks import get_task
    from kvcomm_jax.bench.reporting import (
        pipeline_table,
        plot_per_agent,
        write_json,
    )
    from kvcomm_jax.kvcomm.engine import EngineConfig
    from kvcomm_jax.model.registry import load_model
    from kvcomm_jax.scale.distributed import is_primary, maybe_initialize_distributed
    from kvcomm_jax.scale.sharding import make_mesh

    _check_outputs(args)
    _check_plan_settings(args)
    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    mesh = make_mesh(args.mesh) if args.mesh else None
    if args.load_pool and not os.path.isdir(args.load_pool):
        raise ValueError(f"--load-pool {args.load_pool!r} is not a folder")
    task = get_task(args.task)
    graph = make_graph(args.graph, args.agents, task.worker_roles, task.decision_role, args.rounds)
    examples = task.load(limit=args.limit, offset=args.offset)
    model = load_model(args.model, args.dtype)
    config = EngineConfig(
        gamma=args.gamma, anchor_capacity=args.anchors, eviction_window=args.window,
        max_new_tokens=args.max_new_tokens, impl=args.impl, partial_reuse=not args.no_partial_reuse,
        exact_question=args.exact_question, recompute_ratio=args.recompute_ratio, anchor_coverage=args.anchor_coverage,
    )
    summary, results = run_pipeline(
        model, task, graph, examples, MODE_CHOICES[args.mode], config,
        measure_fidelity=not args.no_fidelity, batch_size=args.batch_size, mesh=mesh, load_pool=args.load_pool, save_pool=args.save_pool,
        fidelity_tokens=args.fidelity_tokens, progress=is_primary(),
    )
    if not is_primary():  # every process holds the same results; process 0 reports them
        return
    payload = {
        "task": args.task, "model": model.source, "agents": args.agents, "graph": args.graph, "rounds": args.rounds,
        "questions": len(examples), "offset": args.offset, "gamma": args.gamma, "anchors": args.anchors,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "mesh": args.mesh,
        "processes": jax.process_count(), "devices": jax.device_count(),
        "partial_reuse": not args.no_partial_reuse, "exact_question": args.exact_question,
        "recompute_ratio": args.recompute_ratio, "anchor_coverage": args.anchor_coverage, **summary,
        "calls": {
            mode: [
                {"question": row.example_id, "answer": row.answer, "correct": row.correct,
                 "records": [{k: v for k, v in vars(r).items() if k not in ("response_ids",)} for r in row.records]}
                for row in rows
            ]
            for mode, rows in results.items()
        },
    }
    print(pipeline_table(summary))
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    if args.plot:
        agents = graph.topological_order()
        plot_per_agent(
            args.plot, [f"agent {a + 1}" for a in agents],
            {mode: m["ttft_ms"]["per_agent"] for mode, m in summary["modes"].items()},
            f"{args.task}, {args.agents} agents: median TTFT per agent", "TTFT (ms)",
        )
        print(f"wrote {args.plot}")


def _bench_ttft(args):
    from kvcomm_jax.bench.ttft import (
        TTFTSettings,
        plot_ttft,
        run_ttft_benchmark,
        ttft_table,
    )
    from kvcomm_jax.model.registry import load_model

    _check_outputs(args)
    settings = TTFTSettings(
        agents=args.agents, prefix_tokens=args.prefix_tokens, input_tokens=args.input_tokens,
        output_tokens=args.output_tokens, samples=args.samples, gamma=args.gamma, impl=args.impl,
    )
    result = run_ttft_benchmark(load_model(args.model, args.dtype), settings)
    _report(args, result, ttft_table, plot_ttft)


def _bench_throughput(args):
    from kvcomm_jax.bench.throughput import (
        ThroughputSettings,
        plot_throughput,
        run_throughput_benchmark,
        throughput_table,
    )
    from kvcomm_jax.model.registry import load_model

    _check_outputs(args)
    settings = ThroughputSettings(
        task=args.task, agents=args.agents, limit=args.limit, offset=args.offset, batch_sizes=args.batch_sizes,
        modes=args.modes, max_new_tokens=args.max_new_tokens, gamma=args.gamma, impl=args.impl,
    )
    result = run_throughput_benchmark(load_model(args.model, args.dtype), settings)
    _report(args, result, throughput_table, plot_throughput)


def _models(args):
    """A table of the known models (and their JSON with ``--json``); why each missing one is missing."""
    import dataclasses

    from kvcomm_jax.bench.reporting import markdown_table, write_json
    from kvcomm_jax.model.catalog import describe_models

    _check_outputs(args)
    models = describe_models()
    print(markdown_table(
        ["model", "architecture", "available", "source", "path"],
        [[m.name, m.architecture or "-", "yes" if m.available else "no", m.source, m.path or "-"] for m in models],
    ))
    for m in models:
        if m.problem:
            print(f"\n{m.name}: {m.problem}")
    if args.json:
        write_json(args.json, {"models": [dataclasses.asdict(m) for m in models]})
        print(f"wrote {args.json}")


def _check_plan_settings(args) -> None:
    """Refuse plan settings that none of the chosen modes would use."""
    strategies = [STRATEGIES[m] for m in MODE_CHOICES[args.mode] if m in STRATEGIES]
    if args.recompute_ratio is not None and not any(s.score_rule is not None for s in strategies):
        raise ValueError(
            f"--recompute-ratio: no mode of --mode {args.mode} has a rule to select tokens to recompute "
            "(kvcomm and cacheblend have)"
        )
    if args.no_partial_reuse and not any(s.uses_anchors for s in strategies):
        raise ValueError(f"--no-partial-reuse: no mode of --mode {args.mode} ever blocks a placeholder (kvcomm and rotate_only do)")


def _check_outputs(args) -> None:
    """Fail before any work if ``--json`` (or ``--plot``, where the command has it) cannot be written."""
    from kvcomm_jax.bench.reporting import check_writable

    check_writable(args.json, "--json")
    check_writable(getattr(args, "plot", None), "--plot")


def _report(args, result: dict, table, plot) -> None:
    """Print a benchmark's table; write its JSON (``--json``) and plot (``--plot``) when asked."""
    from kvcomm_jax.bench.reporting import write_json

    print(table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        plot(args.plot, result)
        print(f"wrote {args.plot}")


COMMANDS = {
    "generate": _generate, "perplexity": _perplexity, "pipeline": _pipeline, "bench-ttft": _bench_ttft,
    "bench-throughput": _bench_throughput, "models": _models,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        argv = main_job.config().argv()
    args = parser.parse_args(argv)
    try:
        with failing_together():
            COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
