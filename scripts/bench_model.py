"""Prefill and decode speed of a model on this machine, printed as a markdown table.

For each prompt length N (64, 256, 1024; 2048 and 3072 with ``--long``) a prompt of exactly N
tokens is prefilled (TTFT: until the first token is ready) and then decoded greedily for
``--new-tokens`` steps that never stop early. One warm-up run per length compiles the
programs; its compilations are counted per phase with ``CompileCounter`` and excluded
from the timings, which are medians over ``--repeats`` runs, each phase ended by
``block_until_ready``. The timed runs' compilations are reported too (expected: 0).

    python scripts/bench_model.py [--model smollm2-135m] [--dtype float32] [--repeats 3] [--long]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from kvcomm_jax.compile_counter import CompileCounter
from kvcomm_jax.model.buckets import bucket_length
from kvcomm_jax.model.generation import decode, pad_prompts, prefill
from kvcomm_jax.model.kv_cache import init_cache
from kvcomm_jax.model.registry import DEFAULT_MODEL, LoadedModel, load_model
from kvcomm_jax.model.sampling import SamplingConfig

GREEDY = SamplingConfig()
PROMPT_LENGTHS, LONG_PROMPT_LENGTHS = (64, 256, 1024), (2048, 3072)
PASSAGE = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made it possible "
    "to reproduce books quickly and cheaply. Within a few decades printers had set up shops across Europe, and the "
    "number of books in circulation grew from thousands to millions. Scholars could compare identical copies of a "
    "text, merchants could print price lists and contracts, and ordinary readers gained access to news, almanacs "
    "and pamphlets. "
)


def prompt_of_length(model: LoadedModel, n: int) -> list[int]:
    """The first ``n`` token ids of a repeated English passage."""
    ids = model.tokenizer.encode(PASSAGE)
    return (ids * (n // len(ids) + 1))[:n]


def run_once(model: LoadedModel, ids: list[int], new_tokens: int) -> dict[str, float]:
    """One prefill of ``ids`` and ``new_tokens`` decode steps: seconds and compilations of each phase."""
    params, config = model.params, model.config
    tokens, positions, lengths = pad_prompts([ids])
    capacity = bucket_length(tokens.shape[1] + new_tokens, what="prompt + new tokens")
    cache = jax.block_until_ready(init_cache(config, 1, capacity))
    key, never_stop = jax.block_until_ready((jax.random.PRNGKey(0), jnp.asarray([-1], jnp.int32)))

    with CompileCounter() as prefill_compiles:
        start = time.perf_counter()
        first, _, cache = jax.block_until_ready(prefill(params, tokens, positions, lengths, cache, key, config, GREEDY, fresh=True))
        prefill_s = time.perf_counter() - start
    with CompileCounter() as decode_compiles:
        start = time.perf_counter()
        _, counts, _ = jax.block_until_ready(
            decode(params, first, lengths, cache, never_stop, key, config, GREEDY, new_tokens)
        )
        decode_s = time.perf_counter() - start
    if int(counts[0]) != new_tokens:
        raise RuntimeError(f"decode fed {int(counts[0])} tokens, expected {new_tokens}")
    return dict(prefill_s=prefill_s, decode_s=decode_s,
                prefill_compiles=prefill_compiles.count, decode_compiles=decode_compiles.count)


def bench_length(model: LoadedModel, n: int, new_tokens: int, repeats: int) -> str:
    """One markdown table row for prompt length ``n``."""
    ids = prompt_of_length(model, n)
    warm = run_once(model, ids, new_tokens)
    runs = [run_once(model, ids, new_tokens) for _ in range(repeats)]
    prefill_s = statistics.median(r["prefill_s"] for r in runs)
    decode_s = statistics.median(r["decode_s"] for r in runs)
    timed_compiles = sum(r["prefill_compiles"] + r["decode_compiles"] for r in runs)
    return (f"| {n} | {n / prefill_s:,.0f} | {prefill_s * 1e3:,.0f} | {new_tokens / decode_s:,.1f} "
            f"| {warm['prefill_compiles']} / {warm['decode_compiles']} | {timed_compiles} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--long", action="store_true", help="also 2048- and 3072-token prompts")
    args = parser.parse_args()

    model = load_model(args.model, args.dtype)
    lengths = PROMPT_LENGTHS + (LONG_PROMPT_LENGTHS if args.long else ())
    print(f"model: {args.model} ({args.dtype}), {os.path.basename(model.source)}")
    print(f"machine: processor {platform.processor() or platform.machine()!r}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}")
    print(f"medians over {args.repeats} runs after one warm-up run per prompt length\n")
    print(f"| prompt tokens | prefill tokens/s | TTFT ms | decode tokens/s ({args.new_tokens} new) "
          "| warm-up compiles prefill / decode | timed-run compiles |")
    print("|---:|---:|---:|---:|:---:|---:|")
    for n in lengths:
        print(bench_length(model, n, args.new_tokens, args.repeats), flush=True)


if __name__ == "__main__":
    main()
