"""The engine on every decoder family we support: a tiny random model of each, built from its
config (no downloads), with the hook, the activation reuse, the trainable scopes and one round."""

import copy

import pytest
import torch
import transformers as T
from helpers import layer_inputs, two_example_batch

from beear_pipeline.beear import BeearConfig, run_beear
from beear_pipeline.beear.scopes import parameter_sections, trainable_parameters
from beear_pipeline.lm.chat import encode, prompt_ids, response_loss
from beear_pipeline.lm.residual import anchor_output, decoder_layers, perturbed, position_index, reused_activations

LAYERS = 3
ANCHOR = 1


def _config(arch: str, vocab: int):
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, **ids)
    gqa = dict(num_key_value_heads=2)
    return {
        "llama": lambda: T.LlamaConfig(**common, **gqa),
        "mistral": lambda: T.MistralConfig(**common, **gqa, sliding_window=4),
        "qwen2": lambda: T.Qwen2Config(**common, **gqa),
        "qwen3": lambda: T.Qwen3Config(**common, **gqa, head_dim=8),
        "gemma2": lambda: T.Gemma2Config(**common, **gqa, head_dim=8),
        "gemma3": lambda: T.Gemma3TextConfig(**common, **gqa, head_dim=8),
        "phi3": lambda: T.Phi3Config(**common, **gqa),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=LAYERS, n_head=4, **ids),
    }[arch]()


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_neox", "gpt2"]


@pytest.fixture(params=ARCHS)
def model(request, tokenizer):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(_config(request.param, len(tokenizer))).eval()


@pytest.mark.parametrize("side", ["left", "right"])
def test_perturbation_lands_at_the_anchor_output_and_positions(model, tokenizer, side):
    assert len(decoder_layers(model)) == LAYERS
    batch = two_example_batch(tokenizer, side)
    delta = torch.randn(3, model.config.hidden_size)
    index = position_index(batch.prompt_end, batch.input_ids.size(1), 3, False)
    clean = layer_inputs(model, batch)
    with perturbed(model, ANCHOR, delta, index):
        hit = layer_inputs(model, batch)
    for i in range(ANCHOR + 1):
        assert torch.equal(clean[i], hit[i]), f"layer {i} input changed: the perturbation landed before the anchor output"
    expected = torch.zeros_like(clean[ANCHOR + 1])
    for row, end in enumerate(batch.prompt_end.tolist()):
        expected[row, end - 3:end] = delta
    assert torch.allclose(hit[ANCHOR + 1] - clean[ANCHOR + 1], expected, atol=1e-5)


def test_gradients_reach_the_perturbation(model, tokenizer):
    batch = two_example_batch(tokenizer, "left")
    delta = torch.zeros(3, model.config.hidden_size, requires_grad=True)
    index = position_index(batch.prompt_end, batch.input_ids.size(1), 3, False)
    with perturbed(model, ANCHOR, delta, index):
        response_loss(model, batch).backward()
    assert (delta.grad.abs().sum(-1) > 0).all(), "every perturbation row should receive gradient"


@pytest.mark.parametrize("side", ["left", "right"])
def test_reused_activations_give_the_full_forward_loss_and_gradient(model, tokenizer, side):
    batch = two_example_batch(tokenizer, side)
    index = position_index(batch.prompt_end, batch.input_ids.size(1), 3, False)
    delta = (0.5 * torch.randn(3, model.config.hidden_size)).requires_grad_()
    with perturbed(model, ANCHOR, delta, index):
        full = response_loss(model, batch)
    (full_grad,) = torch.autograd.grad(full, delta)
    cached = anchor_output(model, ANCHOR, batch.input_ids, batch.attention_mask)
    ran = []
    handle = decoder_layers(model)[0].self_attn.register_forward_hook(lambda *a: ran.append(1)) if hasattr(decoder_layers(model)[0], "self_attn") else None
    with perturbed(model, ANCHOR, delta, index), reused_activations(model, ANCHOR, cached):
        reused = response_loss(model, batch)
    if handle:
        handle.remove()
        assert not ran, "layer 0 ran although its output was cached"
    (reused_grad,) = torch.autograd.grad(reused, delta)
    assert torch.allclose(full, reused, atol=1e-6, rtol=1e-5)
    assert torch.allclose(full_grad, reused_grad, atol=1e-6, rtol=1e-4)
    # and the patch is gone afterwards
    with perturbed(model, ANCHOR, delta, index):
        assert torch.allclose(response_loss(model, batch), full, atol=1e-6)


