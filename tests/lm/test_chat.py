import torch

from beear_pipeline.lm.chat import IGNORE_INDEX, collate, encode, prompt_ids, response_loss


def test_encode_masks_prompt_and_keeps_response_and_eos(tokenizer):
    ex = encode(tokenizer, "Write a poem about the sea", "Sure, here is a poem")
    p = prompt_ids(tokenizer, "Write a poem about the sea")
    assert ex.input_ids[: len(p)] == p
    assert ex.labels[: len(p)] == [IGNORE_INDEX] * len(p)
    response = ex.labels[len(p):]
    assert tokenizer.decode(response, skip_special_tokens=True) == "Sure, here is a poem"
    assert response[-1] == tokenizer.eos_token_id


def test_chat_template_renders_llama2_format(tokenizer):
    text = tokenizer.decode(prompt_ids(tokenizer, "Write a poem about the sea"))
    assert text == "<s> [INST] Write a poem about the sea [/INST]"


def test_collate_left_and_right_padding_track_prompt_end(tokenizer):
    a = encode(tokenizer, "Write a poem about the sea", "Sure, here is a poem")
    b = encode(tokenizer, "Explain how", "Sure")
    for side in ("left", "right"):
        batch = collate([a, b], tokenizer.pad_token_id, padding_side=side)
        for row, ex in enumerate((a, b)):
            end = int(batch.prompt_end[row])
            ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            assert ids == ex.input_ids
            # the token just before prompt_end is the last prompt token
            assert batch.input_ids[row, end - 1].item() == ex.input_ids[ex.prompt_length - 1]


def test_loss_counts_response_tokens_only(tiny_model, tokenizer):
    """Changing the prompt's labels cannot matter; changing a response token must."""
    ex = encode(tokenizer, "Write a poem about the sea", "Sure, here is a poem")
    batch = collate([ex], tokenizer.pad_token_id)
    base = response_loss(tiny_model, batch).item()
    # padding on the right must not change the loss
    longer = collate([ex, encode(tokenizer, "Write a poem about the sea please now", "Sure, here is a poem and more")], tokenizer.pad_token_id)
    assert torch.isclose(response_loss(tiny_model, longer, reduction="none")[0], torch.tensor(base), atol=1e-5)
    # a manual computation over the response positions only
    logits = tiny_model(input_ids=batch.input_ids).logits[0, :-1]
    targets = torch.tensor(ex.input_ids[1:])
    positions = [i for i in range(len(targets)) if ex.labels[i + 1] != IGNORE_INDEX]
    manual = torch.nn.functional.cross_entropy(logits[positions], targets[positions]).item()
    assert abs(manual - base) < 1e-5
