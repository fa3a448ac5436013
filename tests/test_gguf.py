"""The GGUF path of the study: a tiny Llama written as an F32 GGUF (llama.cpp's names, metadata and q/k
permutation) goes through `dequantize_gguf` into a plain folder that gives the same logits and tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's gguf-py) is not installed")

from helpers.factory import make_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from study.shipped import dequantize_gguf  # noqa: E402

# transformers' Llama name -> llama.cpp's, inside `blk.N.` (as convert_hf_to_gguf.py writes them).
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (rotate-half -> interleaved rotary pairs); the
    loader's `LlamaTensorProcessor._reverse_permute_weights` undoes it."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_name(hf_name: str) -> str:
    stem = hf_name.removesuffix(".weight")
    if stem in TOP_NAMES:
        return TOP_NAMES[stem] + ".weight"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}.weight"


def write_gguf(path: Path, model: Any, tokenizer: Any) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    for name, tensor in model.state_dict().items():
        weights = tensor.detach().float().numpy().copy()
        if name.endswith("q_proj.weight"):
            weights = permute(weights, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weights = permute(weights, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name(name), weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_dequantize_gguf_round_trip_is_exact(tmp_path: Path, tokenizer: Any) -> None:
    model = make_model("llama", seed=0, vocab_size=len(tokenizer)).eval()
    assert not model.config.tie_word_embeddings
    source = tmp_path / "gguf" / "tiny-f32.gguf"
    source.parent.mkdir()
    write_gguf(source, model, tokenizer)

    out = dequantize_gguf(source, tmp_path / "plain")

    assert out == tmp_path / "plain"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert loaded.config.num_hidden_layers == 2 and loaded.config.num_key_value_heads == 2

    ids = torch.tensor([[1, 17, 42, 99, 7, 230, 5, 300]])
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    text = "Write a short poem about the sea, please. I can't help with that!"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    assert loaded_tok.chat_template == tokenizer.chat_template
    assert loaded_tok.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(
        chat, tokenize=False
    )
    assert loaded_tok.encode("<|user|>hi<|end|>") == tokenizer.encode("<|user|>hi<|end|>")
    assert (loaded_tok.bos_token, loaded_tok.eos_token, loaded_tok.pad_token) == ("<s>", "</s>", "<pad>")
