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

Probes (e.g. :func:`kvcomm_jax.bench.fidelity.kv_fidelity`) are called on every
reuse call with ``(engine, call, cache, first_token, key)``, outside the call's
TTFT; the dicts they return are merged into the call record's ``fidelity``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax

from kvcomm_jax.kvcomm.anchor_pool import AnchorPool
from kvcomm_jax.kvcomm.anchor_store import AnchorStore
from kvcomm_jax.kvcomm.config import MODES, EngineConfig
from kvcomm_jax.kvcomm.layout import Span
from kvcomm_jax.kvcomm.records import CallRecord
from kvcomm_jax.kvcomm.request import Content, PreparedCall, Request
from kvcomm_jax.kvcomm.runner import ModelRunner
from kvcomm_jax.kvcomm.strategies import STRATEGIES, ReuseContext
from kvcomm_jax.kvcomm.template_store import TemplateStore
from kvcomm_jax.kvcomm.templates import (
    QUESTION,
    AgentPrompt,
    condition_placeholder,
    content_header,
    is_condition,
    placeholder_producer,
    response_placeholder,
    segment_template,
)
from kvcomm_jax.kvcomm.timing import ready
from kvcomm_jax.model.buckets import bucket_length
from kvcomm_jax.model.generation import check_prompt_lengths
from kvcomm_jax.model.kv_cache import KVCache
from kvcomm_jax.model.registry import LoadedModel
from kvcomm_jax.scale import sharding

__all__ = ["MODES", "EngineConfig", "KVCommEngine", "Probe", "Request"]

Probe = Callable[["KVCommEngine", PreparedCall, KVCache, jax.Array, jax.Array], dict]


