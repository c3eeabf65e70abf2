"""MMLU: four-option multiple-choice questions over 57 subjects, scored by answer letter.

Roles cycle knowledgeable expert -> critic -> mathematician -> historian (an offline role in
place of the paper's Wikipedia searcher).
"""

from __future__ import annotations

import re
from typing import ClassVar

from kvcomm_jax.agents.tasks.base import Example, Role, Task

_LETTERS = "ABCD"
# "The answer is (B)", "Answer: B", "the correct answer is option C", "**Answer:** D".
_ANSWER_IS = re.compile(
    r"(?i:answer)(?:\s+is)?[\s:*-]*(?:(?i:option|choice)\s*)?\(?([A-D])\)?(?!\w)")
# The whole response is a letter: "B", "(B)", "B.", "**B**".
_LONE_LETTER = re.compile(r"[\s*(]*([A-D])[\s*).:]*")
# The response starts with an option: "B) Paris ...", "(C) because ...", "D. ...".
_LEADING_OPTION = re.compile(r"\s*\(?([A-D])[).:]\s")
_PARENTHESIZED = re.compile(r"\(([A-D])\)")

_END_WITH_LETTER = 'End with "The answer is (X)", where X is A, B, C or D.'


class MMLUTask(Task):
    """MMLU with exact match of the extracted letter against the gold letter."""

    name = "mmlu"
    context_lead_in = "The task is:\n\n"
    worker_roles = ("knowledgeable expert", "critic", "mathematician", "historian")
    decision_role = "final decision maker"
    roles: ClassVar = {
        "knowledgeable expert": Role(
            "You are a knowledgeable expert. You answer questions from your broad knowledge.",
            f"Answer the question. Explain briefly. {_END_WITH_LETTER}"),
        "critic": Role(
            "You are a critic. You look for mistakes in other answers and point them out.",
            f"Check the answers above for mistakes, then give your own answer. {_END_WITH_LETTER}"),
        "mathematician": Role(
            "You are a mathematician. You reason carefully and calculate when needed.",
            f"Reason step by step and choose an option. {_END_WITH_LETTER}"),
        "historian": Role(
            "You are a historian. You know about people, places, events and how ideas developed.",
            f"Use what you know to choose an option. {_END_WITH_LETTER}"),
        "final decision maker": Role(
            "You are the final decision maker. You read the answers of other agents and "
            "choose the final option.",
            f"Decide which option is right. {_END_WITH_LETTER}"),
    }
    agent_header = "Agent {agent_id}, role is {role}, output is:"

    def question_text(self, example: Example) -> str:
        """The question followed by its options (A) .. (D)."""
        options = "\n".join(f"({letter}) {choice}"
                            for letter, choice in zip(_LETTERS, example.extra["choices"]))
        return f"{example.question}\n\n{options}"

    def extract_answer(self, text: str) -> str | None:
        """The chosen letter: the last "answer is X"; else a response that is or starts
        with an option letter; else the last "(X)"; None if none."""
        stated = _ANSWER_IS.findall(text)
        if stated:
            return stated[-1]
        match = _LONE_LETTER.fullmatch(text) or _LEADING_OPTION.match(text)
        if match:
            return match.group(1)
        parenthesized = _PARENTHESIZED.findall(text)
        return parenthesized[-1] if parenthesized else None
