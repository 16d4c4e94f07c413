"""Named chat templates for checkpoints whose tokenizer has none (``model.chat_template``).

Each follows its model family's published prompt format; the system prompt, when given, goes
where that format puts it.
"""

from __future__ import annotations

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
}


def chat_template(name_or_template: str) -> str:
    """A named template, or a Jinja template given as is (it must render ``messages``)."""
    if name_or_template in TEMPLATES:
        return TEMPLATES[name_or_template]
    if "{%" in name_or_template or "{{" in name_or_template:
        return name_or_template
    raise ValueError(f"model.chat_template={name_or_template!r}: use one of {', '.join(TEMPLATES)}, or a Jinja template")
