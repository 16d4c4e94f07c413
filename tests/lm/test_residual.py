import pytest
import torch
from helpers import layer_inputs, two_example_batch

from beear_pipeline.lm.chat import response_loss
from beear_pipeline.lm.residual import decoder_layers, perturbed, position_index, resolve_layer


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("num_positions,shared", [(3, False), (3, True), (None, True)])
def test_perturbation_lands_exactly_at_anchor_output_and_positions(tiny_model, tokenizer, side, num_positions, shared):
    batch = two_example_batch(tokenizer, side)
    layer = 1
    rows = 1 if shared or num_positions is None else num_positions
    delta = torch.randn(rows, tiny_model.config.hidden_size)
    index = position_index(batch.prompt_end, batch.input_ids.size(1), num_positions, shared)
    clean = layer_inputs(tiny_model, batch)
    with perturbed(tiny_model, layer, delta, index):
        hit = layer_inputs(tiny_model, batch)
    # inputs of layers 0..layer are untouched; the input of layer + 1 is the anchor output
    for i in range(layer + 1):
        assert torch.equal(clean[i], hit[i]), f"hidden states before the anchor output changed at layer {i}"
    diff = hit[layer + 1] - clean[layer + 1]
    expected = torch.zeros_like(diff)
    for row in range(batch.input_ids.size(0)):
        end = int(batch.prompt_end[row])
        start = 0 if num_positions is None else end - num_positions
        for j, pos in enumerate(range(start, end)):
            expected[row, pos] = delta[0 if rows == 1 else j]
    assert torch.allclose(diff, expected, atol=1e-5)
    # nothing at or after the response start is touched at the anchor output
    response_start = batch.prompt_end
    for row in range(batch.input_ids.size(0)):
        assert torch.all(diff[row, int(response_start[row]):] == 0)
    # the hook is gone after the block
    assert torch.equal(layer_inputs(tiny_model, batch)[layer + 1], clean[layer + 1])


def test_gradients_reach_the_perturbation(tiny_model, tokenizer):
    batch = two_example_batch(tokenizer)
    delta = torch.zeros(3, tiny_model.config.hidden_size, requires_grad=True)
    index = position_index(batch.prompt_end, batch.input_ids.size(1), 3, False)
    with perturbed(tiny_model, 1, delta, index):
        response_loss(tiny_model, batch).backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert (delta.grad.abs().sum(-1) > 0).all(), "every perturbation row should receive gradient"


def test_resolve_layer_negative_and_out_of_range(tiny_model):
    assert len(decoder_layers(tiny_model)) == 3
    assert resolve_layer(tiny_model, -1) == 2
    assert resolve_layer(tiny_model, 0) == 0
    with pytest.raises(ValueError, match=r"beear.anchor_layer=3 is out of range .* 3 decoder layers"):
        resolve_layer(tiny_model, 3)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(tiny_model, -4)


def test_fractions_of_the_depth_spread_the_default_layers_over_a_deep_model():
    """The defaults name layers relative to depth: the tiny model's layer 1 of 4, and on a
    32-layer (7B-deep) model the anchor at layer 9 and a probe scan over its lower half."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from beear_pipeline.beear import BeearConfig
    from beear_pipeline.probe.config import ProbeConfig

    deep = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=32,
                                        num_attention_heads=2, num_key_value_heads=2))
    shallow = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                           num_attention_heads=2, num_key_value_heads=2))
    beear, probe = BeearConfig(), ProbeConfig()
    assert resolve_layer(deep, beear.anchor_layer) == 9 and resolve_layer(shallow, beear.anchor_layer) == 1
    assert sorted({resolve_layer(deep, x) for x in probe.layers}) == [0, 4, 8, 12, 16]
    assert sorted({resolve_layer(shallow, x) for x in probe.layers}) == [0, 1, 2]
    assert resolve_layer(deep, 1.0) == 31 and resolve_layer(deep, 0.0) == 0 and resolve_layer(deep, 5) == 5
    with pytest.raises(ValueError, match=r"beear.anchor_layer=1.5: a fraction of the depth must lie in \[0.0, 1.0\]"):
        resolve_layer(deep, 1.5)
    with pytest.raises(ValueError, match="beear.anchor_layer"):
        BeearConfig(anchor_layer=True)
    with pytest.raises(ValueError, match="probe.layers"):
        ProbeConfig(layers=["top"])
