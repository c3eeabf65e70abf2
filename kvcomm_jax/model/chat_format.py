"""Chat prompt rendering: ChatML, Llama 3, Gemma and Mistral, each a record of data.

A format is a :class:`TurnFormat`: the text of a turn around its role and content,
the text that opens a prompt, role renames, whether contents are stripped, and how a
system message is written (a turn of its own, or folded into the first user turn
for models without a system role). The checkpoint's Jinja chat template only selects
the format, by the markers it uses (and, for formats with a system turn, gives the
default system prompt it inserts when the conversation has none); a checkpoint without
a template gets the format of its architecture. Rendering is plain Python, so no
template engine is needed.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvcomm_jax.model.tokenizer import Tokenizer

Message = tuple[str, str] | Mapping[str, str]
_CONTENT, _ROLE = "{content}", "{role}"


@dataclasses.dataclass(frozen=True)
class TurnFormat:
    """How one family of chat models writes a conversation.

    turn: the text of a turn, with ``{role}`` and ``{content}`` to fill in.
    role_turns: turn texts of particular roles, in place of ``turn``.
    end_token: the token that closes a turn, and so ends a generation.
    special_tokens: the tokens the format writes, which the vocabulary must have.
    marker: text by which a Jinja chat template is recognized as this format.
    begin: text that opens the prompt (the BOS token, where the template writes it).
    roles: role renames (Gemma writes "assistant" as "model").
    strip: contents are stripped of surrounding whitespace.
    system_separator: None when a system message is a turn of its own; otherwise the
      format has no system role, and a leading system text, then this separator, open
      the message after it (the first user turn).
    architectures: GGUF ``general.architecture`` values whose checkpoints use this
      format when they carry no chat template.
    """

    turn: str | None
    end_token: str
    special_tokens: tuple[str, ...]
    marker: str
    begin: str = ""
    role_turns: Mapping[str, str] = dataclasses.field(default_factory=dict)
    roles: Mapping[str, str] = dataclasses.field(default_factory=dict)
    strip: bool = False
    system_separator: str | None = None
    architectures: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "role_turns", types.MappingProxyType(dict(self.role_turns)))
        object.__setattr__(self, "roles", types.MappingProxyType(dict(self.roles)))

    def around(self, role: str) -> tuple[str, str]:
        """The text before and after the content of a ``role`` turn."""
        turn = self.role_turns.get(role, self.turn)
        if turn is None:
            raise ValueError(f"this chat format has no {role!r} role (roles: {', '.join(self.role_turns)})")
        before, after = turn.replace(_ROLE, self.roles.get(role, role)).split(_CONTENT)
        return before, after

    def written_turns(self, turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """``(role, content)`` of each turn as written: contents stripped if the format strips, and
        a leading system message folded into the next message if the format has no system role."""
        written = [(role, content.strip() if self.strip else content) for role, content in turns]
        if self.system_separator is None or not written or written[0][0] != "system":
            return written
        if len(written) == 1:
            raise ValueError("this chat format has no system role and folds the system message into the next "
                             "message, but there is none")
        (_, system), (role, content) = turns[0], written[1]
        return [(role, system + self.system_separator + content), *written[2:]]

    def render(self, turns: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
        """The prompt text of ``(role, content)`` turns, then the opening of an assistant turn if asked."""
        text = self.begin
        for role, content in self.written_turns(turns):
            before, after = self.around(role)
            text += before + content + after
        return text + (self.around("assistant")[0] if add_generation_prompt else "")


FORMATS: dict[str, TurnFormat] = {
    "chatml": TurnFormat(
        turn="<|im_start|>{role}\n{content}<|im_end|>\n",
        end_token="<|im_end|>",
        special_tokens=("<|im_start|>", "<|im_end|>"),
        marker="<|im_start|>",
    ),
    "llama3": TurnFormat(
        turn="<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        end_token="<|eot_id|>",
        special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        marker="<|start_header_id|>",
        begin="<|begin_of_text|>",
        strip=True,
    ),
    "gemma": TurnFormat(
        turn="<start_of_turn>{role}\n{content}<end_of_turn>\n",
        end_token="<end_of_turn>",
        special_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>"),
        marker="<start_of_turn>",
        begin="<bos>",
        roles={"assistant": "model"},
        strip=True,
        system_separator="\n\n",
        architectures=("gemma", "gemma2", "gemma3"),
    ),
    "mistral": TurnFormat(
        turn=None,
        role_turns={"user": "[INST] {content} [/INST]", "assistant": "{content}</s>"},
        end_token="</s>",
        special_tokens=("<s>", "</s>"),
        marker="[INST]",
        begin="<s>",
        system_separator="\n\n",
    ),
}


def _literal(text: str) -> str:
    """Regex matching ``text`` as a Jinja template writes it: each newline literal or escaped."""
    return r"(?:\n|\\n)".join(re.escape(line) for line in text.split("\n"))


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A chat prompt format: a :class:`TurnFormat` by name, and the checkpoint's default system prompt.

    ``name`` is a key of :data:`FORMATS`: "chatml" (``<|im_start|>role\\ncontent<|im_end|>\\n``),
    "llama3" (``<|begin_of_text|>`` then ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``),
    "gemma" (``<bos>`` then ``<start_of_turn>role\\ncontent<end_of_turn>\\n``, no system role) or
    "mistral" (``<s>[INST] user [/INST]assistant</s>``, no system role). ``default_system``
    is prepended as a system message when the messages start with another role, as the
    template does.
    """

    name: str
    default_system: str | None = None

    def __post_init__(self):
        if self.name not in FORMATS:
            raise ValueError(f"unknown chat format {self.name!r} (known: {', '.join(FORMATS)})")

    @classmethod
    def from_template(cls, template: str | None) -> "ChatFormat":
        """The format whose marker the Jinja chat ``template`` uses, with the default system prompt it writes."""
        if not template:
            raise ValueError("the checkpoint has no chat template")
        for name, spec in FORMATS.items():
            if spec.marker in template:
                return cls(name, _default_system(spec, template))
        markers = ", ".join(f"{spec.marker} ({name})" for name, spec in FORMATS.items())
        raise ValueError(f"the chat template uses none of the known formats' markers: {markers}")

    @classmethod
    def from_metadata(cls, template: str | None, architecture: str | None = None) -> "ChatFormat":
        """The format of a checkpoint: from its chat ``template`` if it has one, else from its ``architecture``."""
        if template:
            return cls.from_template(template)
        for name, spec in FORMATS.items():
            if architecture in spec.architectures:
                return cls(name)
        known = ", ".join(arch for spec in FORMATS.values() for arch in spec.architectures)
        raise ValueError(
            f"the checkpoint has no chat template, and its architecture {architecture!r} implies no chat format "
            f"(architectures that do: {known})"
        )

    @property
    def spec(self) -> TurnFormat:
        """The format's record in :data:`FORMATS`."""
        return FORMATS[self.name]

    @property
    def end_token(self) -> str:
        """The token that closes a turn (and so ends generation)."""
        return self.spec.end_token

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Prompt text for ``messages`` ((role, content) pairs or {"role", "content"} dicts)."""
        turns = [(m["role"], m["content"]) if isinstance(m, Mapping) else tuple(m) for m in messages]
        if self.default_system is not None and turns and turns[0][0] != "system":
            turns.insert(0, ("system", self.default_system))
        return self.spec.render(turns, add_generation_prompt)

    def check_vocabulary(self, tokenizer: "Tokenizer") -> None:
        """Raise ValueError unless the vocabulary of ``tokenizer`` has every token the format writes."""
        missing = [t for t in self.spec.special_tokens if tokenizer.backend.token_to_id(t) is None]
        if missing:
            raise ValueError(
                f"the {self.name} chat format writes {', '.join(missing)}, which the tokenizer's vocabulary lacks: "
                "the checkpoint's tokenizer does not match its chat format"
            )


def _default_system(spec: TurnFormat, template: str) -> str | None:
    """The system prompt ``template`` writes as a literal system turn, if the format has system turns."""
    if spec.system_separator is not None:
        return None
    before, after = spec.around("system")
    found = re.search(_literal(before) + r"([^'\"{}]+?)" + _literal(after), template)
    return found.group(1).replace("\\n", "\n") if found else None
