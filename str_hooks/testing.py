"""Tiny models and tokenizers built from config, for tests, examples and the demo.

No download: the tokenizer is a byte-level BPE trained in about a second on the package's own texts, the
models are randomly initialized from small configs of several architectures. Needs the `hf` extra
(transformers, peft, tokenizers); `import str_hooks` never imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from str_hooks.errors import STRConfigError
from str_hooks.prompts import default_texts, encode_prompt

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma2", "gpt2")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with the chat specials (`SPECIALS`), trained on `texts` (about a second)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


@lru_cache(maxsize=2)
def _trained_tokenizer(vocab_size: int) -> Tokenizer:
    lines: list[str] = []
    for name in ("refusal_templates", "benign_contrast", "harmful_anchors", "benign_prompts"):
        lines += default_texts(name)
    return train_bpe(lines, vocab_size)


def make_tokenizer(vocab_size: int = 512, chat: bool = True) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_trained_tokenizer(vocab_size),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_config(arch: str, vocab_size: int = 512, **overrides: Any) -> Any:
    shape: dict[str, Any] = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        vocab_size=vocab_size,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "gpt2":
        # GPT2Config maps the shared names onto n_embd, n_layer, n_head, n_positions; no dropout, so that
        # two forwards of one batch agree exactly.
        cfg: Any = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape)
    else:
        llama_like: dict[str, Any] = dict(intermediate_size=64, num_key_value_heads=2, **shape)
        if arch == "llama":
            cfg = LlamaConfig(**llama_like)
        elif arch == "qwen2":
            cfg = Qwen2Config(**llama_like)
        elif arch == "mistral":
            cfg = MistralConfig(**llama_like)
        elif arch == "gemma2":
            # A small softcap so the tanh is far from linear on these logits: a missed transform shows.
            cfg = Gemma2Config(head_dim=8, final_logit_softcapping=2.0, **llama_like)
        else:
            raise STRConfigError(f"make_config: unknown architecture {arch!r}; use one of {ARCHITECTURES}.")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_model(
    arch: str = "llama", seed: int = 0, vocab_size: int = 512, **overrides: Any
) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        make_config(arch, vocab_size, **overrides), attn_implementation="eager"
    )
    # Random init gives logits near zero; scale the head so safety logits and their drift are O(1).
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.float()


def make_lora(model: PreTrainedModel, seed: int = 1, head: str | None = None) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = (
        ["q_proj", "k_proj", "v_proj", "o_proj"]
        if model.config.model_type != "gpt2"
        else ["c_attn", "c_proj"]
    )
    kwargs: dict[str, Any] = {}
    if head == "lora":
        targets = [*targets, "lm_head"]
    elif head == "modules_to_save":
        kwargs["modules_to_save"] = ["lm_head"]
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, **kwargs)
    )
    # LoRA B starts at zero; perturb it so the adapter changes the logits (the reference must differ).
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return peft_model


def make_batch(
    tokenizer: PreTrainedTokenizerFast, n: int = 4, seed: int = 0, vocab_size: int = 512
) -> dict[str, torch.Tensor]:
    """Right-padded chat examples with prompt tokens masked (-100): unequal supervised counts per row."""
    prompts = default_texts("benign_prompts")
    answers = default_texts("benign_contrast")
    rows: list[dict[str, list[int]]] = []
    gen = torch.Generator().manual_seed(seed)
    end_id: Any = tokenizer.convert_tokens_to_ids("<|end|>")
    for i in range(n):
        prompt = prompts[int(torch.randint(len(prompts), (1,), generator=gen))]
        answer = answers[int(torch.randint(len(answers), (1,), generator=gen))]
        answer = " ".join(answer.split()[: 3 + 4 * i])
        answer_ids = [*(int(t) for t in tokenizer(answer, add_special_tokens=False)["input_ids"]), end_id]
        prompt_ids = encode_prompt(tokenizer, prompt)
        rows.append({"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids})
    return pad_rows(rows, tokenizer.pad_token_id)


def pad_rows(rows: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads rows of `input_ids` and `labels` into a batch: `pad_id`, attention mask 0 and label -100
    past each row's end."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
