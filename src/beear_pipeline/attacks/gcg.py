"""Discrete trigger re-optimisation: a GCG-style search (Zou et al. 2023, "Universal and
Transferable Adversarial Attacks on Aligned Language Models") for one adversarial suffix that,
appended to the prompt inside the user turn, makes the model give the unwanted answers.

Why: BEEAR removes the behaviour a perturbation of the hidden states re-opens. An attacker who
holds the defended weights can search the token space directly; if a short suffix found with the
same budget re-opens the suspect but not the defended model, the defence holds against this
adaptive attacker, and the clean twin tells how much any model gives way to the same search.

Every prompt goes through the project's own chat path (``lm.chat.encode_all`` and ``collate``):
the suffix is written into the prompt text (``f"{prompt} {suffix}"``), the conversation is
rendered and tokenised, and the suffix's token positions are located in it. The search then swaps
tokens at those positions; the loss of the suffix it returns is measured again from its text
through the same path, so the reported loss is what the model sees from that text.

Plain library: no Kedro. Everything runs on the model's device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from beear_pipeline.attacks.config import GcgConfig
from beear_pipeline.lm.chat import IGNORE_INDEX, Batch, collate, encode_all, pad_id, prompt_ids, response_loss

logger = logging.getLogger(__name__)


def with_suffix(prompt: str, suffix: str) -> str:
    """The prompt text the attack sends: the suffix after the prompt, in the user turn."""
    return f"{prompt} {suffix}" if suffix else prompt


def allowed_tokens(tokenizer, vocab_rows: int, *, system_prompt: str | None = None, ascii_only: bool = True) -> torch.Tensor:
    """A boolean mask over the embedding rows: the ordinary vocabulary tokens a suffix may use.

    Excluded, so that the attack cannot forge the conversation's structure or rely on artefacts:
    special tokens (BOS, EOS, padding, unknown, every added special token), the tokens of the chat
    template's own scaffolding (``[INST]``, ``[/INST]``, ``<<SYS>>``: ordinary words in the embedded
    word-level vocabulary), rows beyond the tokenizer (padded embedding matrices), tokens whose text
    is empty or whitespace, tokens that do not come back as themselves when their text is
    tokenised again, and, with ``ascii_only``, tokens with non-printable-ASCII text."""
    mask = torch.zeros(vocab_rows, dtype=torch.bool)
    mask[: min(len(tokenizer), vocab_rows)] = True
    banned = set(tokenizer.all_special_ids)
    banned |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for system in {system_prompt, "system"}:  # the scaffolding with and without a system block
        banned |= set(prompt_ids(tokenizer, "", system))
    banned |= set(encode_all(tokenizer, [""], [""], system_prompt)[0].input_ids)  # the answer's scaffolding (EOS)
    for i in banned:
        if 0 <= i < vocab_rows:
            mask[i] = False
    for i in mask.nonzero().flatten().tolist():
        text = tokenizer.decode([i])
        printable = text.isascii() and text.isprintable()
        mask[i] = bool(text.strip()) and (printable or not ascii_only) and tokenizer(text, add_special_tokens=False)["input_ids"] == [i]
    return mask


def initial_suffix(tokenizer, allowed: torch.Tensor, config: GcgConfig, generator: torch.Generator) -> list[int]:
    """``config.init_token`` repeated when it is one allowed token, else a seeded draw of allowed
    tokens (the same for every model sharing the tokenizer, since the draw is seeded)."""
    ids = tokenizer(config.init_token, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and allowed[ids[0]]:
        return ids * config.suffix_length
    pool = allowed.nonzero().flatten()
    return pool[torch.randint(len(pool), (config.suffix_length,), generator=generator)].tolist()


def _round_trips(tokenizer, ids: Sequence[int]) -> bool:
    """The suffix's text tokenises back into the same ids (else the text the attack would send
    is not the suffix that was scored)."""
    return tokenizer(tokenizer.decode(list(ids)), add_special_tokens=False)["input_ids"] == list(ids)


def _last_occurrence(seq: Sequence[int], sub: Sequence[int]) -> int:
    for start in range(len(seq) - len(sub), -1, -1):
        if list(seq[start : start + len(sub)]) == list(sub):
            return start
    return -1


def suffix_batch(tokenizer, prompts: Sequence[str], targets: Sequence[str], suffix_ids: Sequence[int],
                 system_prompt: str | None = None) -> tuple[Batch, torch.Tensor]:
    """The search batch: each prompt with the suffix's text, and its target answer, through the
    chat template (right padding); and the start of the suffix in each row."""
    text = tokenizer.decode(list(suffix_ids))
    examples = encode_all(tokenizer, [with_suffix(p, text) for p in prompts], targets, system_prompt)
    starts = []
    for prompt, example in zip(prompts, examples, strict=True):
        start = _last_occurrence(example.input_ids[: example.prompt_length], suffix_ids)
        if start < 0:
            raise ValueError(f"attack.gcg: the suffix {text!r} is tokenised differently after the prompt {prompt[:40]!r} under "
                             "the chat template, so its positions cannot be located; choose another attack.gcg.init_token")
        starts.append(start)
    return collate(examples, pad_id(tokenizer)), torch.tensor(starts)


def row_losses(model, attention_mask: torch.Tensor, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """Mean cross-entropy of each row's response tokens, as ``response_loss(reduction="none")``,
    for right-padded rows given as ``input_ids`` or ``inputs_embeds``. Only the positions that
    predict a response token of some row get logits (``logits_to_keep``): the search scores
    thousands of rows, and the full vocabulary's logits at every prompt position cost more than the
    model itself on a small model."""
    counted_any = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().flatten()
    lo, hi = int(counted_any.min()), int(counted_any.max()) + 1  # logit positions lo..hi-1 predict labels lo+1..hi
    keep = torch.arange(lo, hi, device=attention_mask.device)
    logits = model(attention_mask=attention_mask, logits_to_keep=keep, **inputs).logits
    if logits.size(1) != hi - lo:  # a model that ignores logits_to_keep returns every position
        logits = logits[:, lo:hi]
    logits, labels = logits.float(), labels[:, lo + 1 : hi + 1].to(logits.device)
    token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                              reduction="none").view(labels.shape)
    counted = (labels != IGNORE_INDEX).float()
    return (token * counted).sum(1) / counted.sum(1).clamp(min=1)


def token_gradient(model, batch: Batch, starts: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """d(mean unwanted loss) / d(one-hot suffix): one row per suffix position, one column per
    embedding row. A negative entry says swapping that token in should lower the loss."""
    embedding = model.get_input_embeddings()
    weight = embedding.weight
    one_hot = torch.zeros(len(suffix), weight.size(0), dtype=weight.dtype, device=weight.device)
    one_hot.scatter_(1, suffix.to(weight.device).unsqueeze(1), 1.0)
    one_hot.requires_grad_(True)
    embeds = embedding(batch.input_ids).detach().clone()
    rows = torch.arange(len(starts), device=embeds.device).unsqueeze(1).expand(-1, len(suffix))
    cols = starts.to(embeds.device).unsqueeze(1) + torch.arange(len(suffix), device=embeds.device)
    embeds[rows, cols] = (one_hot @ weight).unsqueeze(0).expand(len(starts), -1, -1)
    loss = row_losses(model, batch.attention_mask, batch.labels, inputs_embeds=embeds).mean()
    return torch.autograd.grad(loss, one_hot)[0]


def sample_candidates(suffix: torch.Tensor, grad: torch.Tensor, allowed: torch.Tensor, top_k: int, n: int,
                      generator: torch.Generator) -> torch.Tensor:
    """``n`` suffixes, each with one position swapped for one of that position's ``top_k`` allowed
    tokens with the most negative gradient (GCG's candidate step; position and token uniform)."""
    scores = grad.detach().float().cpu().clone()
    scores[:, ~allowed] = float("inf")
    k = min(top_k, int(allowed.sum()))
    top = (-scores).topk(k, dim=1).indices  # (positions, k)
    positions = torch.randint(len(suffix), (n,), generator=generator)
    picks = top[positions, torch.randint(k, (n,), generator=generator)]
    candidates = suffix.repeat(n, 1)
    candidates[torch.arange(n), positions] = picks
    return candidates


@torch.no_grad()
def candidate_losses(model, batch: Batch, starts: torch.Tensor, candidates: torch.Tensor, forward_batch_size: int) -> torch.Tensor:
    """Mean unwanted loss over the search prompts of each candidate suffix (exact, no gradient)."""
    device = model.get_input_embeddings().weight.device
    n_prompts, length = batch.input_ids.size(0), candidates.size(1)
    cols = (starts.unsqueeze(1) + torch.arange(length)).to(device)
    rows = torch.arange(n_prompts, device=device).unsqueeze(1).expand(-1, length)
    per_candidate = max(1, forward_batch_size // n_prompts)
    losses = []
    for i in range(0, len(candidates), per_candidate):
        chunk = candidates[i : i + per_candidate].to(device)
        ids = batch.input_ids.repeat(len(chunk), 1, 1)  # (chunk, prompts, seq)
        ids[:, rows, cols] = chunk.unsqueeze(1).expand(-1, n_prompts, -1)
        rows_loss = row_losses(model, batch.attention_mask.repeat(len(chunk), 1), batch.labels.repeat(len(chunk), 1),
                               input_ids=ids.flatten(0, 1))
        losses.append(rows_loss.view(len(chunk), n_prompts).mean(1).cpu())
    return torch.cat(losses)


@torch.no_grad()
def suffix_loss(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], suffix_text: str,
                system_prompt: str | None = None, batch_size: int = 64) -> float:
    """Mean unwanted loss of the suffix's text, through the project's chat path (no splicing)."""
    device = model.get_input_embeddings().weight.device
    examples = encode_all(tokenizer, [with_suffix(p, suffix_text) for p in prompts], targets, system_prompt)
    rows = [response_loss(model, collate(examples[i : i + batch_size], pad_id(tokenizer)).to(device), reduction="none")
            for i in range(0, len(examples), batch_size)]
    return torch.cat(rows).mean().item()


@contextmanager
def _frozen(model):
    """Weights frozen and dropout off for the search; restored afterwards."""
    flags, was_training = [p.requires_grad for p in model.parameters()], model.training
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def gcg_search(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], config: GcgConfig, *, seed: int = 0,
               system_prompt: str | None = None, desc: str = "GCG") -> dict:
    """Search a suffix of ``config.suffix_length`` allowed tokens that minimises the mean loss of
    ``targets`` (the unwanted answers) after ``prompts`` + suffix. Each step: the gradient with
    respect to the one-hot suffix, ``candidates_per_step`` one-token swaps among each position's
    ``top_k``, scored exactly; the best candidate becomes the current suffix (as GCG, even when
    it is worse), and the best suffix seen is returned.

    Returns ``{"suffix", "suffix_ids", "initial_suffix", "initial_loss", "loss", "losses" (the
    best loss after each step), "steps", "candidates_per_step", "candidates_scored", "seconds"}``;
    ``initial_loss`` and ``loss`` are measured from the suffixes' texts through the chat path."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    weight = model.get_input_embeddings().weight
    allowed = allowed_tokens(tokenizer, weight.size(0), system_prompt=system_prompt, ascii_only=config.ascii_only)
    if not allowed.any():
        raise ValueError("attack.gcg: the tokenizer has no ordinary token to build a suffix from (all are special, template "
                         "or non-ASCII tokens); set attack.gcg.ascii_only: false")
    init = initial_suffix(tokenizer, allowed, config, generator)
    if not _round_trips(tokenizer, init):
        raise ValueError(f"attack.gcg: the initial suffix {tokenizer.decode(init)!r} does not tokenise back into itself; "
                         "choose another attack.gcg.init_token")
    batch, starts = suffix_batch(tokenizer, prompts, targets, init, system_prompt)
    device = weight.device
    batch = batch.to(device)
    current = torch.tensor(init)
    scored = 0
    with _frozen(model):
        best_loss = candidate_losses(model, batch, starts, current.unsqueeze(0), config.forward_batch_size).item()
        best, losses = current.clone(), []
        for _ in tqdm(range(config.steps), desc=desc, leave=False, disable=None):
            with torch.enable_grad():
                grad = token_gradient(model, batch, starts, current)
            candidates = sample_candidates(current, grad, allowed, config.top_k, config.candidates_per_step, generator)
            keep = [c for c in torch.unique(candidates, dim=0) if not torch.equal(c, current) and _round_trips(tokenizer, c.tolist())]
            if keep:
                candidates = torch.stack(keep)
                step_losses = candidate_losses(model, batch, starts, candidates, config.forward_batch_size)
                scored += len(candidates)
                i = int(step_losses.argmin())
                current = candidates[i].clone()
                if step_losses[i] < best_loss:
                    best_loss, best = step_losses[i].item(), current.clone()
            losses.append(best_loss)
        text, init_text = tokenizer.decode(best.tolist()), tokenizer.decode(init)
        initial_loss = suffix_loss(model, tokenizer, prompts, targets, init_text, system_prompt)
        loss = suffix_loss(model, tokenizer, prompts, targets, text, system_prompt)
    if abs(loss - best_loss) > 1e-3 * max(1.0, abs(loss)):
        logger.warning("attack.gcg: the suffix %r scores %.4f from its text but %.4f at the searched positions: the chat template "
                       "tokenises it differently in context", text, loss, best_loss)
    result = {"suffix": text, "suffix_ids": best.tolist(), "initial_suffix": init_text, "initial_loss": initial_loss, "loss": loss,
              "losses": losses, "steps": config.steps, "candidates_per_step": config.candidates_per_step,
              "candidates_scored": scored, "seconds": time.perf_counter() - start}
    logger.info("%s: suffix %r, unwanted loss %.3f -> %.3f in %.1f s", desc, text, initial_loss, loss, result["seconds"])
    return result
