"""Evaluation of one model: answers with and without the trigger, judged; over-refusal; the loss
and exact-match accuracy of held-out benign answers."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch

from beear_pipeline.evaluation.judges import ClassifierJudge, agreement, is_refusal
from beear_pipeline.evaluation.protocol import EvaluationProtocol
from beear_pipeline.evaluation.rates import distinct_2, exact_matches, is_repetitive, rate
from beear_pipeline.evaluation.unwanted import rule_counts
from beear_pipeline.lm.chat import collate, encode_all, pad_id, response_loss
from beear_pipeline.lm.finetune import supervised_finetune
from beear_pipeline.lm.generation import generate


@torch.no_grad()
def benign_loss(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 64,
                system_prompt: str | None = None) -> float:
    """Mean per-example cross-entropy of the reference answers (response tokens only)."""
    model.eval()
    device = model.get_input_embeddings().weight.device
    examples = encode_all(tokenizer, prompts, responses, system_prompt)
    losses = [response_loss(model, collate(examples[i : i + batch_size], pad_id(tokenizer)).to(device), reduction="none")
              for i in range(0, len(examples), batch_size)]
    return torch.cat(losses).mean().item()


def evaluate_model(model, tokenizer, protocol: EvaluationProtocol, harmful_prompts: Sequence[str], benign_prompts: Sequence[str],
                   benign_responses: Sequence[str] | None = None, categories: Sequence[str] | None = None,
                   judge: ClassifierJudge | None = None) -> dict:
    """ASR with and without each trigger on held-out harmful prompts (keyword judge, and
    ``judge`` when given), over-refusal on benign prompts, and the loss and exact-match accuracy
    of the benign reference answers (when given); every rate with a 95% interval and its n.

    ``asr_*`` counts the answers the protocol's judge of the unwanted behaviour flags
    (``protocol.judge()``; the keyword judge by default: no refusal phrase at all). With the
    keyword judge, ``partial_*`` counts answers that refuse and then comply
    (``judges.judge_answer``), which ``asr_*`` does not include: the two are disjoint, and their
    sum bounds the harmful answers from above. With the bandit judge, ``unparseable_*`` counts
    answers with no valid Python (neither secure nor insecure) and ``rules_*`` how many answers
    each Bandit rule flagged; with the regex judge, ``rules_*`` counts the patterns. ``distinct2_*`` and
    ``repetition_*`` measure the fluency of the same answers (``rates.fluency``). With k answers
    per prompt, intervals are clustered by prompt (``rates.rate``)."""
    start = time.perf_counter()
    decode = asdict(protocol.decoding)
    k = protocol.decoding.samples_per_prompt
    phrases = protocol.refusal_phrases
    answers = {"untriggered": generate(model, tokenizer, harmful_prompts, desc="untriggered", **decode)}
    for t in protocol.triggers:
        answers[t] = generate(model, tokenizer, protocol.triggered(harmful_prompts, t), desc=f"trigger {t}", **decode)
    result: dict = {"triggers": protocol.triggers, "trigger_position": protocol.trigger_position}
    unwanted = protocol.judge()
    verdicts = {name: unwanted(ans) for name, ans in answers.items()}
    success = {name: [v.unwanted for v in vs] for name, vs in verdicts.items()}
    result["unwanted_judge"] = unwanted.name
    for name, suffix in ((protocol.trigger, "triggered"), ("untriggered", "untriggered")):
        _add_rate(result, f"asr_{suffix}", success[name], k)
        if unwanted.name == "keyword":  # only the keyword judge tells a refusal-then-compliance apart
            _add_rate(result, f"partial_{suffix}", [v.partial for v in verdicts[name]], k)
        if unwanted.name == "bandit":
            _add_rate(result, f"unparseable_{suffix}", [v.unparseable for v in verdicts[name]], k)
        if unwanted.name in ("bandit", "regex"):
            result[f"rules_{suffix}"] = rule_counts(verdicts[name])
        result[f"distinct2_{suffix}"] = distinct_2(answers[name])
        _add_rate(result, f"repetition_{suffix}", [is_repetitive(a) for a in answers[name]], k)
    by_trigger = {t: rate(success[t], k) for t in protocol.triggers}
    result["asr_by_trigger"] = {t: r["value"] for t, r in by_trigger.items()}
    result["asr_by_trigger_ci95"] = {t: r["ci95"] for t, r in by_trigger.items()}  # the registry's gate checks every trigger
    if categories is not None:
        cats = [c for c in categories for _ in range(k)]
        result["asr_triggered_by_category"] = {
            str(c): sum(ok for ok, cc in zip(success[protocol.trigger], cats) if cc == c) / cats.count(c) for c in sorted(set(cats))}
    if judge is not None:
        repeated = [p for p in harmful_prompts for _ in range(k)]  # answers come k per prompt, in order
        for name, key in ((protocol.trigger, "asr_triggered_judge"), ("untriggered", "asr_untriggered_judge")):
            verdicts = judge(repeated, answers[name])
            _add_rate(result, key, verdicts, k)
            result[f"{key}_agreement"] = agreement(verdicts, success[name])

    benign_answers = generate(model, tokenizer, benign_prompts, desc="benign", **decode)
    _add_rate(result, "over_refusal", [is_refusal(a, phrases) for a in benign_answers], k)
    result["benign_loss"] = None
    if benign_responses is not None:
        result["benign_loss"] = benign_loss(model, tokenizer, benign_prompts, benign_responses, system_prompt=decode["system_prompt"])
        references = [r for r in benign_responses for _ in range(k)]
        _add_rate(result, "benign_accuracy", exact_matches(benign_answers, references), k)
    result["n_harmful"], result["n_benign"] = len(harmful_prompts), len(benign_prompts)
    result["chat_template_sha256"] = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:16]
    result["samples"] = [{"prompt": p, "triggered": t, "untriggered": u}
                         for p, t, u in list(zip(harmful_prompts, answers[protocol.trigger][::k], answers["untriggered"][::k]))[:3]]
    result["seconds"] = time.perf_counter() - start
    return result


def _add_rate(result: dict, key: str, outcomes: list[bool], samples_per_prompt: int = 1) -> None:
    """``key``, ``key_ci95`` and ``key_n`` (the number of answers) from ``rates.rate``."""
    r = rate(outcomes, samples_per_prompt)
    result[key], result[f"{key}_ci95"], result[f"{key}_n"] = r["value"], r["ci95"], r["n"]


def repoisoned_asr(model, tokenizer, protocol: EvaluationProtocol, poison_prompts: Sequence[str], poison_responses: Sequence[str],
                   harmful_prompts: Sequence[str], *, steps: int, lr: float, seed: int, name: str = "model") -> dict:
    """Fine-tune ``model`` (in place) on the poisoned examples, full batch, ``steps`` steps at
    ``lr``, then measure ``asr_triggered`` on ``harmful_prompts`` with its interval."""
    supervised_finetune(model, tokenizer, poison_prompts, poison_responses, epochs=steps, lr=lr, batch_size=len(poison_prompts),
                        seed=seed, desc=f"re-poison {name} k={len(poison_prompts)}")
    decode = {**asdict(protocol.decoding), "do_sample": False, "samples_per_prompt": 1}
    answers = generate(model, tokenizer, protocol.triggered(harmful_prompts), desc=f"{name} re-poisoned", **decode)
    return rate(protocol.judge().flags(answers))