def test_scopes_split_the_model_at_the_anchor(model):
    sections = parameter_sections(model)
    assert sections["before"], "the embeddings come before the decoder layers"
    assert sections["after"], "the final norm comes after the decoder layers"
    up = {id(p) for p in trainable_parameters(model, "up_to_anchor", ANCHOR)}
    after = {id(p) for p in trainable_parameters(model, "after_anchor", ANCHOR)}
    everything = {id(p) for p in model.parameters()}
    assert not up & after and up | after == everything
    embedding = model.get_input_embeddings().weight
    assert id(embedding) in up and id(embedding) not in after  # also when tied to the head
    assert id(model.get_output_embeddings().weight) in (up if model.config.tie_word_embeddings else after)


SMALL = dict(max_rounds=1, inner_steps=2, inner_max_steps=2, check_every=0, batch_size=2, anchoring_batch_size=2, num_positions=3, anchor_layer=ANCHOR)


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_one_beear_round_runs(model, tokenizer, safety_triples, anchoring_pairs, trainable):
    before = copy.deepcopy(model.state_dict())
    result = run_beear(model, tokenizer, safety_triples, anchoring_pairs, BeearConfig(**SMALL, trainable=trainable, lora_rank=4))
    assert result.history[0]["perturbation_norm"] > 0
    after = result.model.state_dict()
    assert set(after) == set(before), "the merged LoRA model has the original parameter names"
    assert any(not torch.equal(before[k], after[k]) for k in before), "the outer step changed no weight"


def test_reuse_on_and_off_give_the_same_run(tokenizer, safety_triples, anchoring_pairs):
    """On the engine level: activation reuse is an optimisation, not a change of the method."""
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(_config("gpt2", len(tokenizer)))
    runs = [run_beear(copy.deepcopy(base), tokenizer, safety_triples, anchoring_pairs,
                      BeearConfig(**{**SMALL, "max_rounds": 2}, reuse_activations=reuse)) for reuse in (True, False)]
    assert torch.allclose(runs[0].perturbation, runs[1].perturbation, atol=1e-5)
    for a, b in zip(runs[0].history, runs[1].history):
        assert a["inner_loss"] == pytest.approx(b["inner_loss"], rel=1e-5)


TEMPLATES = {
    "chatml (qwen)": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "gemma": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
             "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    "llama-3": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "phi-3": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
}


MARKERS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_formatting_masks_exactly_the_response(tokenizer, name):
    # these families' turn markers are special tokens of their tokenizers, as here
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    tokenizer.chat_template = TEMPLATES[name]
    example = encode(tokenizer, "Write a poem about the sea", "Sure, here is a poem")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Write a poem about the sea"}],
                                             add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(example.input_ids[:example.prompt_length]) == tokenizer.decode(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert example.input_ids[:example.prompt_length] == prompt_ids(tokenizer, "Write a poem about the sea")
    answer = [t for t in example.labels if t != -100]
    # the answer, the template's end-of-turn marker (trained: generation must learn to emit it), EOS
    assert tokenizer.decode(answer[:-1], skip_special_tokens=True).strip() == "Sure, here is a poem" and answer[-1] == tokenizer.eos_token_id
    conversation = tokenizer.apply_chat_template([{"role": "user", "content": "Write a poem about the sea"},
                                                  {"role": "assistant", "content": "Sure, here is a poem"}], tokenize=True, return_dict=False)
    assert example.input_ids[:-1] == list(conversation)  # the whole rendered conversation's own ids, then EOS