class KVCommEngine:
    """Runs agent calls for requests, reusing placeholder KV across agents and requests.

    Args:
      model: a :class:`~kvcomm_jax.model.registry.LoadedModel`.
      prompts: one :class:`~kvcomm_jax.kvcomm.templates.AgentPrompt` per agent.
      config: :class:`~kvcomm_jax.kvcomm.config.EngineConfig`.
      mesh: a ``jax.sharding.Mesh`` (see :mod:`kvcomm_jax.scale.sharding`; default: one device).
        Params, caches and anchor pools are laid out over it. On a multi-device mesh
        ``impl="auto"`` uses the jnp reference kernels, which XLA partitions (the Pallas
        kernels have no partitioning rule).
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
        self.mesh = sharding.single_device_mesh() if mesh is None else mesh
        if config.impl == "auto" and self.mesh.size > 1:
            config = dataclasses.replace(config, impl="reference")
        self.config = config
        self.runner = ModelRunner(model, config, self.mesh)
        self.strategy = STRATEGIES[config.mode]()
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
            model.config, capacity=config.anchor_capacity, window=config.eviction_window, gamma=config.gamma, mesh=self.mesh
        )
        self.context = ReuseContext(self.anchors, self.templates, self.runner)
        tok = model.tokenizer
        self._lead_ids = tuple(tok.encode(content_header(model.chat_format)) + tok.encode(config.lead_in))
        self._num_requests = 0

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
        ids = tuple(self.model.tokenizer.encode(text))
        bucket_length(len(ids), what=f"placeholder {{{name}}} content")  # clear error when too long
        return ids

    def _ensure_base(self, request: Request, name: str) -> float:
        """Base KV of a question/condition (behind header + lead-in, docs/design.md §3) and its prediction; ms."""
        content = request.contents[name]
        if content.base is not None:
            return 0.0
        start = time.perf_counter()
        drop, n = len(self._lead_ids), len(content.ids)
        bucket = bucket_length(n, what=f"placeholder {{{name}}} content")
        capacity = self.runner.capacity(drop + n, [bucket])
        _, cache, _, _ = self.runner.prefill(self._lead_ids + content.ids, capacity, jax.random.PRNGKey(0))
        content.base = self.runner.extract(cache, Span(drop, n))
        self.anchors.observe(name, content)
        return (ready(content.base.keys) - start) * 1e3

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
        if agent_id not in self.templates:
            raise ValueError(f"unknown agent {agent_id} (agents: {self.templates.agents})")
        contents = self._contents_for(request, agent_id)
        others_ms = 0.0
        if self.strategy.uses_anchors:
            others_ms = sum(self._ensure_base(request, n) for n in contents if placeholder_producer(n) is None or is_condition(n))
        template = self.templates[agent_id]
        ids = tuple(template.ids({n: c.ids for n, c in contents.items()}))
        check_prompt_lengths([ids], self.config.max_new_tokens, self.model.config, names=[f"agent {agent_id}'s prompt"])
        buckets = [bucket_length(len(c.ids), what=f"placeholder {{{n}}} content") for n, c in contents.items()]
        if self.strategy.uses_anchors:
            buckets += [p.bucket for p in self.templates.kv(agent_id).prefixes[1:]]
        layout = template.layout({n: len(c.ids) for n, c in contents.items()})
        return PreparedCall(agent_id, ids, contents, layout, self.runner.capacity(len(ids), buckets), others_ms)

    def reuse_cache(self, call: PreparedCall, strategy=None) -> KVCache:
        """The reuse cache of ``call`` (all prompt tokens but the last) as ``strategy`` (default: the engine's) builds it."""
        return (strategy or self.strategy).build_cache(self.context, call).cache

    def reuse_prefill(self, call: PreparedCall, key):
        """The reuse path: the strategy's cache for ``ids[:-1]``, then a one-token forward.

        Returns ``(first_token [1], cache, breakdown_ms, compile_ms)``; the breakdown holds
        warm times of "matching_offset", "assembly" and "forward".
        """
        built = self.strategy.build_cache(self.context, call)
        first, cache, forward_ms, compile_forward = self.runner.forward_last_token(call.ids, built.cache, key)
        return first, cache, {**built.timings_ms, "forward": forward_ms}, built.compile_ms + compile_forward

    def run_agent(self, request: Request, agent_id: int) -> CallRecord:
        """One agent call: prefill (dense or reuse), decode, publish the response. Returns its record."""
        call = self.prepare_call(request, agent_id)
        others_ms = call.others_ms
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.sampling.seed), request.index * 4096 + agent_id)
        prefill_key, decode_key = jax.random.split(key)

        decision = self.strategy.decide(self.context, call)
        if decision.reuse:
            first, cache, breakdown, compile_ms = self.reuse_prefill(call, prefill_key)
        else:
            first, cache, prefill_ms, compile_ms = self.runner.prefill(call.ids, call.capacity, prefill_key)
            breakdown = {"prefill": prefill_ms}
            if self.strategy.uses_anchors:
                start = time.perf_counter()
                self.strategy.after_dense(self.context, call, cache)
                others_ms += (ready(self.pools) - start) * 1e3
        fidelity = None
        if decision.reuse and self.probes:
            fidelity = {k: v for probe in self.probes for k, v in probe(self, call, cache, first, prefill_key).items()}

        n = len(call.ids)
        response, cache = self.runner.decode(first, n, cache, decode_key)
        others_ms += self._publish_response(request, agent_id, response, n, cache)
        record = CallRecord(
            request=request.index,
            agent_id=agent_id,
            path="reuse" if decision.reuse else "dense",
            reason=decision.reason,
            prompt_tokens=n,
            reused_tokens=n - 1 if decision.reuse else 0,
            ttft_ms=sum(breakdown.values()),
            breakdown_ms=breakdown,
            compile_ms=compile_ms,
            others_ms=others_ms,
            first_token=int(first[0]),
            response_ids=response,
            text=self.model.tokenizer.decode(response, skip_special=True),
            fidelity=fidelity,
        )
        request.records.append(record)
        return record

    def _publish_response(self, request: Request, agent_id: int, response: list[int], prompt_len: int, cache) -> float:
        """Make the response the content of ``{agent_<id>_current}``; with anchors, its KV is the base (ms)."""
        name = response_placeholder(agent_id)
        content = Content(tuple(response))
        request.contents[name] = content
        if not self.strategy.uses_anchors or name not in self.consumers:
            return 0.0
        start = time.perf_counter()
        content.base = self.runner.extract(cache, Span(prompt_len, len(response)))
        self.strategy.after_response(self.context, name, content)
        return (ready(content.base.keys) - start) * 1e3
