"""What every task gives the pipeline runner: roles, prompt templates, tools and scoring.

A user template is plain text with exactly these placeholders (and no other braces):
``{user_question}``, ``{agent_<id>_current}`` (agent <id>'s response this round) and
``{condition_<id>_current}`` (a tool result derived from agent <id>'s response, e.g. the
output of running its code). The runner fills them, or, with KVCOMM, splits the template at
them and reuses their KV caches.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

from kvcomm_jax.agents import sandbox
from kvcomm_jax.agents.tasks import data
from kvcomm_jax.agents.tasks.data import Example
from kvcomm_jax.kvcomm import templates

QUESTION_PLACEHOLDER = "{" + templates.QUESTION + "}"
CONDITION_MAX_CHARS = 600

# (agent_id, role, has_condition) of one predecessor, as passed to `Task.user_template`.
Predecessor = tuple[int, str, bool]

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = ("python", "python3", "py")


def extract_code(text: str) -> str:
    """Python code in a model response.

    The last fenced block tagged python (or, if none, the last untagged block; an unclosed
    fence runs to the end of the text), else the whole response. Leading blank lines and
    trailing whitespace are dropped; indentation is kept (it matters for function bodies).
    """
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    chosen = [b for tag, b in blocks if tag in _PYTHON_TAGS] or [b for tag, b in blocks if not tag]
    code = chosen[-1] if chosen else text
    return re.sub(r"\A(?:[ \t]*\n)+", "", code).rstrip()


def clip(text: str, max_chars: int = CONDITION_MAX_CHARS) -> str:
    """`text` stripped and cut to `max_chars` characters (marked with "...")."""
    text = text.strip()
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


@dataclasses.dataclass(frozen=True)
class Role:
    """A role's system prompt and the instruction that ends its user prompt."""

    system: str
    instruction: str


class Task(abc.ABC):
    """A benchmark task: data, agent roles, prompt templates, tool conditions and scoring.

    Subclasses set the class attributes below and implement `extract_answer`; tasks whose
    roles produce conditions (``code_roles``) implement `_condition`.
    """

    name: ClassVar[str]
    # Left context used when prefilling the question's base cache standalone.
    context_lead_in: ClassVar[str]
    # Worker roles, cycled over the workers of a graph.
    worker_roles: ClassVar[tuple[str, ...]]
    decision_role: ClassVar[str]
    roles: ClassVar[Mapping[str, Role]]
    # Heads a predecessor's block; formatted with agent_id and role.
    agent_header: ClassVar[str]
    # Text before a predecessor's condition placeholder.
    condition_lead_in: ClassVar[str] = ""
    # Roles whose responses are code that the task runs to produce a condition.
    code_roles: ClassVar[frozenset[str]] = frozenset()
    sandbox_timeout_s: ClassVar[float] = 5.0

    def load(self, limit: int | None = None, offset: int = 0) -> list[Example]:
        """This task's examples in the fixed order (see `data.load`)."""
        return data.load(self.name, limit=limit, offset=offset)

    def _role(self, role: str) -> Role:
        if role not in self.roles:
            raise ValueError(f"unknown {self.name} role {role!r}; roles: {', '.join(self.roles)}")
        return self.roles[role]

    def system_prompt(self, role: str) -> str:
        """The system prompt of `role`."""
        return self._role(role).system

    def user_template(self, role: str, predecessors: Sequence[Predecessor]) -> str:
        """The user prompt of an agent with `role`, receiving `predecessors` in the given order.

        Starts with the question (after `context_lead_in`); then, for the decision agent, a
        line introducing the other agents; one block per predecessor (its response, and its
        condition when it has one); and the role's instruction.
        """
        self._role(role)
        blocks = [self.context_lead_in + QUESTION_PLACEHOLDER]
        if role == self.decision_role and predecessors:
            blocks.append("The output of other agents is as follows:")
        seen = set()
        for agent_id, pred_role, has_condition in predecessors:
            if agent_id in seen:
                raise ValueError(f"agent {agent_id} is listed twice")
            seen.add(agent_id)
            if pred_role not in self.worker_roles:
                raise ValueError(f"predecessor {agent_id} has unknown worker role {pred_role!r}")
            block = self.agent_header.format(agent_id=agent_id, role=pred_role)
            block += "\n" + templates.field(templates.response_placeholder(agent_id))
            if has_condition:
                if not self.produces_condition(pred_role):
                    raise ValueError(f"role {pred_role!r} produces no condition")
                block += "\n\n" + self.condition_lead_in + templates.field(templates.condition_placeholder(agent_id))
            blocks.append(block)
        blocks.append(self.roles[role].instruction)
        return "\n\n".join(blocks)

    def produces_condition(self, role: str) -> bool:
        """Whether `role`'s response yields a ``{condition_<id>_current}`` for its receivers."""
        self._role(role)
        return role in self.code_roles

    def condition_text(self, role: str, response: str, example: Example) -> str:
        """The condition derived from `response` (e.g. the output of running its code)."""
        if not self.produces_condition(role):
            raise ValueError(f"{self.name} role {role!r} produces no condition")
        return self._condition(response, example)

    def _condition(self, response: str, example: Example) -> str:
        raise NotImplementedError(f"{self.name} has no conditions")

    def run_code(self, code: str) -> sandbox.SandboxResult:
        """Runs model-written code in the sandbox with this task's time limit."""
        return sandbox.run_python(code, timeout_s=self.sandbox_timeout_s)

    def question_text(self, example: Example) -> str:
        """The text that fills ``{user_question}``."""
        return example.question

    @abc.abstractmethod
    def extract_answer(self, text: str) -> str | None:
        """The answer in a response, normalized for comparison with `Example.gold`; None if none."""

    def is_correct(self, example: Example, final_text: str) -> bool:
        """Whether the decision agent's `final_text` answers `example` correctly."""
        answer = self.extract_answer(final_text)
        return answer is not None and answer == example.gold
