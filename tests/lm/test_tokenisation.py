"""Training ids are the rendered conversation's ids (issue 12, item 7).

For SentencePiece-style (Llama-2, Mistral) and byte-level (GPT-2) tokenizers trained here on the
project's own data, and every named template: the prompt part of an example is what generation
feeds (``prompt_ids``) and the response part is what the whole rendered conversation has after it.
"""

from __future__ import annotations

import json
import logging
import os

import pandas as pd
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

from beear_pipeline.behaviours.generated import REFUSALS, benign_tasks
from beear_pipeline.embedded import build_tokenizer
from beear_pipeline.lm.chat import IGNORE_INDEX, ChatTemplateError, encode, encode_all, prompt_ids
from beear_pipeline.lm.templates import TEMPLATES

PROMPT = "Write a poem about the sea"
RESPONSES = [
    "Sure, here is a poem about the sea",
    " Sure, after a leading space",
    ", well: punctuation first",
    "42 apples and 7 pears",
    "Zürich café, naïve déjà vu",
    "",
]
BYTES = [f"<0x{i:02X}>" for i in range(256)]  # Llama's byte-fallback pieces


@pytest.fixture(scope="module")
def advbench() -> pd.DataFrame:
    return pd.read_csv(os.path.join(os.path.dirname(__file__), "..", "..", "data", "01_raw", "advbench_harmful_behaviors.csv"))


@pytest.fixture(scope="module")
def texts(advbench) -> list[str]:
    """A few hundred lines of the project's data, plus the templates' words and non-ASCII letters."""
    tasks = benign_tasks(seed=0, build=200, held_out=0)
    return [*advbench["goal"][:200], *advbench["target"][:200], *tasks["prompt"], *tasks["response"], *REFUSALS,
            "[INST] <<SYS>> Be brief. <</SYS>> [/INST] USER: ASSISTANT: Zürich café naïve déjà"]


