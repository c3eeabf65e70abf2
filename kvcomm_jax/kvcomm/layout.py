"""Where each segment of an agent's prompt lies (docs/design.md §2).

A prompt built from a template with ``P`` placeholders is ``2P + 1`` segments in
order: ``prefix(0)``, then for each placeholder ``i`` (0-based, template order)
its ``content(i)`` followed by ``prefix(i + 1)``, the constant text after it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Span:
    """Token positions ``[start, start + length)`` of one segment."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclasses.dataclass(frozen=True)
class Layout:
    """The spans of one prompt's segments.

    placeholders: the ``P`` placeholder names in template order
    prefixes:     ``P + 1`` spans of the constant segments
    contents:     ``P`` spans of the placeholder contents
    """

    placeholders: tuple[str, ...]
    prefixes: tuple[Span, ...]
    contents: tuple[Span, ...]

    @classmethod
    def build(cls, placeholders: Sequence[str], prefix_lengths: Sequence[int], content_lengths: Sequence[int]) -> "Layout":
        """Lay ``prefix_lengths`` (``P + 1``) and ``content_lengths`` (``P``) end to end from position 0."""
        if len(prefix_lengths) != len(placeholders) + 1 or len(content_lengths) != len(placeholders):
            raise ValueError(
                f"{len(placeholders)} placeholders need {len(placeholders) + 1} prefix lengths and "
                f"{len(placeholders)} content lengths, got {len(prefix_lengths)} and {len(content_lengths)}"
            )
        prefixes, contents = [Span(0, prefix_lengths[0])], []
        for content_length, prefix_length in zip(content_lengths, prefix_lengths[1:]):
            contents.append(Span(prefixes[-1].end, content_length))
            prefixes.append(Span(contents[-1].end, prefix_length))
        return cls(tuple(placeholders), tuple(prefixes), tuple(contents))

    def prefix(self, i: int) -> Span:
        """Constant segment ``i``: 0 opens the prompt, ``i >= 1`` follows placeholder ``i - 1``."""
        return self.prefixes[i]

    def content(self, i: int) -> Span:
        """The content of placeholder ``i`` (0-based)."""
        return self.contents[i]

    @property
    def length(self) -> int:
        """Tokens in the whole prompt."""
        return self.prefixes[-1].end

    def after_prefix0(self) -> list[Span]:
        """Every segment after ``prefix(0)`` in prompt order: content 0, prefix 1, content 1, ..."""
        return [span for i in range(len(self.contents)) for span in (self.content(i), self.prefix(i + 1))]
