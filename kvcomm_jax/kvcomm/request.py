"""A request's data: its placeholder contents, and one agent call's prepared prompt."""

from __future__ import annotations

import dataclasses

from kvcomm_jax.kvcomm.layout import Layout
from kvcomm_jax.kvcomm.records import CallRecord
from kvcomm_jax.kvcomm.segments import SegmentKV


@dataclasses.dataclass
class Content:
    """One placeholder's content within one request.

    ids: its token ids; base: its base KV (frame 0), computed when the strategy uses anchors;
    becomes_anchor: the anchor prediction (docs/design.md §8), and anchor_reason why when it is one;
    slot: its pool slot once stored as an anchor.
    """

    ids: tuple[int, ...]
    base: SegmentKV | None = None
    becomes_anchor: bool | None = None
    anchor_reason: str | None = None
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
class PreparedCall:
    """An agent call's prompt: its ids, placeholder contents, segment layout and cache capacity.

    others_ms: time spent computing base KV of its question/conditions (not part of TTFT).
    """

    agent_id: int
    ids: tuple[int, ...]
    contents: dict[str, Content]
    layout: Layout
    capacity: int
    others_ms: float = 0.0
