"""One way to measure an attack: greedy answers through the project's decoder, judged by the
keyword judge, as a rate with its interval (``evaluation.rates.rate``). Every attack of the
``attack`` pipeline reports through it, so their rates compare with each other and with the
evaluation's ``asr_triggered``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from beear_pipeline.evaluation.judges import is_refusal
from beear_pipeline.evaluation.rates import rate
from beear_pipeline.lm.generation import generate


def attack_rate(model, tokenizer, prompts: Sequence[str], phrases: Sequence[str] | Callable[[list[str]], list[bool]], *, max_new_tokens: int, batch_size: int,
                system_prompt: str | None = None, desc: str = "attack") -> dict:
    """ASR on ``prompts`` (already carrying the attack): the share of greedy answers with no
    refusal phrase (or that ``phrases``, when it is a judge, flags), as ``{"value", "ci95", "n"}``."""
    answers = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                       system_prompt=system_prompt, desc=desc)
    if callable(phrases):  # the protocol's judge of the unwanted behaviour (EvaluationProtocol.judge().flags)
        return rate(phrases(answers))
    return rate([not is_refusal(a, phrases) for a in answers])
