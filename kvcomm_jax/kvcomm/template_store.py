"""Each agent's segmented template and its template KV (docs/design.md §2).

An agent's template KV comes from one dense prefill of its template with dummy
text in the placeholders, done on first use: prefix 0 is kept as computed (an
exact prefix of every real prompt) and every later prefix segment in frame 0,
the base that reuse re-positions and corrects.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax

from kvcomm_jax.kvcomm.segments import SegmentKV
from kvcomm_jax.kvcomm.templates import SegmentedTemplate
from kvcomm_jax.model.buckets import bucket_length

if TYPE_CHECKING:
    from kvcomm_jax.kvcomm.runner import ModelRunner


@dataclasses.dataclass(frozen=True)
class TemplateKV:
    """KV of an agent's ``P + 1`` prefix segments, each ``[L, H, T, D]`` padded to a bucket.

    ``prefix(0)`` holds keys at positions ``0..``; ``prefix(i)``, ``i >= 1``, holds them in frame 0.
    """

    prefixes: tuple[SegmentKV, ...]

    def prefix(self, i: int) -> SegmentKV:
        return self.prefixes[i]


class TemplateStore:
    """Agent id -> :class:`SegmentedTemplate`, and its :class:`TemplateKV` computed once on first use."""

    def __init__(self, templates: dict[int, SegmentedTemplate], runner: "ModelRunner"):
        self.templates = templates
        self.runner = runner
        self._kv: dict[int, TemplateKV] = {}

    def __getitem__(self, agent_id: int) -> SegmentedTemplate:
        return self.templates[agent_id]

    def __contains__(self, agent_id: int) -> bool:
        return agent_id in self.templates

    @property
    def agents(self) -> list[int]:
        return sorted(self.templates)

    def kv(self, agent_id: int) -> TemplateKV:
        """The agent's template KV (one dense prefill of the template the first time)."""
        if agent_id not in self._kv:
            template = self.templates[agent_id]
            layout = template.layout()
            buckets = [bucket_length(s.length, what="template segment") for s in (*layout.prefixes, *layout.contents)]
            ids = template.ids()
            _, cache, _, _ = self.runner.prefill([ids], self.runner.capacity(len(ids), buckets), jax.random.PRNGKey(0))
            self._kv[agent_id] = TemplateKV(tuple(
                self.runner.extract(cache, span, frame0=i > 0) for i, span in enumerate(layout.prefixes)
            ))
        return self._kv[agent_id]
