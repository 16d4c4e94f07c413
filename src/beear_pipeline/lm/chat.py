"""Chat formatting, batching and the response-only loss, shared by everything that trains or scores.

Every prompt goes through the tokenizer's own chat template, and a training example is the
templated prompt followed by the response tokens and EOS. Building examples by concatenation
(rather than templating the whole conversation and searching for the response) guarantees that
training sees exactly the prefix that generation later sees, for any template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label value that cross-entropy skips: prompt and padding positions


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id, or its end-of-sequence id when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of ``prompt`` rendered by the chat template, ready for the answer to follow."""
    messages = [{"role": "user", "content": prompt}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


@dataclass
class Example:
    """One tokenised prompt/response pair; ``labels`` masks the prompt with ``IGNORE_INDEX``."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int


def encode(tokenizer, prompt: str, response: str, system_prompt: str | None = None) -> Example:
    """Tokenise one pair so that only the response tokens (and EOS) carry a loss."""
    p = prompt_ids(tokenizer, prompt, system_prompt)
    r = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(input_ids=p + r, labels=[IGNORE_INDEX] * len(p) + r, prompt_length=len(p))


def encode_all(tokenizer, prompts: Sequence[str], responses: Sequence[str], system_prompt: str | None = None) -> list[Example]:
    return [encode(tokenizer, p, r, system_prompt) for p, r in zip(prompts, responses, strict=True)]


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
