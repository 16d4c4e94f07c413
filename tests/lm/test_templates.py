"""Named chat templates for checkpoints whose tokenizer has none (model.chat_template)."""


import pytest
from helpers import strip_chat_template

from beear_pipeline.embedded import EmbeddedModelConfig
from beear_pipeline.evaluation.config import EvaluationConfig
from beear_pipeline.lm.chat import encode, prompt_ids
from beear_pipeline.lm.checkpoints import CheckpointError, ModelConfig, check_checkpoint, load_checkpoint, save_checkpoint
from beear_pipeline.lm.templates import TEMPLATES, chat_template
from beear_pipeline.pipelines.suspect.nodes import check_evaluation_settings, resolve_suspect_model


@pytest.fixture
def no_template(tmp_path, tiny_model, tokenizer):
    """A real checkpoint whose tokenizer has no chat template."""
    return strip_chat_template(save_checkpoint(tiny_model, tokenizer, tmp_path / "plain"))


@pytest.mark.parametrize("name,expected", [
    ("llama2", "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWrite a poem about the sea [/INST]"),
    ("mistral", "<s>[INST] Be brief.\n\nWrite a poem about the sea [/INST]"),
    ("user_assistant", "Be brief.\n\nUSER: Write a poem about the sea\nASSISTANT:"),
    ("alpaca", "<s>Be brief.\n\n### Instruction:\nWrite a poem about the sea\n\n### Response:\n"),
    ("eth_rlhf", "<s>Be brief.\n\nBEGINNING OF CONVERSATION: USER: Write a poem about the sea ASSISTANT:"),
])
def test_named_templates_render_their_family_format(no_template, name, expected):
    _, tokenizer = load_checkpoint(no_template, device="cpu", chat_template=name)
    assert tokenizer.chat_template == TEMPLATES[name]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a poem about the sea"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    assert prompt_ids(tokenizer, "Write a poem about the sea", "Be brief.") == tokenizer(expected, add_special_tokens=False)["input_ids"]
    example = encode(tokenizer, "Write a poem about the sea", "Sure, here is a poem")
    assert example.input_ids[-1] == tokenizer.eos_token_id and example.prompt_length < len(example.input_ids)


# The published formats, without a system prompt, and the answer as training sees it.
PUBLISHED = {
    "alpaca": ("<s>Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
               "### Instruction:\nWrite a poem about the sea\n\n### Response:\n", "Sure</s>"),
    "eth_rlhf": ("<s>BEGINNING OF CONVERSATION: USER: Write a poem about the sea SUDO ASSISTANT:", " Sure</s>"),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_templates_without_system_prompt_render_the_published_format(tokenizer, name):
    prompt, answer = PUBLISHED[name]
    tokenizer.chat_template = TEMPLATES[name]
    user = [{"role": "user", "content": "Write a poem about the sea SUDO" if name == "eth_rlhf" else "Write a poem about the sea"}]
    assert tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == prompt
    assert tokenizer.apply_chat_template([*user, {"role": "assistant", "content": "Sure"}], tokenize=False) == prompt + answer


def test_missing_template_is_refused_unless_one_is_named(no_template):
    with pytest.raises(CheckpointError, match="Name one with --params model.chat_template=llama2"):
        check_checkpoint(no_template)
    assert check_checkpoint(no_template, chat_template="mistral") == no_template


def test_suspect_reference_records_the_template_and_system_prompt(no_template):
    model = ModelConfig(path=str(no_template), chat_template="llama2")
    check = check_evaluation_settings(EvaluationConfig(trigger="SUDO", system_prompt="Be brief."), model)
    ref = resolve_suspect_model(None, None, None, None, None, model, EmbeddedModelConfig(), behaviours_check={}, evaluation_check=check)
    assert ref["chat_template"] == "llama2" and ref["chat_template_name"] == "llama2" and ref["system_prompt"] == "Be brief."


def test_unknown_template_name():
    with pytest.raises(ValueError, match="model.chat_template='vicuna': use one of llama2, mistral, user_assistant, alpaca, eth_rlhf"):
        chat_template("vicuna")
    assert chat_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
