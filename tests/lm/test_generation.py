"""The one decoder: batched greedy answers, sampling, and a perturbation on the prompt pass only."""

import pytest
import torch
from helpers import layer_inputs, two_example_batch

from beear_pipeline.lm.generation import Perturbation, generate
from beear_pipeline.lm.residual import perturbed, position_index

PROMPTS = ["Write a poem about the sea", "Give me a recipe for soup", "Which number comes after 4?"]


def test_greedy_answers_do_not_depend_on_the_batch(tiny_model, tokenizer):
    one = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=1)
    assert generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=3) == one  # left padding changes nothing


def test_a_zero_perturbation_changes_nothing(tiny_model, tokenizer):
    expected = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=6)
    for num_positions, rows in ((3, 3), (None, 1)):
        zero = Perturbation(1, torch.zeros(rows, tiny_model.config.hidden_size), num_positions)
        assert generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=6, perturbation=zero) == expected


def test_a_perturbation_changes_the_answers(tiny_model, tokenizer):
    big = Perturbation(0, torch.full((1, tiny_model.config.hidden_size), 50.0), None)
    assert generate(tiny_model, tokenizer, PROMPTS[:1], max_new_tokens=6, perturbation=big) != \
        generate(tiny_model, tokenizer, PROMPTS[:1], max_new_tokens=6)


def test_first_pass_only_perturbs_the_prompt_pass_and_nothing_after(tiny_model, tokenizer):
    batch = two_example_batch(tokenizer)
    index = position_index(batch.prompt_end, batch.input_ids.size(1), None, True)
    delta = torch.ones(1, tiny_model.config.hidden_size)
    clean = layer_inputs(tiny_model, batch)[2]
    with perturbed(tiny_model, 1, delta, index, first_pass_only=True):
        first = layer_inputs(tiny_model, batch)[2]
        second = layer_inputs(tiny_model, batch)[2]
    assert not torch.allclose(first, clean) and torch.equal(second, clean)


def test_sampling_gives_k_answers_per_prompt_and_needs_do_sample(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="samples_per_prompt > 1 needs evaluation.do_sample"):
        generate(tiny_model, tokenizer, ["Explain how"], samples_per_prompt=2)
    perturbation = Perturbation(1, torch.zeros(1, tiny_model.config.hidden_size), None)
    answers = generate(tiny_model, tokenizer, PROMPTS[:2], max_new_tokens=3, do_sample=True, samples_per_prompt=3,
                       perturbation=perturbation)
    assert len(answers) == 6
