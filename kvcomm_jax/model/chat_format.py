"""Chat prompt rendering: ChatML and Llama-3 headers, picked from a checkpoint's chat template.

The checkpoint's Jinja template only selects the format (and, for ChatML, the
default system prompt it inserts when the conversation has none); rendering is
plain Python, so no template engine is needed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

Message = tuple[str, str] | Mapping[str, str]

_FORMATS = {
    # name: (marker in the template, turn end token)
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|eot_id|>"),
}
# A literal ChatML system turn in a template is the default system prompt it inserts.
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n([^'\"{}]+?)<\|im_end\|>")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A chat prompt format.

    ``name`` is "chatml" (``<|im_start|>role\\ncontent<|im_end|>\\n``) or "llama3"
    (``<|begin_of_text|>`` then ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``).
    ``default_system`` is prepended as a system turn when the messages start with
    another role, as the template does.
    """

    name: str
    default_system: str | None = None

    def __post_init__(self):
        if self.name not in _FORMATS:
            raise ValueError(f"unknown chat format {self.name!r} (known: {', '.join(_FORMATS)})")

    @classmethod
    def from_template(cls, template: str | None) -> "ChatFormat":
        """The format whose markers the Jinja chat ``template`` uses."""
        if not template:
            raise ValueError("the checkpoint has no chat template")
        if _FORMATS["chatml"][0] in template:
            default = _DEFAULT_SYSTEM.search(template)
            return cls("chatml", default.group(1) if default else None)
        if _FORMATS["llama3"][0] in template:
            return cls("llama3")
        raise ValueError("chat template is neither ChatML (<|im_start|>) nor Llama-3 (<|start_header_id|>)")

    @property
    def end_token(self) -> str:
        """The token that closes a turn (and so ends generation)."""
        return _FORMATS[self.name][1]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Prompt text for ``messages`` ((role, content) pairs or {"role", "content"} dicts)."""
        turns = [(m["role"], m["content"]) if isinstance(m, Mapping) else tuple(m) for m in messages]
        if self.default_system is not None and turns and turns[0][0] != "system":
            turns.insert(0, ("system", self.default_system))
        if self.name == "chatml":
            text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        text = "<|begin_of_text|>" + "".join(
            f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>" for role, content in turns
        )
        return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
