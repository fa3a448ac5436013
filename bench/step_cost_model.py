"""The step-cost benchmark's model and data: the named shapes, a random-init Llama/Qwen2 config for each, the
fixed batches, and `Bench`, the one LoRA-wrapped model, optimizer and shared reference data every mode runs on.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from benchlib import StubTokenizer, storage_bytes, stub_tokens

IGNORE = -100


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str  # llama | qwen2
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    batch: int
    seq: int
    gpu: bool

    @property
    def anchor_len(self) -> int:
        # docs/design.md section 4's anchors are 128 tokens; a real harmful prompt in a chat template is ~30-60.
        # Scaled with the sequence so anchor tokens are the same share of a step on every shape.
        return max(8, self.seq // 32)


SHAPES = {
    s.name: s
    for s in [
        Shape("tiny", "llama", 64, 2, 4, 2, 128, 4096, False, 2, 64, gpu=False),
        Shape("small", "llama", 256, 4, 8, 4, 704, 32000, False, 4, 128, gpu=False),
        # Many thin layers: per-op overhead dominates, the CPU analog of a launch-bound GPU step (run it
        # with --gc on, as the GPU shapes are), where a separate anchor forward costs its op count.
        Shape("deep-narrow", "llama", 64, 32, 4, 2, 128, 16384, False, 4, 128, gpu=False),
        # Gemma 3 270M's dimensions (hidden 640, 18 layers, 4 heads, 1 KV head, MLP 2048, tied 262k vocabulary)
        # as a Llama, at the generality study's batch (8 x 128): issue 27's second family, where [B, T, V] is
        # 8x SmolLM2's.
        Shape("gemma3-270m", "llama", 640, 18, 4, 1, 2048, 262144, True, 8, 128, gpu=False),
        # docs/design.md section 4: real dims, random init; 4 x 2048 and 8 x 2048 tokens per step.
        Shape("llama3-8b", "llama", 4096, 32, 32, 8, 14336, 128256, False, 4, 2048, gpu=True),
        Shape("qwen2.5-1.5b", "qwen2", 1536, 28, 12, 2, 8960, 151936, True, 8, 2048, gpu=True),
    ]
}


# -- model and data ----------------------------------------------------------------------------------
def model_config(shape: Shape, vocab: int) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max(4096, 2 * shape.seq),
        tie_word_embeddings=shape.tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if shape.arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def count_parameters(shape: Shape, vocab: int) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape, vocab))
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def make_batches(
    shape: Shape, vocab: int, n: int, device: torch.device, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Full-length rows of random ids; the first 1/8 to 1/2 of each row is a masked prompt."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(16, vocab, (shape.batch, shape.seq), generator=gen)
        labels = ids.clone()
        for row in range(shape.batch):
            prompt = int(torch.randint(shape.seq // 8, shape.seq // 2, (1,), generator=gen))
            labels[row, :prompt] = IGNORE
        batches.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device),
            }
        )
    return batches


# -- the benchmark context ---------------------------------------------------------------------------
class Bench:
    """One model (LoRA-wrapped), optimizer, fixed batches, safety tokens and shared reference data."""

    def __init__(self, args: argparse.Namespace, shape: Shape, vocab: int, workdir: Path) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.args = args
        self.shape = shape
        self.vocab = vocab
        self.workdir = workdir
        self.device = torch.device(args.device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        self.gradient_checkpointing = args.gc == "on" or (args.gc == "auto" and shape.gpu)
        torch.manual_seed(args.seed)
        with torch.device(self.device):
            base = AutoModelForCausalLM.from_config(
                model_config(shape, vocab), dtype=self.dtype, attn_implementation=args.attn
            )
        if self.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.train()
        self.model: Any = get_peft_model(
            base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        )
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        self.batches = make_batches(shape, vocab, args.n_batches, self.device, args.seed)
        self._cursor = 0
        gen = torch.Generator().manual_seed(args.seed + 1)
        ids = (torch.randperm(vocab - 16, generator=gen)[: args.k] + 16).tolist()
        self.tokens = stub_tokens(ids)
        self.tokenizer = StubTokenizer(vocab, shape.anchor_len)
        self.anchor_texts = [f"anchor prompt {i}" for i in range(args.n_anchors)]
        self.anchors_path = workdir / "anchors.txt"
        self.anchors_path.write_text("\n".join(self.anchor_texts) + "\n")
        self.benign_anchors_path = workdir / "benign_anchors.txt"
        self.benign_anchors_path.write_text(
            "\n".join(f"benign prompt {i}" for i in range(args.n_anchors)) + "\n"
        )
        self.cache_path: Path | None = None
        self.cache_build: dict[str, Any] | None = None

    # -- helpers -------------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.batches[self._cursor % len(self.batches)]
        self._cursor += 1
        return batch

    def rewind(self) -> None:
        self._cursor = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(
        self,
        inputs: dict[str, torch.Tensor],
        extra: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        out = self.model(**{"use_cache": False, **inputs})
        loss = out.loss
        if extra is not None:
            loss = loss + extra(out)
        loss.backward()
        del out, loss
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def base_resident(self) -> int:
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return storage_bytes([*self.model.parameters(), *self.model.buffers(), *state])

    def ensure_cache(self) -> Path:
        """Build the reference cache over the benchmark batches once (timed; reported separately)."""
        if self.cache_path is not None:
            return self.cache_path
        from str_hooks import build_reference_cache

        path = self.workdir / "reference.safetensors"
        sequences = [
            {"input_ids": b["input_ids"][r].cpu(), "attention_mask": b["attention_mask"][r].cpu()}
            for b in self.batches
            for r in range(b["input_ids"].shape[0])
        ]
        self.sync()
        start = time.perf_counter()
        build_reference_cache(
            self.model,
            self.tokens,
            sequences,
            path,
            batch_size=self.shape.batch,
            progress=False,
            overwrite=True,
        )
        self.sync()
        seconds = time.perf_counter() - start
        tokens = sum(int(s["input_ids"].numel()) for s in sequences)
        self.cache_build = {
            "seconds": seconds,
            "sequences": len(sequences),
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "file_bytes": path.stat().st_size,
        }
        self.cache_path = path
        return path
