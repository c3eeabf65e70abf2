"""Agent prompt templates: placeholders, rendering, segment-wise tokenization.

A template is a system text and a user text with placeholders
``{user_question}``, ``{agent_<id>_current}`` (agent ``id``'s response this
round) and ``{condition_<id>_current}`` (a tool result derived from agent
``id``'s response). Rendered with the model's chat format and split at the
placeholders, it becomes ``P + 1`` constant *prefix segments* around ``P``
placeholder spans. Each piece is tokenized apart, as it stands between the
placeholders around it (the first as the start of a prompt, with the BOS the
checkpoint adds; no other piece has one), so a prompt's token ids are the
concatenation of its segments' ids whatever the placeholders hold: dense and reuse
paths see exactly the same tokens.

Those ids are also the prompt text's own tokenization as long as no token spans a
boundary between a placeholder and the template text around it. Contents given as
text are checked for that when they are tokenized (:func:`encode_content`), which
raises :class:`SegmentBoundaryError` naming the placeholder (the engine warns instead
unless ``EngineConfig.strict_segments``); agents' responses enter as the ids they were
generated as.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

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


class SegmentBoundaryError(ValueError):
    """A placeholder's content and the template text next to it tokenize differently together than apart."""


class SegmentBoundaryWarning(UserWarning):
    """:class:`SegmentBoundaryError`'s finding, reported without stopping (``EngineConfig.strict_segments`` off)."""


@dataclasses.dataclass(frozen=True)
class SegmentedTemplate:
    """A rendered template cut at its placeholders.

    prefixes: ``P + 1`` token-id tuples; ``prefixes[0]`` precedes the first
      placeholder, ``prefixes[i]`` directly follows placeholder ``i`` (1-based).
    placeholders: the ``P`` placeholder names in order.
    dummies: token ids standing in for each placeholder in the template prefill.
    texts: the ``P + 1`` pieces of rendered text the prefixes are the tokens of.
    """

    agent_id: int
    placeholders: tuple[str, ...]
    prefixes: tuple[tuple[int, ...], ...]
    dummies: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...]

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

    def check_content(self, tokenizer: Tokenizer, name: str, text: str) -> None:
        """Raise SegmentBoundaryError unless, with ``text`` in placeholder ``name``, the prompt's own
        tokenization there is this template's prefixes around the ids of ``text`` alone.

        The template text on each side is tokenized with ``text`` as its neighbour, as it was
        with the dummy when the template was built; a neighbouring placeholder (no template
        text in between) is not checked.
        """
        index = self.placeholders.index(name)
        neighbours = _neighbours(self.placeholders)
        neighbours[index + 1] = text
        before, after = self.texts[index], self.texts[index + 1]
        content = tokenizer.encode_segment(text)
        if tokenizer.encode_between(before, text, after) == content and all(
            _piece_ids(tokenizer, neighbours[k], self.texts[k], neighbours[k + 1], first=k == 0) == self.prefixes[k]
            for k in (index, index + 1)
        ):
            return
        together = _piece_ids(tokenizer, neighbours[index], before + text + after, neighbours[index + 2], index == 0)
        apart = [*self.prefixes[index], *content, *self.prefixes[index + 1]]
        raise SegmentBoundaryError(
            f"agent {self.agent_id}, placeholder {{{name}}}: its content and the template text around it tokenize "
            f"differently together than apart ({_difference(tokenizer, together, apart)}): a token spans a boundary, "
            "so the prompt's segment-wise ids would not be its own tokenization. Change the template text at the "
            "placeholder (e.g. no space right before it) or the content so that no token spans the boundary"
        )


def _difference(tokenizer: Tokenizer, together: Sequence[int], apart: Sequence[int], context: int = 2) -> str:
    """The tokens of both tokenizations around the first place they differ."""
    first = next((t for t, (a, b) in enumerate(zip(together, apart)) if a != b), min(len(together), len(apart)))
    window = slice(max(first - context, 0), first + context + 1)

    def shown(ids: Sequence[int]) -> str:
        return " ".join(repr(tokenizer.decode([i])) for i in ids[window])

    return f"together: {shown(together)}; apart: {shown(apart)}"


def segment_template(prompt: AgentPrompt, tokenizer: Tokenizer, chat_format: ChatFormat) -> SegmentedTemplate:
    """Render ``prompt`` with the chat format and tokenize it segment-wise."""
    names = prompt.placeholders()
    rendered = chat_format.render([("system", prompt.system), ("user", prompt.user)], add_generation_prompt=True)
    pieces = _PLACEHOLDER.split(rendered)[0::4]  # split() also returns the 3 groups of each match
    if not pieces[-1]:
        raise ValueError(f"agent {prompt.agent_id}: the rendered template must end with text after the last placeholder")
    neighbours = _neighbours(names)
    return SegmentedTemplate(
        agent_id=prompt.agent_id,
        placeholders=names,
        prefixes=tuple(
            _piece_ids(tokenizer, neighbours[i], piece, neighbours[i + 1], first=i == 0) for i, piece in enumerate(pieces)
        ),
        dummies=tuple(tuple(tokenizer.encode_segment(_dummy_text(name))) for name in names),
        texts=tuple(pieces),
    )


def _dummy_text(name: str) -> str:
    """The text standing in for placeholder ``name`` in the template prefill."""
    return name.replace("_", " ")


def _neighbours(names: Sequence[str]) -> list[str]:
    """The text next to each template piece in the template prefill: nothing at the ends, dummies in between."""
    return ["", *(_dummy_text(name) for name in names), ""]


def _piece_ids(tokenizer: Tokenizer, before: str, piece: str, after: str, first: bool) -> tuple[int, ...]:
    """Token ids of the template ``piece`` as it stands between ``before`` and ``after`` (alone where a token
    spans one of its edges); the first piece of a prompt starts with the BOS the checkpoint adds."""
    ids = tokenizer.encode_between(before, piece, after)
    if ids is None:
        ids = tokenizer.encode_segment(piece)
    return tuple(tokenizer.with_bos(ids) if first else ids)


def encode_content(tokenizer: Tokenizer, name: str, text: str, consumers: Iterable[SegmentedTemplate]) -> tuple[int, ...]:
    """Token ids of ``text`` as the content of placeholder ``name``.

    Raises SegmentBoundaryError if, in a ``consumers`` template, a token would span the
    boundary between the content and the template text around the placeholder.
    """
    for template in consumers:
        template.check_content(tokenizer, name, text)
    return tuple(tokenizer.encode_segment(text))


def content_header(chat_format: ChatFormat) -> str:
    """Text that opens a user turn; placed before a placeholder's content when computing its base cache."""
    sentinel = "\x00"
    rendered = chat_format.render([("user", sentinel)], add_generation_prompt=False)
    return rendered[: rendered.index(sentinel)]
