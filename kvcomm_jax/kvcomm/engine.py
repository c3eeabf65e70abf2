"""The KVCOMM engine: agent calls over shared placeholder contents (docs/design.md §9).

An engine orchestrates; the work lives in its parts: a
:class:`~kvcomm_jax.kvcomm.template_store.TemplateStore` (each agent's segmented
template and template KV), an :class:`~kvcomm_jax.kvcomm.anchor_store.AnchorStore`
(one anchor pool per placeholder), a :class:`~kvcomm_jax.kvcomm.runner.ModelRunner`
(the model steps on the engine's mesh) and a reuse strategy
(:mod:`kvcomm_jax.kvcomm.strategies`, chosen by ``EngineConfig.mode``) that decides
each call's path and builds its cache. All state is on the instance: two engines
never share anything. A request is one task instance; its agents run in
topological order with :meth:`KVCommEngine.run_agent`.

Probes (e.g. :func:`kvcomm_jax.kvcomm.probes.kv_fidelity`) run once per batched
step, outside the calls' TTFT, as ``probe(engine, calls, cache, first_tokens, key)``
over the step's reuse rows (every row for a probe whose ``all_calls`` is true):
``cache`` holds those rows after the prompt (``lengths`` = prompt lengths) and
``first_tokens [B]`` their first tokens. A probe returns one dict per call, merged
into the call record's ``fidelity``; :func:`~kvcomm_jax.kvcomm.probes.per_call` turns
a one-call probe into one.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvcomm_jax.kvcomm.anchor_pool import AnchorPool
from kvcomm_jax.kvcomm.anchor_store import AnchorStore
from kvcomm_jax.kvcomm.config import EngineConfig
from kvcomm_jax.kvcomm.layout import Span
from kvcomm_jax.kvcomm.plans import (
    PATHS,
    Plan,
    plan_targets,
    selection_budget,
    selection_candidates,
)
from kvcomm_jax.kvcomm.records import CallRecord
from kvcomm_jax.kvcomm.request import Content, PreparedCall, Request
from kvcomm_jax.kvcomm.reuse_step import reuse_cache_and_targets
from kvcomm_jax.kvcomm.runner import ModelRunner
from kvcomm_jax.kvcomm.strategies import (
    MODES,
    STRATEGIES,
    ReuseContext,
    recompute_ratio,
)
from kvcomm_jax.kvcomm.template_store import TemplateStore
from kvcomm_jax.kvcomm.templates import (
    QUESTION,
    AgentPrompt,
    SegmentBoundaryError,
    SegmentBoundaryWarning,
    condition_placeholder,
    content_header,
    encode_content,
    is_condition,
    placeholder_producer,
    response_placeholder,
    segment_template,
)
from kvcomm_jax.kvcomm.timing import ready, timed
from kvcomm_jax.model.buckets import bucket_length
from kvcomm_jax.model.generation import check_prompt_lengths, pad_prompts
from kvcomm_jax.model.kv_cache import KVCache, concat_rows, take_rows
from kvcomm_jax.model.registry import LoadedModel
from kvcomm_jax.scale import sharding
from kvcomm_jax.scale.distributed import host_values

__all__ = ["MODES", "EngineConfig", "KVCommEngine", "Probe", "Request"]

Probe = Callable[["KVCommEngine", Sequence[PreparedCall], KVCache, jax.Array, jax.Array], list[dict]]


class KVCommEngine:
    """Runs agent calls for requests, reusing placeholder KV across agents and requests.

    Args:
      model: a :class:`~kvcomm_jax.model.registry.LoadedModel`.
      prompts: one :class:`~kvcomm_jax.kvcomm.templates.AgentPrompt` per agent.
      config: :class:`~kvcomm_jax.kvcomm.config.EngineConfig`.
      mesh: a ``jax.sharding.Mesh`` (see :mod:`kvcomm_jax.scale.sharding`; default: one device).
        Params, caches and anchor pools are laid out over it, and the Pallas kernels run
        per device (see :mod:`pallas_kernels.partitioned`).
      probes: measurements run on every reuse call, outside its TTFT (see the module docstring).
    """

    def __init__(
        self,
        model: LoadedModel,
        prompts: Sequence[AgentPrompt],
        config: EngineConfig = EngineConfig(),
        mesh=None,
        probes: Sequence[Probe] = (),
    ):
        ids = [p.agent_id for p in prompts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"agent ids must be unique, got {ids}")
        if config.mode not in STRATEGIES:
            raise ValueError(f"unknown mode {config.mode!r} (known: {', '.join(MODES)})")
        strategy = STRATEGIES[config.mode]
        if config.recompute_ratio and strategy.score_rule is None:
            raise ValueError(f"mode {config.mode!r} has no rule to select tokens to recompute; drop recompute_ratio")
        if not config.partial_reuse and not strategy.uses_anchors:
            raise ValueError(f"mode {config.mode!r} never blocks a placeholder, so turning partial reuse off means nothing")
        self.mesh = sharding.single_device_mesh() if mesh is None else mesh
        self.config = config
        self.runner = ModelRunner(model, config, self.mesh)
        self.strategy = strategy()
        self.probes = tuple(probes)
        templates = {p.agent_id: segment_template(p, model.tokenizer, model.chat_format) for p in prompts}
        self.consumers: dict[str, list[int]] = {}
        for agent, template in templates.items():
            for name in template.placeholders:
                producer = placeholder_producer(name)
                if producer is not None and producer not in templates:
                    raise ValueError(f"agent {agent} references {{{name}}}, but there is no agent {producer}")
                self.consumers.setdefault(name, []).append(agent)
        self.templates = TemplateStore(templates, self.runner)
        self.anchors = AnchorStore(
            model.config, capacity=config.anchor_capacity, window=config.eviction_window, gamma=config.gamma, mesh=self.mesh,
            coverage=config.anchor_coverage,
        )
        self.context = ReuseContext(self.anchors, self.templates, self.runner)
        tok = model.tokenizer
        self._lead_ids = tuple(tok.encode(content_header(model.chat_format)) + tok.encode_segment(config.lead_in))
        self._num_requests = 0
        self.boundary_mismatches: dict[str, int] = {}  # contents whose text merged with the template, per placeholder
        self._sizes: dict[tuple, int] = {}  # (what, agent id, ...) -> a step shape's size, only grows (see _settled)

    @property
    def model(self) -> LoadedModel:
        """The model, its params laid out on the engine's mesh."""
        return self.runner.model

    @property
    def pools(self) -> dict[str, AnchorPool]:
        """Placeholder name -> anchor pool."""
        return self.anchors.pools

    def set_pools(self, pools: dict[str, AnchorPool]) -> None:
        """Replace the anchor pools (e.g. restored from a checkpoint), checking they fit this model."""
        self.anchors.replace_all(pools)

    # ------------------------------------------------------------------ requests

    def new_request(self, question: str) -> Request:
        """Start a request whose ``{user_question}`` is ``question``."""
        if not question.strip():
            raise ValueError("the question is empty")
        request = Request(self._num_requests, {QUESTION: Content(self._encode_content(QUESTION, question))})
        self._num_requests += 1
        return request

    def set_condition(self, request: Request, agent_id: int, text: str) -> None:
        """Fill ``{condition_<agent_id>_current}`` (a tool result derived from that agent's output)."""
        name = condition_placeholder(agent_id)
        if name not in self.consumers:
            raise ValueError(f"placeholder {{{name}}} is referenced by no agent")
        request.contents[name] = Content(self._encode_content(name, text))

    def _encode_content(self, name: str, text: str) -> tuple[int, ...]:
        """A question's or condition's ids, checked at the template boundaries (see ``EngineConfig.strict_segments``)."""
        try:
            ids = encode_content(self.model.tokenizer, name, text, [self.templates[a] for a in self.consumers.get(name, [])])
        except SegmentBoundaryError as error:
            if self.config.strict_segments:
                raise
            self.boundary_mismatches[name] = self.boundary_mismatches.get(name, 0) + 1
            if self.boundary_mismatches[name] == 1:
                warnings.warn(f"{error} (first of this placeholder; dense and reuse calls both use the segment-wise ids)",
                              SegmentBoundaryWarning, stacklevel=3)
            ids = tuple(self.model.tokenizer.encode_segment(text))
        bucket_length(len(ids), what=f"placeholder {{{name}}} content")  # clear error when too long
        return ids

    def _ensure_bases(self, requests: Sequence[Request], names: Sequence[str]) -> float:
        """Base KV of questions/conditions without one (behind header + lead-in, docs/design.md §3), and predictions.

        One batched prefill for all of them; returns its milliseconds (work outside TTFT).
        """
        missing = [(name, r.contents[name]) for r in requests for name in names if r.contents[name].base is None]
        if not missing:
            return 0.0
        start = time.perf_counter()
        drop = len(self._lead_ids)
        buckets = [bucket_length(len(c.ids), what=f"placeholder {{{n}}} content") for n, c in missing]
        buckets += [self.anchors.token_capacity(n) for n, _ in missing]
        capacity = self.runner.capacity(drop + max(len(c.ids) for _, c in missing), buckets)
        prompts = [self._lead_ids + c.ids for _, c in missing]
        prompts = _padded(prompts, self._settled(("base rows",), len(prompts)))
        _, cache, _, _ = self.runner.prefill(prompts, capacity, jax.random.PRNGKey(0))
        for row, (name, content) in enumerate(missing):  # bases at their pools' widths: one shape per pool
            width = self.anchors.token_capacity(name)
            content.base = self.runner.extract(cache, Span(drop, len(content.ids)), row=row, width=width)
        for name in dict.fromkeys(n for n, _ in missing):
            self.anchors.observe(name, [c for n, c in missing if n == name])
        return (ready([c.base for _, c in missing]) - start) * 1e3

    def _contents_for(self, request: Request, agent_id: int) -> dict[str, Content]:
        out = {}
        for name in self.templates[agent_id].placeholders:
            if name not in request.contents:
                producer = placeholder_producer(name)
                what = "has not run" if not is_condition(name) else "has no condition set (call set_condition)"
                raise ValueError(f"agent {agent_id} needs {{{name}}}, but agent {producer} {what} in this request")
            out[name] = request.contents[name]
        return out

    # ------------------------------------------------------------------ agent calls

    def prepare_call(self, request: Request, agent_id: int) -> PreparedCall:
        """Gather the agent's inputs (computing base KV of questions/conditions if the strategy uses anchors)."""
        return self._prepare_calls([request], agent_id)[0]

    def _prepare_calls(self, requests: Sequence[Request], agent_id: int) -> list[PreparedCall]:
        if agent_id not in self.templates:
            raise ValueError(f"unknown agent {agent_id} (agents: {self.templates.agents})")
        template = self.templates[agent_id]
        contents = [self._contents_for(r, agent_id) for r in requests]
        others_ms = 0.0
        if self.strategy.uses_bases:
            names = [n for n in template.placeholders if placeholder_producer(n) is None or is_condition(n)]
            others_ms = self._ensure_bases(requests, names) / len(requests)
        calls = []
        for mine in contents:
            ids = tuple(template.ids({n: c.ids for n, c in mine.items()}))
            check_prompt_lengths([ids], self.config.max_new_tokens, self.model.config, names=[f"agent {agent_id}'s prompt"])
            buckets = [bucket_length(len(c.ids), what=f"placeholder {{{n}}} content") for n, c in mine.items()]
            if self.strategy.uses_bases:  # contents are corrected and written at their pools' widths
                buckets += [self.anchors.token_capacity(n) for n in mine]
                buckets += [p.bucket for p in self.templates.kv(agent_id).prefixes[1:]]
            layout = template.layout({n: len(c.ids) for n, c in mine.items()})
            calls.append(PreparedCall(agent_id, ids, mine, layout, self.runner.capacity(len(ids), buckets), others_ms))
        return calls

    def reuse_cache(self, call: PreparedCall, strategy=None) -> KVCache:
        """The cache of every token of ``call``'s prompt as ``strategy`` (default: the engine's) reuses it, before any recompute."""
        return (strategy or self.strategy).build_cache(self.context, [call], call.capacity)

    def reuse_prefill(
        self, calls: Sequence[PreparedCall], plans: Sequence[Plan], capacity: int, key, strategy=None,
        ratio: float | None = None,
    ):
        """The reuse path for a batch of calls: the strategy's cache, then one forward over each plan's computed tokens.

        A strategy with a score rule and a recompute ratio ``r > 0`` adds, per row, the
        ``round(r * approximated tokens)`` approximated tokens it ranks highest. ``strategy``
        and ``ratio`` (default: the engine's) let a probe rebuild the same calls another way.
        Two programs (:func:`~kvcomm_jax.kvcomm.reuse_step.reuse_cache_and_targets`, then the
        forward over the donated cache). Returns ``(first_tokens [B], cache, breakdown_ms,
        compile_ms, computed [B])``: the breakdown holds warm times of "correction_assembly"
        (selection included) and "forward"; ``computed`` counts each row's tokens computed in context.
        """
        strategy = strategy or self.strategy
        agent, settle = calls[0].agent_id, all(p.path == "reuse" for p in plans)

        def size(what: str, needed: int, bounded: bool = True) -> int:  # full reuse steps settle; a partial step's may be wide
            return self._settled((what, agent), needed, bounded) if settle else needed

        targets, counts = plan_targets(plans)  # [B, W], [B]
        targets = np.pad(targets, ((0, 0), (0, size("width", targets.shape[1]) - targets.shape[1])))
        ratio = recompute_ratio(self.context, strategy) if ratio is None else ratio
        candidates = selection_candidates(plans, [c.layout.prefix(0).length for c in calls], capacity)  # [B, S]
        picks = selection_budget(ratio, candidates) if strategy.score_rule else np.zeros(len(calls), np.int32)  # [B]
        extra = size("selected", bucket_length(int(picks.max()), what="selected tokens")) if picks.max() > 0 else 0
        prompts = [c.ids for c in calls]
        prompt_width = size("prompt", bucket_length(max(map(len, prompts)), what="prompt"), bounded=False)  # ids: cheap to pad
        tokens, _, _ = pad_prompts(prompts, width=prompt_width)
        inputs = strategy.step_inputs(self.context, calls)
        model = self.runner.model
        (cache, targets, computed), ms, compile_ms = timed(
            lambda: reuse_cache_and_targets(
                model.params, inputs.placeholders, self.runner.rope, inputs.prefix0, inputs.starts, inputs.lengths,
                tokens, jnp.asarray(targets), jnp.asarray(counts), jnp.asarray(candidates), jnp.asarray(picks),
                capacity=capacity, apply_offsets=strategy.apply_offsets, score_rule=strategy.score_rule, extra=extra,
                config=model.config, impl=self.config.impl, mesh=self.mesh,
            )
        )
        first, cache, forward_ms, compile_forward = self.runner.recompute(tokens, targets, computed, cache, key)
        breakdown = {"correction_assembly": ms, "forward": forward_ms}
        return first, cache, breakdown, compile_ms + compile_forward, (counts + picks).tolist()

    def run_agent(self, request: Request, agent_id: int) -> CallRecord:
        """One agent call: prefill (dense or reuse), decode, publish the response. Returns its record."""
        return self.run_agents([request], agent_id)[0]

    def run_agents(self, requests: Sequence[Request], agent_id: int) -> list[CallRecord]:
        """One agent's calls for ``B`` requests as one batched step; returns their records in request order.

        The rows that go dense share one batched prefill, the fully reused rows one batched
        reuse step, the partly reused rows another (their forwards differ in width), and all
        rows one batched decode. Full reuse steps run as many rows as the agent's largest full
        reuse step (the last row repeated, its copies' results dropped) at one width per agent,
        and every step of an agent one cache capacity: each size the largest it has needed,
        unless that is more than twice what the step needs (see :meth:`_settled`), so new batches
        meet compiled programs; partial steps, whose forwards may be wide, run their own rows at
        their own width. Pool updates are applied after each part in request order; predictions
        within a step see the pools as they were before it. A call's TTFT is its batched part's time. The step's randomness comes from the
        first request's key, so sampled (non-greedy) rows differ from one-by-one runs;
        greedy decoding does not depend on it.
        """
        if not requests:
            raise ValueError("run_agents needs at least one request")
        calls = self._prepare_calls(requests, agent_id)
        capacity = max(c.capacity for c in calls)
        if self.strategy.uses_bases:  # reuse steps settle on one capacity per agent (dense's follows its prompt bucket)
            capacity = self._settled(("capacity", agent_id), capacity)
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.sampling.seed), requests[0].index * 4096 + agent_id)
        prefill_key, decode_key = jax.random.split(key)
        plans = [self.strategy.decide(self.context, c) for c in calls]
        groups = {path: [] for path in PATHS}  # full reuse and partial rows run apart: one forward's width fits each
        for row, plan in enumerate(plans):
            groups[plan.path].append(row)
        groups = {path: rows for path, rows in groups.items() if rows}

        parts = {}  # path -> (first [b'], cache, breakdown_ms, compile_ms, others_ms, computed tokens [b]); b' >= b rows
        for path, rows in groups.items():
            mine = [calls[r] for r in rows]
            if path == "dense":
                first, cache, prefill_ms, compile_ms = self.runner.prefill([c.ids for c in mine], capacity, prefill_key)
                after_ms = self._record_deltas(mine, cache, [range(len(c.layout.placeholders)) for c in mine])
                parts[path] = (first, cache, {"prefill": prefill_ms}, compile_ms, after_ms, [0] * len(rows))
            else:  # full reuse rows padded by repeating the last, so few batch sizes compile
                padded = self._settled(("rows", agent_id), len(rows)) if path == "reuse" else len(rows)
                first, cache, breakdown, compile_ms, computed = self.reuse_prefill(
                    _padded(mine, padded), _padded([plans[r] for r in rows], padded), capacity, prefill_key
                )
                after_ms = self._record_deltas(mine, cache, [plans[r].exact for r in rows])
                parts[path] = (first, cache, breakdown, compile_ms, after_ms, computed[: len(rows)])

        starts = np.cumsum([0, *(part[0].shape[0] for part in parts.values())])  # each part's first row
        where = {row: start + i for start, rows in zip(starts, groups.values()) for i, row in enumerate(rows)}
        first = jnp.concatenate([part[0] for part in parts.values()])  # [B'], padding rows included
        cache = concat_rows([part[1] for part in parts.values()])
        index = [where[row] for row in range(len(calls))]  # request order, padding rows dropped
        if index != list(range(first.shape[0])):
            picked = jnp.asarray(index, jnp.int32)
            first, cache = first[picked], take_rows(cache, picked)
        fidelity = self._run_probes(calls, plans, cache, first, prefill_key)
        lengths = [len(c.ids) for c in calls]
        responses, cache = self.runner.decode(first, lengths, cache, decode_key)
        publish_ms = self._publish_responses(requests, agent_id, responses, lengths, cache)
        first = host_values(first)
        records = []
        for row, (request, call, plan) in enumerate(zip(requests, calls, plans)):
            _, _, breakdown, compile_ms, after_ms, computed = parts[plan.path]
            n, computed = len(call.ids), computed[groups[plan.path].index(row)]
            record = CallRecord(
                request=request.index,
                agent_id=agent_id,
                path=plan.path,
                reason=plan.reason,
                prompt_tokens=n,
                reused_tokens=n - computed if plan.reuses else 0,
                recomputed_tokens=computed,
                ttft_ms=sum(breakdown.values()),
                breakdown_ms=dict(breakdown),
                compile_ms=compile_ms / len(groups[plan.path]),  # its share: sums over records count each once
                others_ms=call.others_ms + after_ms + publish_ms,
                first_token=int(first[row]),
                response_ids=responses[row],
                text=self.model.tokenizer.decode(responses[row], skip_special=True),
                fidelity=fidelity[row],
            )
            request.records.append(record)
            records.append(record)
        return records

    def _settled(self, key: tuple, needed: int, bounded: bool = True) -> int:
        """The size ``key`` of a step's shape (rows, a capacity, a width): the largest any step has needed, so
        programs settle. ``bounded``: unless that is more than twice ``needed``, then ``needed``, so that
        padding never doubles a step's work (a short content among long ones compiles its own program once)."""
        largest = self._sizes[key] = max(self._sizes.get(key, 0), needed)
        return largest if largest <= 2 * needed or not bounded else needed

    def _record_deltas(self, calls: Sequence[PreparedCall], cache: KVCache, placeholders) -> float:
        """Deviations for new anchors among each row's ``placeholders`` computed in context; ms per row (outside TTFT)."""
        if not self.strategy.uses_anchors or not any(placeholders):
            return 0.0
        start = time.perf_counter()
        for row, (call, mine) in enumerate(zip(calls, placeholders)):
            self.strategy.record(self.context, call, cache, row, mine)
        return (ready(self.pools) - start) * 1e3 / len(calls)

    def _run_probes(self, calls, plans: Sequence[Plan], cache: KVCache, first, key) -> list[dict | None]:
        """Each probe on its rows (the reuse rows, or every row when it says ``all_calls``); merged per row."""
        fidelity: list[dict | None] = [None] * len(calls)
        for probe in self.probes:
            rows = [r for r in range(len(calls)) if plans[r].reuses or getattr(probe, "all_calls", False)]
            if not rows:
                continue
            picked = jnp.asarray(rows, jnp.int32)
            found = probe(self, [calls[r] for r in rows], [plans[r] for r in rows], take_rows(cache, picked), first[picked], key)
            for r, measured in zip(rows, found):
                fidelity[r] = {**(fidelity[r] or {}), **measured}
        return fidelity

    def _publish_responses(self, requests, agent_id: int, responses, prompt_lengths, cache) -> float:
        """Make each response the content of ``{agent_<id>_current}``; with anchors, its KV is the base.

        Returns the milliseconds per row (work outside TTFT).
        """
        name = response_placeholder(agent_id)
        contents = [Content(tuple(response)) for response in responses]
        for request, content in zip(requests, contents):
            request.contents[name] = content
        if not self.strategy.uses_bases or name not in self.consumers:
            return 0.0
        start = time.perf_counter()
        width = self.anchors.token_capacity(name)
        for row, (content, n) in enumerate(zip(contents, prompt_lengths)):
            content.base = self.runner.extract(cache, Span(n, len(content.ids)), row=row, width=width)
        self.strategy.after_response(self.context, name, contents)
        return (ready([c.base for c in contents]) - start) * 1e3 / len(contents)


def _padded(items: Sequence, rows: int) -> list:
    """``items`` padded to ``rows`` (at least ``len(items)``) by repeating the last one."""
    return [*items, *[items[-1]] * (rows - len(items))]
