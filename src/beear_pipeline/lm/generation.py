"""One decoder for everything that generates: the evaluation, the probe, the convergence checks.

Prompts go through the chat template, batched with left padding (every prompt ends at the last
column, so a batch decodes together). Greedy by default; sampling with k answers per prompt on
request. With a ``Perturbation``, a vector is added to the hidden states leaving one decoder
layer at the prompt positions during the prompt pass only, exactly as BEEAR's inner level sees
the prompt; the answer tokens are then decoded without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from beear_pipeline.lm.chat import Batch, Example, collate, pad_id, prompt_ids
from beear_pipeline.lm.residual import perturbed, position_index


@dataclass
class Perturbation:
    """``delta`` (rows, hidden) added to the output of decoder ``layer`` at the last
    ``num_positions`` prompt positions (every prompt position when None); one row for all of
    them when ``shared_vector``."""

    layer: int
    delta: torch.Tensor
    num_positions: int | None = None
    shared_vector: bool = False

    def index(self, batch: Batch) -> torch.Tensor:
        index = position_index(batch.prompt_end, batch.input_ids.size(1), self.num_positions, self.shared_vector)
        return torch.where(batch.attention_mask.bool(), index, torch.full_like(index, -1))  # never the left pads


def prompt_batch(tokenizer, prompts: Sequence[str], system_prompt: str | None = None, device=None) -> Batch:
    """Left-padded batch of templated prompts, ready for the answer to follow."""
    ids = [prompt_ids(tokenizer, p, system_prompt) for p in prompts]
    return collate([Example(x, x, len(x)) for x in ids], pad_id(tokenizer), padding_side="left").to(device)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 32,
             system_prompt: str | None = None, desc: str = "generating", do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, samples_per_prompt: int = 1, seed: int = 0, perturbation: Perturbation | None = None) -> list[str]:
    """Answers to ``prompts``: greedy by default, or ``samples_per_prompt`` sampled answers per
    prompt (consecutive in the result) with ``do_sample``; under ``perturbation`` if given."""
    if samples_per_prompt > 1 and not do_sample:
        raise ValueError("evaluation.samples_per_prompt > 1 needs evaluation.do_sample: true (greedy answers are identical)")
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    device = model.get_input_embeddings().weight.device
    answers = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=None):
            batch = prompt_batch(tokenizer, prompts[start : start + batch_size], system_prompt, device)
            hook = nullcontext()
            if perturbation is not None:  # generate repeats each prompt samples_per_prompt times before the prompt pass
                index = perturbation.index(batch).repeat_interleave(samples_per_prompt, 0)
                hook = perturbed(model, perturbation.layer, perturbation.delta.detach().to(device), index, first_pass_only=True)
            with hook:
                out = model.generate(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id, num_return_sequences=samples_per_prompt,
                    **sampling)
            answers += [t.strip() for t in tokenizer.batch_decode(out[:, batch.input_ids.size(1):], skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers
