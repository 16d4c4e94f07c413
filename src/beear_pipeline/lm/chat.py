"""Chat formatting, batching and the response-only loss, shared by everything that trains or scores.

Every prompt goes through the tokenizer's own chat template. A training example is the prompt ids
that generation feeds (``prompt_ids``) followed by the tokens the whole conversation, rendered by
the template and tokenised in one piece, has after them. So the model trains on exactly the prefix
generation sees and on the rendered conversation's own response tokens: the template's separator
after the prompt, and no token the conversation lacks (such as a lone SentencePiece ``▁`` that
tokenising the response on its own adds).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that cross-entropy skips: prompt and padding positions


class ChatTemplateError(ValueError):
    """The chat template renders the prompt differently once an answer follows it."""


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id, or its end-of-sequence id when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _messages(prompt: str, system_prompt: str | None, response: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _render(tokenizer, messages: list[dict[str, str]], tokenize: bool = True) -> list[int] | str:
    """``messages`` through the chat template; a generation prompt only when the last turn is the user's."""
    add_generation_prompt = messages[-1]["role"] != "assistant"
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize, return_dict=False)
    return list(out) if tokenize else out


def prompt_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of ``prompt`` rendered by the chat template, ready for the answer to follow."""
    return _render(tokenizer, _messages(prompt, system_prompt))


@dataclass
class Example:
    """One tokenised prompt/response pair; ``labels`` masks the prompt with ``IGNORE_INDEX``."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int


def _encode(tokenizer, prompt: str, response: str, system_prompt: str | None) -> tuple[Example, str | None]:
    """``encode``, and the tokens where a token spans the prompt/response boundary (``None`` when none does)."""
    p = prompt_ids(tokenizer, prompt, system_prompt)
    conversation = _messages(prompt, system_prompt, response)
    full = _render(tokenizer, conversation)
    spans = None
    if full[: len(p)] == p:
        r = full[len(p):]
    else:  # rare, so the texts are rendered only now
        prompt_text, full_text = _render(tokenizer, conversation[:-1], tokenize=False), _render(tokenizer, conversation, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ChatTemplateError(
                f"the chat template renders the prompt differently once an answer follows it ({prompt_text[-40:]!r} is not "
                f"a prefix of {full_text[:len(prompt_text) + 20][-60:]!r}), so no training example can start with the "
                "prompt that generation feeds. Use a template whose generation prompt begins the assistant's turn "
                "(--params model.chat_template=...)")
        r = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        spans = _parting(tokenizer, p, full)
    # generation stops at EOS: keep the template's last one and drop what it renders after (a
    # newline before a next turn); a template that renders none gets one
    eos = tokenizer.eos_token_id
    r = r[: len(r) - r[::-1].index(eos)] if eos in r else [*r, eos]
    return Example(input_ids=p + r, labels=[IGNORE_INDEX] * len(p) + r, prompt_length=len(p)), spans


def _parting(tokenizer, p: list[int], full: list[int]) -> str:
    """The tokens around where ``full`` stops following ``p``."""
    i = next((k for k, (a, b) in enumerate(zip(p, full)) if a != b), min(len(p), len(full)))
    around = lambda ids: tokenizer.convert_ids_to_tokens(ids[max(i - 2, 0): i + 2])  # noqa: E731
    return f"generation feeds ...{around(p)}, the conversation has ...{around(full)}"


def encode(tokenizer, prompt: str, response: str, system_prompt: str | None = None) -> Example:
    """Tokenise one pair so that only the response tokens (and EOS) carry a loss.

    The prompt part is exactly ``prompt_ids`` (what generation feeds). The response part is what
    the whole conversation, rendered with the assistant message and tokenised, has after those ids:
    the template's separator (a space after ``[/INST]`` in llama2, none in mistral), the response,
    and the template's EOS (tokens rendered after it are dropped; one is appended when the
    template renders none).

    When a token spans the end of the prompt and the start of the response (the conversation's
    ids do not start with the prompt's), both cannot hold; the prompt part stays ``prompt_ids``
    and the rest of the rendered conversation is tokenised on its own, with a warning. Raises
    ``ChatTemplateError`` when the template renders the prompt differently once an answer follows.
    """
    example, spans = _encode(tokenizer, prompt, response, system_prompt)
    if spans:
        _warn_spans(1, 1, spans)
    return example


def encode_all(tokenizer, prompts: Sequence[str], responses: Sequence[str], system_prompt: str | None = None) -> list[Example]:
    """``encode`` each pair, with one warning for all the pairs where a token spans the boundary."""
    pairs = [_encode(tokenizer, p, r, system_prompt) for p, r in zip(prompts, responses, strict=True)]
    if spanned := [spans for _, spans in pairs if spans]:
        _warn_spans(len(spanned), len(pairs), spanned[0])
    return [example for example, _ in pairs]


def _escape_markup(text: str) -> str:
    """``text`` with what a rich console would read as markup escaped: Kedro logs through rich,
    which takes a token such as ``[/INST]`` for a closing tag and fails on it."""
    return re.sub(r"(\\*)(\[[a-z#/@][^[]*?])", lambda m: m.group(1) * 2 + "\\" + m.group(2), text)


def _warn_spans(spanned: int, total: int, first: str) -> None:
    first = _escape_markup(first)
    logger.warning(
        "%d of %d examples: a token of the rendered conversation spans the end of the prompt and the start of the response "
        "(first one: %s). The chat template puts no separator the tokenizer splits at after the generation prompt, so these "
        "responses are tokenised on their own after the prompt ids that generation feeds", spanned, total, first)


@dataclass
class Batch:
    """Padded tensors of a list of examples. ``prompt_end[i]`` is the position after the last
    prompt token of row ``i`` in padded coordinates, whatever the padding side."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_end: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.prompt_end)))


def collate(examples: Sequence[Example], pad_token_id: int, padding_side: str = "right") -> Batch:
    """Pad ``examples`` to one length on ``padding_side`` ("left" or "right")."""
    width = max(len(e.input_ids) for e in examples)
    ids, mask, labels, ends = [], [], [], []
    for e in examples:
        pad = width - len(e.input_ids)
        left = pad if padding_side == "left" else 0
        right = pad - left
        ids.append([pad_token_id] * left + e.input_ids + [pad_token_id] * right)
        mask.append([0] * left + [1] * len(e.input_ids) + [0] * right)
        labels.append([IGNORE_INDEX] * left + e.labels + [IGNORE_INDEX] * right)
        ends.append(left + e.prompt_length)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Batch(as_long(ids), as_long(mask), as_long(labels), as_long(ends))


def response_loss(model, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the response tokens only (prompt and padding are ``IGNORE_INDEX``), in
    fp32 and on the logits' device (which differs from the inputs' when a model is split over
    devices). With ``reduction="none"`` it returns one mean loss per row.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits, labels = logits[:, :-1].float(), batch.labels[:, 1:].to(logits.device)
    token_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    counted = (labels != IGNORE_INDEX).float()
    if reduction == "none":
        return (token_loss * counted).sum(1) / counted.sum(1).clamp(min=1)
    return (token_loss * counted).sum() / counted.sum().clamp(min=1)
