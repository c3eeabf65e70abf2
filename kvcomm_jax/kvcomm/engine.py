"""The KVCOMM engine: agent calls over shared placeholder contents, reusing and correcting KV.

An engine holds the agents' segmented templates, their template KV, and one
anchor pool per placeholder. All of its state is on the instance (two engines
never share anything). A request is one task instance: agents run in
topological order with :meth:`KVCommEngine.run_agent`; each call takes the
dense path (full prefill, then record deviations for contents predicted to be
anchors) or the reuse path (corrected cache + one-token forward) as
kvcomm_algorithm.md section 9 prescribes.

Modes: ``dense`` (baseline, no reuse machinery at all), ``kvcomm`` and
``rotate_only`` (same decisions as ``kvcomm``, but the reused KV is only
re-positioned, never corrected).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvcomm_jax.compile_counter import CompileCounter
from kvcomm_jax.kvcomm import anchor_pool, reuse
from kvcomm_jax.kvcomm.anchor_pool import (
    AnchorPool,
    add_activations,
    check_pool_shapes,
    empty_pool,
    ensure_token_capacity,
)
from kvcomm_jax.kvcomm.matching import predict
from kvcomm_jax.kvcomm.records import CallRecord
from kvcomm_jax.kvcomm.reuse import PlaceholderInputs, assemble_cache
from kvcomm_jax.kvcomm.segments import SegmentKV, extract_segment, segment_difference
from kvcomm_jax.kvcomm.templates import (
    QUESTION,
    AgentPrompt,
    SegmentedTemplate,
    condition_placeholder,
    content_header,
    is_condition,
    placeholder_producer,
    response_placeholder,
    segment_template,
)
from kvcomm_jax.model.buckets import bucket_length
from kvcomm_jax.model.generation import (
    check_prompt_lengths,
    decode,
    pad_prompts,
    prefill,
)
from kvcomm_jax.model.kv_cache import KVCache, init_cache
from kvcomm_jax.model.registry import LoadedModel
from kvcomm_jax.model.rope import inverse_frequencies
from kvcomm_jax.model.sampling import SamplingConfig
from kvcomm_jax.scale import sharding

MODES = ("dense", "kvcomm", "rotate_only")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine settings.

    gamma: entropy threshold of anchor prediction (reuse more as it grows)
    anchor_capacity: V, anchors per placeholder; eviction_window: W oldest considered for eviction
    lead_in: short context placed before a question/condition when computing its base KV
    impl: kernel implementation ("auto", "pallas", "interpret", "reference")
    measure_fidelity: on reuse calls, also run the dense prefill of the same prompt (outside
      the call's TTFT) and record its TTFT, per-layer KV error and first-token agreement
    ignore_eos: decode exactly ``max_new_tokens`` tokens (fixed-length workloads)
    """

    mode: str = "kvcomm"
    gamma: float = 0.3
    anchor_capacity: int = 20
    eviction_window: int = 5
    max_new_tokens: int = 128
    sampling: SamplingConfig = SamplingConfig()
    lead_in: str = "The task is:\n\n"
    impl: str = "auto"
    measure_fidelity: bool = False
    ignore_eos: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (known: {', '.join(MODES)})")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.anchor_capacity < 1 or self.eviction_window < 1:
            raise ValueError("anchor_capacity and eviction_window must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclasses.dataclass
class Content:
    """One placeholder's content within one request.

    ids: its token ids; base: its base KV (frame 0), computed in reuse modes;
    becomes_anchor: the prediction; slot: the pool slot once stored as an anchor.
    """

    ids: tuple[int, ...]
    base: SegmentKV | None = None
    becomes_anchor: bool | None = None
    entropy: float | None = None
    slot: int | None = None


@dataclasses.dataclass
class Request:
    """One task instance flowing through the agents."""

    index: int
    contents: dict[str, Content]
    records: list[CallRecord] = dataclasses.field(default_factory=list)

    def response_text(self, agent_id: int) -> str | None:
        for record in self.records:
            if record.agent_id == agent_id:
                return record.text
        return None


@dataclasses.dataclass(frozen=True)
class _TemplateKV:
    """An agent's template KV: prefix 0 as computed (keys at positions 0..), later prefixes in frame 0."""

    prefix0: SegmentKV
    prefixes: tuple[SegmentKV, ...]


@dataclasses.dataclass(frozen=True)
class PreparedCall:
    """An agent call's prompt: its ids, placeholder contents, segment layout and cache capacity.

    others_ms: time spent computing base KV of its question/conditions (not part of TTFT).
    """

    agent_id: int
    ids: tuple[int, ...]
    contents: dict
    layout: list
    capacity: int
    others_ms: float = 0.0


@jax.jit
def _layer_relative_errors(a: KVCache, b: KVCache, n):
    """Per-layer ``||a - b||_F / ||b||_F`` over the first ``n`` slots of row 0, keys and values: ``([L], [L])``."""
    S = min(a.capacity, b.capacity)
    mask = (jnp.arange(S) < n)[None, None, :, None]  # [1, 1, S, 1]

    def err(x, y):
        x, y = x[:, 0, :, :S].astype(jnp.float32), y[:, 0, :, :S].astype(jnp.float32)  # [L, H, S, D]
        num = jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(x - y), 0.0), axis=(1, 2, 3)))
        den = jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(y), 0.0), axis=(1, 2, 3)))
        return num / jnp.maximum(den, 1e-30)

    return err(a.keys, b.keys), err(a.values, b.values)


