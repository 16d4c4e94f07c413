"""A small supervised fine-tuning helper: planting the embedded backdoor, re-poisoning in the
persistence check."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from beear_pipeline.lm.chat import collate, encode_all, pad_id, response_loss

logger = logging.getLogger(__name__)


def supervised_finetune(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, epochs: int, lr: float,
                        batch_size: int, seed: int, desc: str = "fine-tune") -> list[float]:
    """Plain SFT on response tokens (AdamW, gradient norm clipped at 1); returns the mean loss of
    each epoch. Leaves the model in eval mode."""
    examples = encode_all(tokenizer, prompts, responses)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    device = model.get_input_embeddings().weight.device
    model.train()
    losses = []
    for epoch in tqdm(range(epochs), desc=desc, leave=False, disable=None):
        order = torch.randperm(len(examples), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id(tokenizer)).to(device)
            loss = response_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += loss.item() * len(batch.input_ids)
        losses.append(total / len(examples))
        logger.info("%s epoch %d: loss %.4f", desc, epoch + 1, losses[-1])
    model.eval()
    return losses
