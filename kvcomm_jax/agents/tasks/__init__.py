"""Benchmark tasks (GSM8K, MMLU, HumanEval): data, agent roles, templates and scoring."""

from kvcomm_jax.agents.tasks.base import (
    QUESTION_PLACEHOLDER,
    Predecessor,
    Role,
    Task,
    extract_code,
)
from kvcomm_jax.agents.tasks.data import Example, load
from kvcomm_jax.agents.tasks.gsm8k import GSM8KTask
from kvcomm_jax.agents.tasks.humaneval import HumanEvalTask
from kvcomm_jax.agents.tasks.mmlu import MMLUTask

TASKS: dict[str, type[Task]] = {
    GSM8KTask.name: GSM8KTask,
    MMLUTask.name: MMLUTask,
    HumanEvalTask.name: HumanEvalTask,
}


def get_task(name: str) -> Task:
    """The task called `name` ("gsm8k", "mmlu" or "humaneval")."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = [
    "QUESTION_PLACEHOLDER", "TASKS", "Example", "GSM8KTask", "HumanEvalTask",
    "MMLUTask", "Predecessor", "Role", "Task",
    "extract_code", "get_task", "load",
]
