"""GSM8K: grade-school math word problems with a numeric answer.

Roles cycle math solver -> mathematical analyst -> programming expert -> inspector. The
programming expert writes Python; its printed output (or why it failed) becomes the
condition that follows its answer ("the result is ...").
"""

from __future__ import annotations

import decimal
import re
from typing import ClassVar

from kvcomm_jax.agents.tasks.base import Example, Role, Task, clip, extract_code

_NUMBER = r"-?\$?(?:\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|\.\d+)"
_ANY_NUMBER = re.compile(rf"(?<![\w.]){_NUMBER}")
_ANSWER_IS = re.compile(rf"answer is[\s:*]*({_NUMBER})", re.I)

_END_WITH_ANSWER = 'Finish with "The answer is" followed by the final number itself.'


def normalize_number(text: str) -> str | None:
    """Canonical form of a number: no $ or thousands commas, no trailing zeros or period.

    "$1,234.50" -> "1234.5", "18.00" -> "18", "-0" -> "0"; None if `text` is no number.
    """
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = decimal.Decimal(cleaned)
    except decimal.InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


class GSM8KTask(Task):
    """GSM8K with a numeric exact-match score against the number after ``####``."""

    name = "gsm8k"
    context_lead_in = "Q:\n"
    worker_roles = ("math solver", "mathematical analyst", "programming expert", "inspector")
    decision_role = "final decision maker"
    roles: ClassVar = {
        "math solver": Role(
            "You are a math solver. You solve math word problems step by step.",
            f"Solve the problem step by step. {_END_WITH_ANSWER}"),
        "mathematical analyst": Role(
            "You are a mathematical analyst. You find the quantities in a problem and how "
            "they relate, and check the steps of other solutions.",
            f"List the known quantities, then work out the answer. {_END_WITH_ANSWER}"),
        "programming expert": Role(
            "You are a programming expert. You solve math problems by writing short "
            "Python programs.",
            "Write a short Python program that computes the answer and prints it. "
            "Put the code in a ```python block."),
        "inspector": Role(
            "You are an inspector. You check other people's solutions for mistakes.",
            "Check the answers above for mistakes and give the correct answer. "
            + _END_WITH_ANSWER),
        "final decision maker": Role(
            "You are the final decision maker. You read the answers of other agents and "
            "decide on the final answer.",
            f"Decide which answer is right. {_END_WITH_ANSWER}"),
    }
    agent_header = "Agent {agent_id} as a {role} his answer to this question is:"
    condition_lead_in = "the result is "
    code_roles = frozenset({"programming expert"})

    def _condition(self, response: str, example: Example) -> str:
        result = self.run_code(extract_code(response))
        if not result.ok:
            return clip(f"an error: {result.reason}")
        return clip(result.stdout) or "nothing: the program printed no output"

    def extract_answer(self, text: str) -> str | None:
        """The number after the last "The answer is", else the last number in `text`."""
        stated = _ANSWER_IS.findall(text)
        numbers = stated or _ANY_NUMBER.findall(text)
        return normalize_number(numbers[-1]) if numbers else None
