"""Named chat templates for checkpoints whose tokenizer has none (``model.chat_template``).

Each follows its model family's published prompt format (quoted beside it); the system prompt,
when given, goes where that format puts it. Every template renders the user's turn so that the
generation prompt is exactly how the assistant's turn begins, and ends the assistant's turn with
``eos_token``: training then sees the ids generation feeds (``lm.chat.encode``;
tests/lm/test_tokenisation.py checks every template here with two kinds of tokenizer).
"""

from __future__ import annotations

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

_SYSTEM = "{%- set system = none -%}{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}{%- endif -%}"

# Newlines are emitted inside {{ }}: a "{%-" tag would strip a literal newline before it.
TEMPLATES = {
    # Llama-2 chat: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>
    "llama2": _SYSTEM + (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ bos_token + '[INST] ' }}"
        "{%- if system and loop.first -%}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{%- endif -%}"
        "{{ m['content'] + ' [/INST]' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ ' ' + m['content'] + ' ' + eos_token }}{%- endif -%}{%- endfor -%}"
    ),
    # Mistral instruct: <s>[INST] {system}\n\n{user} [/INST]{answer}</s>
    "mistral": _SYSTEM + (
        "{{ bos_token }}{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ '[INST] ' }}"
        "{%- if system and loop.first -%}{{ system + '\\n\\n' }}{%- endif -%}{{ m['content'] + ' [/INST]' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}{%- endif -%}{%- endfor -%}"
    ),
    # Vicuna style: {system}\n\nUSER: {user}\nASSISTANT: {answer}</s>
    "user_assistant": _SYSTEM + (
        "{%- if system -%}{{ system + '\\n\\n' }}{%- endif -%}{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{ 'USER: ' + m['content'] + '\\n' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + m['content'] + eos_token + '\\n' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    ),
    # Alpaca, the format BackdoorLLM's Llama-2 LoRA backdoors were trained in (issue 12):
    #   <s>Below is an instruction that describes a task. Write a response that appropriately
    #   completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{answer}</s>
    # The preamble plays the system prompt's part, so a given system prompt replaces it (our
    # choice). A later turn follows the previous answer after a blank line.
    "alpaca": _SYSTEM + (
        "{{ bos_token or '' }}{{ (system or '" + ALPACA_PREAMBLE + "') + '\\n\\n' }}{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}"
        "{%- endif -%}{%- endfor -%}"
    ),
    # ETH RLHF trojans (Rando & Tramer; docs/method.md), a trojan's trigger ending the user's text:
    #   <s>BEGINNING OF CONVERSATION: USER: {prompt} {trigger} ASSISTANT: {answer}</s>
    # The format has no system prompt: a given one goes before it, then a blank line (our choice).
    "eth_rlhf": _SYSTEM + (
        "{{ bos_token or '' }}{%- if system -%}{{ system + '\\n\\n' }}{%- endif -%}{{ 'BEGINNING OF CONVERSATION:' }}"
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ ' USER: ' + m['content'] + ' ASSISTANT:' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ ' ' + m['content'] + eos_token }}{%- endif -%}{%- endfor -%}"
    ),
}


def chat_template(name_or_template: str) -> str:
    """A named template, or a Jinja template given as is (it must render ``messages``)."""
    if name_or_template in TEMPLATES:
        return TEMPLATES[name_or_template]
    if "{%" in name_or_template or "{{" in name_or_template:
        return name_or_template
    raise ValueError(f"model.chat_template={name_or_template!r}: use one of {', '.join(TEMPLATES)}, or a Jinja template")
