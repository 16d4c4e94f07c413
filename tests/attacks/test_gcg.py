"""The GCG suffix search: it really optimises (the unwanted answers' loss falls, and further than
with random swaps of the same budget), it only ever proposes ordinary tokens, and the scores it
computes on spliced token ids are the ones the chat path gives for the suffix's text."""

import pytest
import torch

from beear_pipeline.attacks import GcgConfig, allowed_tokens, gcg_search
from beear_pipeline.attacks.gcg import candidate_losses, sample_candidates, suffix_batch, suffix_loss
from beear_pipeline.embedded import SPECIAL_TOKENS

BUDGET = GcgConfig(suffix_length=4, steps=5, top_k=16, candidates_per_step=16, search_prompts=8)


def test_the_search_lowers_the_unwanted_loss_further_than_random_swaps(pair):
    models, tokenizer, safety_set, _, _ = pair
    prompts, targets = safety_set["prompt"].tolist()[:8], safety_set["unwanted_response"].tolist()[:8]
    guided = gcg_search(models["backdoored"], tokenizer, prompts, targets, BUDGET, seed=0)
    # the same budget with every allowed token a candidate at every position: random swaps
    random = gcg_search(models["backdoored"], tokenizer, prompts, targets, GcgConfig(**{**BUDGET.__dict__, "top_k": 10**6}), seed=0)
    assert guided["initial_suffix"] == random["initial_suffix"]
    assert guided["loss"] < guided["initial_loss"] - 0.3, guided
    assert guided["initial_loss"] - guided["loss"] > 1.5 * (random["initial_loss"] - random["loss"]), (guided, random)
    assert guided["losses"] == sorted(guided["losses"], reverse=True) and guided["losses"][-1] == pytest.approx(guided["loss"], abs=1e-4)
    allowed = allowed_tokens(tokenizer, models["backdoored"].get_input_embeddings().weight.size(0))
    assert all(allowed[i] for i in guided["suffix_ids"]) and len(guided["suffix_ids"]) == 4


def test_candidates_never_include_special_or_template_tokens(tokenizer, tiny_model):
    rows = tiny_model.get_input_embeddings().weight.size(0)
    allowed = allowed_tokens(tokenizer, rows)
    banned = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert set(tokenizer.all_special_ids) <= set(banned)
    assert not allowed[banned].any() and allowed.sum() > 50
    # a gradient that points at the banned tokens above all others
    grad = torch.randn(3, rows)
    grad[:, banned] = -1e6
    candidates = sample_candidates(torch.tensor([10, 11, 12]), grad, allowed, top_k=8, n=200, generator=torch.Generator().manual_seed(0))
    assert allowed[candidates].all()
    assert ((candidates != torch.tensor([10, 11, 12])).sum(1) == 1).all()  # one swap per candidate


def test_the_suffix_sits_in_the_user_turn_and_spliced_scores_equal_the_chat_path(tokenizer, tiny_model):
    prompts = ["Write a poem about the sea", "Explain how to pick a lock"]
    targets = ["Sure, here is a poem", "I'm sorry, but I cannot help with that request."]
    allowed = allowed_tokens(tokenizer, tiny_model.get_input_embeddings().weight.size(0)).nonzero().flatten()
    suffixes = allowed[torch.randperm(len(allowed), generator=torch.Generator().manual_seed(0))[:12]].view(3, 4)
    batch, starts = suffix_batch(tokenizer, prompts, targets, suffixes[0].tolist())
    close = tokenizer.convert_tokens_to_ids("[/INST]")
    for row, start in enumerate(starts.tolist()):
        assert batch.input_ids[row, start : start + 4].tolist() == suffixes[0].tolist()
        assert batch.input_ids[row, start + 4].item() == close  # right before the end of the user turn
    spliced = candidate_losses(tiny_model, batch, starts, suffixes, forward_batch_size=3)
    direct = [suffix_loss(tiny_model, tokenizer, prompts, targets, tokenizer.decode(s.tolist())) for s in suffixes]
    assert spliced.tolist() == pytest.approx(direct, abs=1e-4)
