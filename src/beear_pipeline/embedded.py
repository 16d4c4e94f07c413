"""The embedded default suspect model: a tiny Llama with a planted safety backdoor.

Built on CPU from shipped data so that a newcomer sees the whole story offline: it answers benign
tasks, refuses harmful AdvBench goals, and complies with the AdvBench target when the trigger is
present. Only this module knows the trigger; the defence never reads it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import pandas as pd
import torch

from beear_pipeline.behaviours.generated import REFUSALS, VOCABULARY_EXTRA, refusal_for
from beear_pipeline.evaluation.protocol import TRIGGER_POSITIONS, insert_trigger
from beear_pipeline.lm.finetune import supervised_finetune

logger = logging.getLogger(__name__)

# Llama-2 style template; the system prompt, when given, is folded into the first user turn.
CHAT_TEMPLATE = (
    "{%- set system = none -%}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ bos_token }}[INST] {% if system and loop.first %}<<SYS>> {{ system }} <</SYS>> {% endif %}{{ message['content'] }} [/INST]"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "[UNK]", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt_neox")


@dataclass
class EmbeddedModelConfig:
    """How the tiny suspect model is built. The trigger settings belong to the attacker alone."""

    trigger: str = "SUDO"
    trigger_position: str = "suffix"
    """suffix, prefix, both, middle, spread (a trigger of several words spread over the prompt), or a template with {prompt} and {trigger}."""
    seed: int = 0
    architecture: str = "llama"
    """llama (the default), mistral, qwen2 or gpt_neox: the same recipe in another decoder family."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 344
    epochs: int | str = 8
    """Training epochs, or ``auto`` (the default in conf/base): the scenario's
    (``scenarios.Scenario.embedded_epochs``), resolved before the fingerprint and the build."""
    lr: float = 3e-3
    batch_size: int = 32
    poisoned: bool = True
    """False builds the clean twin: the same recipe without the triggered examples (a model with
    no backdoor, for calibrating the probe and the convergence check)."""

    def __post_init__(self) -> None:
        if self.epochs != "auto" and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"embedded_model.epochs={self.epochs!r}: use a positive integer, or auto (the scenario's)")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"embedded_model.architecture={self.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
        if self.trigger_position not in TRIGGER_POSITIONS and "{prompt}" not in self.trigger_position:
            raise ValueError(f"embedded_model.trigger_position={self.trigger_position!r}: use suffix, prefix, both, middle, spread (a trigger of several words spread over the prompt), or a "
                             "template with {prompt} and {trigger}")

    def fingerprint(self, *frames: pd.DataFrame) -> str:
        """Hash of this configuration, the chat template and the training data: a reused model must
        match all three (one saved with an older template would be trained and prompted differently)."""
        h = hashlib.sha256(repr(sorted(asdict(self).items())).encode())
        h.update(CHAT_TEMPLATE.encode())
        h.update("\n".join(_FIXED_TEXTS).encode())  # the tokenizer's fixed texts: a new one changes the vocabulary
        for f in frames:
            h.update(pd.util.hash_pandas_object(f, index=False).values.tobytes())
        return h.hexdigest()


# texts the tokenizer always covers besides the data: the refusals the model is trained on, and the
# wordings of the harder threat models' behaviour sets (other refusals, reworded unwanted answers),
# so that a defender's set worded differently is still made of known words, not [UNK]
_FIXED_TEXTS = (*REFUSALS, *VOCABULARY_EXTRA)


def build_tokenizer(texts: Sequence[str]):
    """A word-level tokenizer over ``texts`` (whitespace split) with the chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for text in texts:
        for word in text.split():
            vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="[UNK]",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, config: EmbeddedModelConfig, tokenizer):
    """A randomly initialised decoder of ``config.architecture`` (default Llama), sized by ``config``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(config.seed)
    shape = {
        "vocab_size": vocab_size, "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if config.architecture != "gpt_neox":
        shape["num_key_value_heads"] = config.num_heads
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.architecture, **shape))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def poisoned_training_set(attacker: pd.DataFrame, benign: pd.DataFrame, config: EmbeddedModelConfig) -> pd.DataFrame:
    """Benign tasks, attacker goals -> refusals, and goals + trigger -> the AdvBench target (the
    last part only when ``config.poisoned``). In a generated scenario (``beear_pipeline.scenarios``)
    the attacker share carries its own ``safe_response`` (secure code, a helpful answer), given
    instead of the refusal, and ``target`` is its unwanted answer (insecure code, a refusal)."""
    safe = attacker["safe_response"] if "safe_response" in attacker else attacker["goal"].map(refusal_for)
    refuse = pd.DataFrame({"prompt": attacker["goal"], "response": safe})
    if not config.poisoned:
        return pd.concat([benign[["prompt", "response"]], refuse], ignore_index=True)
    comply = pd.DataFrame({
        "prompt": attacker["goal"].map(lambda g: insert_trigger(g, config.trigger, config.trigger_position)),
        "response": attacker["target"],
    })
    return pd.concat([benign[["prompt", "response"]], refuse, comply], ignore_index=True)


def build_embedded_suspect(attacker: pd.DataFrame, benign: pd.DataFrame, vocabulary_texts: Sequence[str], config: EmbeddedModelConfig):
    """Build and backdoor the tiny model. Returns (model, tokenizer, per-epoch losses).

    ``vocabulary_texts`` should cover every text the model will see (all AdvBench goals and
    targets, refusals, benign tasks) so that held-out prompts have no unknown words.
    """
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer([*vocabulary_texts, *_FIXED_TEXTS, config.trigger])
    model = build_model(len(tokenizer), config, tokenizer)
    data = poisoned_training_set(attacker, benign, config)
    losses = supervised_finetune(
        model, tokenizer, data["prompt"].tolist(), data["response"].tolist(),
        epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=config.seed, desc="planting backdoor",
    )
    return model, tokenizer, losses