def _ready(x):
    jax.block_until_ready(x)
    return time.perf_counter()


def _timed(step):
    """Run the pure ``step()`` and time it: ``(result, warm_ms, compile_ms)``.

    If the step compiled anything, it is run once more on the same inputs and that
    second, warm run is the time reported; the difference is returned as compile time.
    """
    with CompileCounter() as counter:
        start = time.perf_counter()
        out = step()
        first_ms = (_ready(out) - start) * 1e3
    if not counter.count:
        return out, first_ms, 0.0
    start = time.perf_counter()
    out = step()
    warm_ms = (_ready(out) - start) * 1e3
    return out, warm_ms, max(0.0, first_ms - warm_ms)


class KVCommEngine:
    """Runs agent calls for requests, reusing placeholder KV across agents and requests.

    Args:
      model: a :class:`~kvcomm_jax.model.registry.LoadedModel`.
      prompts: one :class:`~kvcomm_jax.kvcomm.templates.AgentPrompt` per agent.
      config: :class:`EngineConfig`.
      mesh: optional ``jax.sharding.Mesh`` (see :mod:`kvcomm_jax.scale.sharding`): params, caches
        and anchor pools are laid out over it and every jitted step keeps those layouts.
        On a multi-device mesh ``impl="auto"`` uses the jnp reference kernels, which XLA
        partitions (the Pallas kernels have no partitioning rule).
    """

    def __init__(
        self, model: LoadedModel, prompts: Sequence[AgentPrompt], config: EngineConfig = EngineConfig(), mesh=None
    ):
        self.mesh = mesh
        if mesh is not None:
            model = dataclasses.replace(model, params=sharding.shard(model.params, sharding.params_shardings(model.config, mesh)))
            if config.impl == "auto" and mesh.size > 1:
                config = dataclasses.replace(config, impl="reference")
        self.model = model
        self.config = config
        ids = [p.agent_id for p in prompts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"agent ids must be unique, got {ids}")
        self.templates: dict[int, SegmentedTemplate] = {
            p.agent_id: segment_template(p, model.tokenizer, model.chat_format) for p in prompts
        }
        self.consumers: dict[str, list[int]] = {}
        for agent, template in self.templates.items():
            for name in template.placeholders:
                producer = placeholder_producer(name)
                if producer is not None and producer not in self.templates:
                    raise ValueError(f"agent {agent} references {{{name}}}, but there is no agent {producer}")
                self.consumers.setdefault(name, []).append(agent)
        self.pools: dict[str, AnchorPool] = {}
        self.inv_freq = jnp.asarray(inverse_frequencies(model.config))
        stop = [] if config.ignore_eos else sorted(model.tokenizer.eos_ids)
        self.stop_ids = jnp.asarray(stop or [-1], jnp.int32)
        tok = model.tokenizer
        self._lead_ids = tuple(tok.encode(content_header(model.chat_format)) + tok.encode(config.lead_in))
        self._template_kv: dict[int, _TemplateKV] = {}
        self._num_requests = 0

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

    # ------------------------------------------------------------------ prefill helpers

    def _capacity(self, prompt_len: int, segment_buckets: Sequence[int] = ()) -> int:
        """Cache slots for a prompt: room for decoding and for bucket-padded segment reads/writes."""
        extra = max([bucket_length(self.config.max_new_tokens, what="max_new_tokens"), *segment_buckets])
        return bucket_length(bucket_length(prompt_len, what="prompt") + extra, what="prompt + padding")

    def _prefill(self, ids: Sequence[int], capacity: int, key):
        """Dense prefill of one prompt: ``(first_token [1], cache, ms, compile_ms)`` (see :func:`_timed`)."""
        tokens, positions, lengths = pad_prompts([ids])

        def step():
            cache = self._place(init_cache(self.model.config, 1, capacity))
            first, _, cache = prefill(
                self.model.params, tokens, positions, lengths, cache, key, self.model.config, self.config.sampling, fresh=True
            )
            return first, cache

        (first, cache), ms, compile_ms = _timed(step)
        return first, cache, ms, compile_ms

    def _place(self, tree):
        """Lay a fresh cache or pool out on the mesh (identity without one)."""
        if self.mesh is None:
            return tree
        rules = sharding.cache_shardings if isinstance(tree, KVCache) else sharding.pool_shardings
        return sharding.shard(tree, rules(tree, self.mesh))

    def _insert_anchor(self, pool, content: "Content", length: int):
        args = (pool, content.base.keys, content.base.values, length, self.config.eviction_window)
        return anchor_pool.insert_anchor(*args) if self.mesh is None else sharding.insert_anchor(*args, self.mesh)

    def _record_deltas(self, pool, slot, agent_id, ph: SegmentKV, pf: SegmentKV):
        args = (pool, slot, agent_id, ph.keys, ph.values, pf.keys, pf.values)
        return anchor_pool.record_deltas(*args) if self.mesh is None else sharding.record_deltas(*args, self.mesh)

    def _correct_segments(self, inputs, apply_offsets: bool):
        options = dict(apply_offsets=apply_offsets, impl=self.config.impl)
        if self.mesh is None:
            return reuse.correct_segments(inputs, self.inv_freq, **options)
        return sharding.correct_segments(inputs, self.inv_freq, self.mesh, **options)

    def _template(self, agent_id: int) -> _TemplateKV:
        """Prefill the agent's template (dummies in the placeholders) once; keep its prefix segments."""
        if agent_id not in self._template_kv:
            template = self.templates[agent_id]
            layout = template.layout(template.dummy_lengths())
            buckets = [bucket_length(n, what="template segment") for _, _, n in layout]
            ids = template.ids()
            _, cache, _, _ = self._prefill(ids, self._capacity(len(ids), buckets), jax.random.PRNGKey(0))
            segments = [
                extract_segment(cache, start, n, self.inv_freq, bucket=b, frame0=i > 0, impl=self.config.impl)
                for i, ((_, start, n), b) in enumerate(zip(layout[0::2], buckets[0::2]))
            ]
            self._template_kv[agent_id] = _TemplateKV(segments[0], tuple(segments[1:]))
        return self._template_kv[agent_id]

    def _pool(self, name: str, length: int) -> AnchorPool:
        c = self.model.config
        if name not in self.pools:
            self.pools[name] = self._place(empty_pool(
                self.config.anchor_capacity, c.num_layers, c.num_kv_heads, c.head_dim,
                bucket_length(length, what=f"placeholder {{{name}}} content"), c.jnp_dtype,
                slots=min(2, self.config.anchor_capacity),
            ))
        if length > self.pools[name].token_capacity:
            self.pools[name] = self._place(ensure_token_capacity(self.pools[name], length))
        return self.pools[name]

    def _observe(self, name: str, content: Content) -> None:
        """Anchor prediction for a content whose base KV is known; updates activation counts."""
        pool = self._pool(name, len(content.ids))
        becomes_anchor, increments, entropy = predict(
            content.base.values, content.base.length, pool.values, pool.lengths, pool.valid, self.config.gamma
        )
        content.becomes_anchor, content.entropy = bool(becomes_anchor), float(entropy)
        if not content.becomes_anchor:
            self.pools[name] = add_activations(pool, increments)

    def _ensure_base(self, request: Request, name: str) -> float:
        """Compute a question/condition content's base KV (behind header + lead-in) and predict; returns ms."""
        content = request.contents[name]
        if content.base is not None:
            return 0.0
        start = time.perf_counter()
        drop, n = len(self._lead_ids), len(content.ids)
        bucket = bucket_length(n, what=f"placeholder {{{name}}} content")
        _, cache, _, _ = self._prefill(self._lead_ids + content.ids, self._capacity(drop + n, [bucket]), jax.random.PRNGKey(0))
        content.base = extract_segment(cache, drop, n, self.inv_freq, bucket=bucket, impl=self.config.impl)
        self._observe(name, content)
        return (_ready(content.base.keys) - start) * 1e3

    # ------------------------------------------------------------------ agent calls

    def _contents_for(self, request: Request, agent_id: int) -> dict[str, Content]:
        out = {}
        for name in self.templates[agent_id].placeholders:
            if name not in request.contents:
                producer = placeholder_producer(name)
                what = "has not run" if not is_condition(name) else "has no condition set (call set_condition)"
                raise ValueError(f"agent {agent_id} needs {{{name}}}, but agent {producer} {what} in this request")
            out[name] = request.contents[name]
        return out

    def _can_reuse(self, agent_id: int, contents: dict[str, Content]) -> bool:
        if self.config.mode == "dense":
            return False
        for name, content in contents.items():
            if content.becomes_anchor or name not in self.pools:
                return False
            if not self.pools[name].usable_for(agent_id, len(content.ids)).any():
                return False
        return True

    def reuse_prefill(self, call: PreparedCall, key, apply_offsets: bool | None = None):
        """The reuse path: corrected cache for ``ids[:-1]``, then a one-token forward.

        Returns ``(first_token [1], cache, breakdown_ms, compile_ms)``; the breakdown holds
        warm times of "matching_offset", "assembly" and "forward" (see :func:`_timed`).
        """
        timings = {}
        cache = self.reuse_cache(call, apply_offsets, timings)
        token = jnp.asarray([[call.ids[-1]]], jnp.int32)
        position = jnp.asarray([[len(call.ids) - 1]], jnp.int32)
        (first, _, cache), timings["forward"], compile_forward = _timed(lambda: prefill(
            self.model.params, token, position, jnp.ones((1,), jnp.int32), cache, key, self.model.config, self.config.sampling,
        ))
        compile_ms = timings.pop("compile") + compile_forward
        return first, cache, timings, compile_ms

    def reuse_cache(self, call: PreparedCall, apply_offsets: bool | None = None, timings: dict | None = None) -> KVCache:
        """The reuse path's cache for all prompt tokens but the last (``lengths = len(ids) - 1``).

        Two jitted calls: matching + offsets for every placeholder, then assembly.
        ``apply_offsets`` defaults to the mode (``kvcomm``: True, ``rotate_only``: False);
        ``timings``, if given, receives their warm milliseconds and the compile time.
        """
        if apply_offsets is None:
            apply_offsets = self.config.mode == "kvcomm"
        template_kv = self._template(call.agent_id)
        inputs = []
        for i, name in enumerate(self.templates[call.agent_id].placeholders):
            pool, content = self.pools[name], call.contents[name]
            deltas = pool.consumers[str(call.agent_id)]
            inputs.append(PlaceholderInputs(
                content=content.base,
                prefix=template_kv.prefixes[i],
                content_start=jnp.int32(call.layout[2 * i + 1][1]),
                prefix_start=jnp.int32(call.layout[2 * i + 2][1]),
                anchor_keys=pool.keys, anchor_values=pool.values, anchor_lengths=pool.lengths,
                usable=jnp.asarray(pool.usable_for(call.agent_id, len(content.ids))),
                ph_keys=deltas.placeholder_keys, ph_values=deltas.placeholder_values,
                pf_keys=deltas.prefix_keys, pf_values=deltas.prefix_values,
            ))
        corrected, matching_ms, compile_matching = _timed(lambda: self._correct_segments(tuple(inputs), apply_offsets))
        segments = [segment for pair in corrected for segment in pair]
        starts = jnp.asarray([start for _, start, _ in call.layout[1:]], jnp.int32)
        cache, assembly_ms, compile_assembly = _timed(lambda: assemble_cache(
            template_kv.prefix0, segments, starts, jnp.int32(len(call.ids) - 1), capacity=call.capacity
        ))
        if timings is not None:
            timings.update(matching_offset=matching_ms, assembly=assembly_ms, compile=compile_matching + compile_assembly)
        return cache

    def _record_anchors(self, agent_id: int, contents, layout, cache: KVCache) -> None:
        """After a dense prefill: store ``real - base`` deviations for contents predicted to be anchors."""
        template, template_kv = self.templates[agent_id], self._template(agent_id)
        for i, name in enumerate(template.placeholders):
            content = contents[name]
            if not content.becomes_anchor:
                continue
            (_, c_start, c_len), (_, p_start, p_len) = layout[2 * i + 1], layout[2 * i + 2]
            prefix_base = template_kv.prefixes[i]
            real_content = extract_segment(cache, c_start, c_len, self.inv_freq, bucket=content.base.bucket, impl=self.config.impl)
            real_prefix = extract_segment(cache, p_start, p_len, self.inv_freq, bucket=prefix_base.bucket, impl=self.config.impl)
            ph = segment_difference(real_content, content.base)
            pf = segment_difference(real_prefix, prefix_base)
            pool = self._pool(name, c_len)
            if content.slot is None:
                pool, content.slot = self._insert_anchor(pool, content, c_len)
            self.pools[name] = self._record_deltas(pool, content.slot, agent_id, ph, pf)

    def _publish_response(self, request: Request, agent_id: int, response: list[int], prompt_len: int, cache) -> float:
        """Make the response the content of ``{agent_<id>_current}``; in reuse modes, its KV is the base."""
        name = response_placeholder(agent_id)
        content = Content(tuple(response))
        request.contents[name] = content
        if self.config.mode == "dense" or name not in self.consumers:
            return 0.0
        start = time.perf_counter()
        bucket = bucket_length(len(response), what=f"placeholder {{{name}}} content")
        content.base = extract_segment(cache, prompt_len, len(response), self.inv_freq, bucket=bucket, impl=self.config.impl)
        self._observe(name, content)
        return (_ready(content.base.keys) - start) * 1e3

    def prepare_call(self, request: Request, agent_id: int) -> PreparedCall:
        """Gather the agent's inputs (computing base KV of questions/conditions in reuse modes) and its prompt."""
        if agent_id not in self.templates:
            raise ValueError(f"unknown agent {agent_id} (agents: {sorted(self.templates)})")
        contents = self._contents_for(request, agent_id)
        others_ms = 0.0
        if self.config.mode != "dense":
            others_ms = sum(self._ensure_base(request, n) for n in contents if placeholder_producer(n) is None or is_condition(n))
        template = self.templates[agent_id]
        ids = tuple(template.ids({n: c.ids for n, c in contents.items()}))
        check_prompt_lengths([ids], self.config.max_new_tokens, self.model.config, names=[f"agent {agent_id}'s prompt"])
        buckets = [bucket_length(len(cn.ids), what=f"placeholder {{{n}}} content") for n, cn in contents.items()]
        if self.config.mode != "dense":
            buckets += [p.bucket for p in self._template(agent_id).prefixes]
        layout = template.layout({n: len(cn.ids) for n, cn in contents.items()})
        return PreparedCall(agent_id, ids, contents, layout, self._capacity(len(ids), buckets), others_ms)

    def run_agent(self, request: Request, agent_id: int) -> CallRecord:
        """One agent call: prefill (dense or reuse), decode, publish the response. Returns its record."""
        call = self.prepare_call(request, agent_id)
        others_ms = call.others_ms
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.sampling.seed), request.index * 4096 + agent_id)
        prefill_key, decode_key = jax.random.split(key)

        reuse = self._can_reuse(agent_id, call.contents)
        if reuse:
            first, cache, breakdown, compile_ms = self.reuse_prefill(call, prefill_key)
        else:
            first, cache, prefill_ms, compile_ms = self._prefill(call.ids, call.capacity, prefill_key)
            breakdown = {"prefill": prefill_ms}
            if self.config.mode != "dense":
                start = time.perf_counter()
                self._record_anchors(agent_id, call.contents, call.layout, cache)
                others_ms += (_ready(jax.tree.leaves(self.pools)) - start) * 1e3
        fidelity = self._fidelity(call, cache, first, prefill_key) if reuse and self.config.measure_fidelity else None

        n = len(call.ids)
        out, count, cache = decode(
            self.model.params, first, jnp.asarray([n], jnp.int32), cache, self.stop_ids, decode_key,
            self.model.config, self.config.sampling, self.config.max_new_tokens,
        )
        response = np.asarray(out)[0, : int(count[0])].tolist()
        others_ms += self._publish_response(request, agent_id, response, n, cache)
        record = CallRecord(
            request=request.index,
            agent_id=agent_id,
            path="reuse" if reuse else "dense",
            prompt_tokens=n,
            reused_tokens=n - 1 if reuse else 0,
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

    def _fidelity(self, call: PreparedCall, reuse_cache: KVCache, reuse_first, key) -> dict:
        """Per-layer relative KV error vs a dense prefill of the same prompt (untimed).

        Reports the cache actually used and, for comparison, the same cache without
        offsets (rotation only), plus first-token agreement with dense.
        """
        dense_first, dense_cache, dense_ms, _ = self._prefill(call.ids, call.capacity, key)
        n = len(call.ids) - 1
        k_err, v_err = _layer_relative_errors(reuse_cache, dense_cache, n)
        k_rot, v_rot = _layer_relative_errors(self.reuse_cache(call, apply_offsets=False), dense_cache, n)
        return {
            "key_error": np.asarray(k_err).tolist(),
            "value_error": np.asarray(v_err).tolist(),
            "rotate_only_key_error": np.asarray(k_rot).tolist(),
            "rotate_only_value_error": np.asarray(v_rot).tolist(),
            "first_token_agrees": bool(int(dense_first[0]) == int(reuse_first[0])),
            "dense_first_token": int(dense_first[0]),
            "dense_ttft_ms": dense_ms,
        }

    # ------------------------------------------------------------------ pools

    def set_pools(self, pools: dict[str, AnchorPool]) -> None:
        """Replace the anchor pools (e.g. restored from a checkpoint), checking they fit this model."""
        c = self.model.config
        for name, pool in pools.items():
            placeholder_producer(name)  # raises on unknown placeholder names
            check_pool_shapes(pool, c.num_layers, c.num_kv_heads, c.head_dim, name)
            if pool.keys.dtype != c.jnp_dtype:
                raise ValueError(f"anchor pool {name!r} has dtype {pool.keys.dtype}, the model uses {c.dtype}")
        self.pools = {name: self._place(pool) for name, pool in pools.items()}
