"""Agent prompt templates: placeholders, rendering, segment-wise tokenization.

A template is a system text and a user text with placeholders
``{user_question}``, ``{agent_<id>_current}`` (agent ``id``'s response this
round) and ``{condition_<id>_current}`` (a tool result derived from agent
``id``'s response). Rendered with the model's chat format and split at the
placeholders, it becomes ``P + 1`` constant *prefix segments* around ``P``
placeholder spans. Every piece is tokenized on its own, so a prompt's token ids
are the concatenation of its segments' ids whatever the placeholders hold:
dense and reuse paths see exactly the same tokens.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from kvcomm_jax.kvcomm.layout import Layout
from kvcomm_jax.model.chat_format import ChatFormat
from kvcomm_jax.model.tokenizer import Tokenizer

QUESTION = "user_question"
_PLACEHOLDER = re.compile(r"\{(user_question|agent_(\d+)_current|condition_(\d+)_current)\}")
_ANY_FIELD = re.compile(r"\{([^{}]*)\}")


def field(name: str) -> str:
    """``name`` as it is written in a template: ``{name}``."""
    return "{" + name + "}"


def response_placeholder(agent_id: int) -> str:
    return f"agent_{agent_id}_current"


def condition_placeholder(agent_id: int) -> str:
    return f"condition_{agent_id}_current"


def placeholder_producer(name: str) -> int | None:
    """The agent id whose output fills ``name`` (None for the user question)."""
    match = _PLACEHOLDER.fullmatch("{" + name + "}")
    if match is None:
        raise ValueError(f"unknown placeholder {{{name}}}")
    producer = match.group(2) or match.group(3)
    return None if producer is None else int(producer)


def is_condition(name: str) -> bool:
    return name.startswith("condition_")


@dataclasses.dataclass(frozen=True)
class AgentPrompt:
    """What a user writes: an agent's id, system text and user text with placeholders."""

    agent_id: int
    system: str
    user: str

    def placeholders(self) -> tuple[str, ...]:
        """Placeholder names in order of appearance; raises on unknown or repeated ones."""
        names = []
        for text in (self.system, self.user):
            for field in _ANY_FIELD.findall(text):
                if _PLACEHOLDER.fullmatch("{" + field + "}") is None:
                    raise ValueError(
                        f"agent {self.agent_id}: unknown placeholder {{{field}}} (allowed: {{user_question}}, "
                        "{agent_<id>_current}, {condition_<id>_current})"
                    )
                if field in names:
                    raise ValueError(f"agent {self.agent_id}: placeholder {{{field}}} appears twice")
                names.append(field)
        return tuple(names)


@dataclasses.dataclass(frozen=True)
class SegmentedTemplate:
    """A rendered template cut at its placeholders.

    prefixes: ``P + 1`` token-id tuples; ``prefixes[0]`` precedes the first
      placeholder, ``prefixes[i]`` directly follows placeholder ``i`` (1-based).
    placeholders: the ``P`` placeholder names in order.
    dummies: token ids standing in for each placeholder in the template prefill.
    """

    agent_id: int
    placeholders: tuple[str, ...]
    prefixes: tuple[tuple[int, ...], ...]
    dummies: tuple[tuple[int, ...], ...]

    def ids(self, contents: Mapping[str, Sequence[int]] | None = None) -> list[int]:
        """Token ids of the prompt with ``contents[name]`` in each placeholder (dummies where absent)."""
        contents = contents or {}
        out = list(self.prefixes[0])
        for name, dummy, prefix in zip(self.placeholders, self.dummies, self.prefixes[1:]):
            out += list(contents.get(name, dummy)) + list(prefix)
        return out

    def layout(self, lengths: Mapping[str, int] | None = None) -> Layout:
        """Where each segment lands for placeholder content ``lengths`` (the dummies' where absent).

        With the dummies this gives template coordinates; with real lengths, the
        positions of each piece in the real prompt.
        """
        lengths = lengths or {}
        return Layout.build(
            self.placeholders,
            [len(p) for p in self.prefixes],
            [lengths.get(name, len(dummy)) for name, dummy in zip(self.placeholders, self.dummies)],
        )



def segment_template(prompt: AgentPrompt, tokenizer: Tokenizer, chat_format: ChatFormat) -> SegmentedTemplate:
    """Render ``prompt`` with the chat format and tokenize it segment-wise."""
    names = prompt.placeholders()
    rendered = chat_format.render([("system", prompt.system), ("user", prompt.user)], add_generation_prompt=True)
    pieces = _PLACEHOLDER.split(rendered)[0::4]  # split() also returns the 3 groups of each match
    if not pieces[-1]:
        raise ValueError(f"agent {prompt.agent_id}: the rendered template must end with text after the last placeholder")
    return SegmentedTemplate(
        agent_id=prompt.agent_id,
        placeholders=names,
        prefixes=tuple(tuple(tokenizer.encode(piece)) if piece else () for piece in pieces),
        dummies=tuple(tuple(tokenizer.encode(name.replace("_", " "))) for name in names),
    )


def content_header(chat_format: ChatFormat) -> str:
    """Text that opens a user turn; placed before a placeholder's content when computing its base cache."""
    sentinel = "\x00"
    rendered = chat_format.render([("user", sentinel)], add_generation_prompt=False)
    return rendered[: rendered.index(sentinel)]
