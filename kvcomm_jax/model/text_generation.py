"""Text in, text out: tokenize (optionally through the chat template), generate, decode."""

from __future__ import annotations

import dataclasses

from kvcomm_jax.model.generation import generate
from kvcomm_jax.model.registry import LoadedModel
from kvcomm_jax.model.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class TextResult:
    """A generated response.

    text: the decoded response (stop token excluded)
    ids: its token ids
    prompt_tokens: number of prompt tokens (after the chat template, if used)
    ttft_s: seconds from the start of prefill to the first token
    decode_s: seconds of the decode loop
    tokens_per_s: response tokens per second of the decode loop (each response token is one decode step)
    """

    text: str
    ids: list[int]
    prompt_tokens: int
    ttft_s: float
    decode_s: float
    tokens_per_s: float


def generate_text(
    model: LoadedModel,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    chat: bool = False,
    sampling: SamplingConfig = SamplingConfig(),
    system: str | None = None,
) -> TextResult:
    """Continue ``prompt`` (or, with ``chat=True``, answer it as a user turn after an optional ``system`` turn).

    Generation stops at any of ``model.tokenizer.eos_ids`` or after ``max_new_tokens``.
    """
    if not prompt:
        raise ValueError("prompt is empty")
    if system is not None and not chat:
        raise ValueError("a system prompt needs chat=True")
    if chat:
        messages = ([("system", system)] if system else []) + [("user", prompt)]
        prompt = model.chat_format.render(messages, add_generation_prompt=True)
    ids = model.tokenizer.encode(prompt)
    result = generate(
        model.params, model.config, [ids],
        max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=model.tokenizer.eos_ids,
    )
    response = result.tokens[0]
    return TextResult(
        text=model.tokenizer.decode(response),
        ids=response,
        prompt_tokens=len(ids),
        ttft_s=result.ttft_s,
        decode_s=result.decode_s,
        tokens_per_s=len(response) / result.decode_s if response and result.decode_s > 0 else 0.0,
    )