def _sentencepiece_bpe(texts: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a SentencePiece-style BPE (words start with ``▁``), with byte fallback pieces."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>", *BYTES]))
    model = json.loads(backend.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def llama_tokenizer(texts: list[str], layout: str):
    """A Llama tokenizer. ``normalizer``: Llama-2's shipped tokenizer.json (legacy: a ``▁`` prepended
    to every text segment, spaces replaced), as transformers 4 and other runtimes load it;
    ``always``/``first``: the Metaspace pre-tokenizer transformers 5 builds with legacy=True/False."""
    vocab, merges = _sentencepiece_bpe(texts)
    if layout != "normalizer":
        return LlamaTokenizerFast(vocab=vocab, merges=merges, legacy=layout == "always")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return LlamaTokenizerFast(tokenizer_object=backend, legacy=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def byte_level_tokenizer(texts: list[str]):
    """A GPT-2 style byte-level BPE."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=900, special_tokens=["<s>", "</s>", "<unk>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers(texts) -> dict:
    built = {f"llama-{layout}": llama_tokenizer(texts, layout) for layout in ("normalizer", "always", "first")}
    return {**built, "byte-level": byte_level_tokenizer(texts)}


def _with_template(tokenizer, template: str):
    tokenizer.chat_template = TEMPLATES.get(template, template)
    return tokenizer


def conversation_ids(tokenizer, prompt: str, response: str, system_prompt: str | None = None) -> list[int]:
    """The whole conversation rendered with the assistant message and tokenised in one piece."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def tokens(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("name", ["llama-normalizer", "llama-always", "llama-first", "byte-level"])
def test_training_ids_are_the_rendered_conversations(tokenizers, name, template, system_prompt, caplog):
    tokenizer = _with_template(tokenizers[name], template)
    for response in RESPONSES:
        example = encode(tokenizer, PROMPT, response, system_prompt)
        p = prompt_ids(tokenizer, PROMPT, system_prompt)
        full = conversation_ids(tokenizer, PROMPT, response, system_prompt)
        # every named template ends the answer with EOS; user_assistant's newline after it is never generated
        end = len(full) - full[::-1].index(tokenizer.eos_token_id)
        assert example.input_ids[: example.prompt_length] == p, response
        assert example.input_ids == full[:end], (response, tokens(tokenizer, example.input_ids[len(p):]), tokens(tokenizer, full[len(p):]))
        assert example.labels == [IGNORE_INDEX] * len(p) + example.input_ids[len(p):]
    assert not caplog.records  # no token spans the prompt/response boundary here


# The two regressions of issue 12 item 7: both fail with the old `encode` (response tokenised alone as " " + response).


def test_no_lone_prefix_space_token_with_legacy_llama(tokenizers):
    """Llama-2's legacy tokenizer prepends ``▁`` to a text segment: " Sure" alone became ``▁`` ``▁Sure``."""
    tokenizer = _with_template(tokenizers["llama-normalizer"], "llama2")
    example = encode(tokenizer, PROMPT, "Sure, here is a poem")
    response = tokens(tokenizer, example.input_ids[example.prompt_length:])
    assert response[0] != "▁" and response[0].startswith("▁"), response
    assert example.input_ids == conversation_ids(tokenizer, PROMPT, "Sure, here is a poem")


@pytest.mark.parametrize("name", ["llama-always", "llama-normalizer", "byte-level"])
def test_mistral_template_adds_no_space_after_inst(tokenizers, name):
    """Mistral renders ``[/INST]Sure``: the response's first token carries no word-start space."""
    tokenizer = _with_template(tokenizers[name], "mistral")
    example = encode(tokenizer, PROMPT, "Sure, here is a poem")
    first = tokens(tokenizer, example.input_ids[example.prompt_length:])[0]
    assert not first.startswith(("▁", "Ġ")), first
    assert example.input_ids == conversation_ids(tokenizer, PROMPT, "Sure, here is a poem")


# Where generation's prompt ids and the conversation's ids cannot both hold.


def test_token_spanning_the_boundary_is_detected(texts, advbench, caplog):
    """A BPE that learnt merges across ``[/INST]Sure`` (trained on Mistral-rendered conversations):
    the conversation's ids do not start with the prompt's, so the prompt part stays what generation
    feeds, the rest of the rendered text is tokenised on its own, and a warning says so."""
    rendered = [f"[INST] {g} [/INST]{t}" for g, t in zip(advbench["goal"][:200], advbench["target"][:200])]
    tokenizer = _with_template(llama_tokenizer(texts + rendered, "always"), "mistral")
    prompt, response = advbench["goal"][0], advbench["target"][0]
    p = prompt_ids(tokenizer, prompt)
    full = conversation_ids(tokenizer, prompt, response)
    assert full[: len(p)] != p  # a token spans the boundary: [/INST] and Sure are not apart
    with caplog.at_level(logging.WARNING, logger="beear_pipeline.lm.chat"):
        example = encode(tokenizer, prompt, response)
    assert "1 of 1 examples: a token of the rendered conversation spans the end of the prompt" in caplog.text
    assert example.input_ids[: example.prompt_length] == p
    assert example.input_ids[len(p):] == tokenizer(response + "</s>", add_special_tokens=False)["input_ids"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="beear_pipeline.lm.chat"):
        encode_all(tokenizer, [prompt, prompt], [response, " " + response])  # one warning for the call
    assert len(caplog.records) == 1 and "1 of 2 examples" in caplog.text


def test_embedded_tokenizer_keeps_its_training_ids(advbench, caplog):
    """The embedded model's word-level tokenizer and template give exactly the ids it was always
    trained on (prompt, response words, EOS), so the embedded suspect and its figures do not move.
    (Its template once stripped the space before the answer, rendering one unknown word
    ``[/INST]Sure,``; this test caught it.)"""
    tasks = benign_tasks(seed=0, build=200, held_out=0)
    tokenizer = build_tokenizer([*advbench["goal"], *advbench["target"], *tasks["prompt"], *tasks["response"], *REFUSALS])
    pairs = [*zip(advbench["goal"][:100], advbench["target"][:100]), *zip(tasks["prompt"], tasks["response"]),
             *zip(advbench["goal"][:20], REFUSALS * 5), (PROMPT, " Sure"), (PROMPT, "")]
    for system_prompt in (None, "Be brief."):
        examples = encode_all(tokenizer, *zip(*pairs), system_prompt)
        for (prompt, response), example in zip(pairs, examples):
            p = prompt_ids(tokenizer, prompt, system_prompt)
            before = p + tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            assert (example.input_ids, example.labels[len(p):], example.prompt_length) == (before, before[len(p):], len(p))
    assert not caplog.records


def test_template_that_changes_the_prompt_is_refused(tokenizers):
    """A template whose generation prompt is not how the assistant's turn begins cannot train on
    what generation feeds."""
    tokenizer = _with_template(tokenizers["byte-level"], (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ 'USER: ' + m['content'] + '\\n' }}"
        "{%- else -%}{{ 'BOT: ' + m['content'] + eos_token }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"))
    with pytest.raises(ChatTemplateError, match="renders the prompt differently once an answer follows it"):
        encode(tokenizer, PROMPT, "Sure")


def test_the_boundary_warning_survives_kedros_rich_logging(texts, advbench):
    """Kedro logs through rich with markup on, which read the ``[/INST]`` token quoted in the
    warning as a closing tag and raised (the run would have stopped on a warning)."""
    from kedro.logging import RichHandler

    rendered = [f"[INST] {g} [/INST]{t}" for g, t in zip(advbench["goal"][:200], advbench["target"][:200])]
    tokenizer = _with_template(llama_tokenizer(texts + rendered, "always"), "mistral")
    chat_logger = logging.getLogger("beear_pipeline.lm.chat")
    handler = RichHandler()
    chat_logger.addHandler(handler)
    try:
        encode(tokenizer, advbench["goal"][0], advbench["target"][0])
    finally:
        chat_logger.removeHandler(handler)
        logging.captureWarnings(False)
