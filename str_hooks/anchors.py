"""Anchor prompts: harmful requests whose decision-point safety logits must not drift.

The reference logits at the decision point (the last prompt position, where the first response token is
predicted) are computed once at attach. During training the penalty is evaluated on a batch of anchors
every `anchor_every` optimizer steps, so it acts exactly where refusals are decided.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from str_hooks.errors import STRConfigError
from str_hooks.prompts import encode_prompt, read_text_list, resolve_texts
from str_hooks.tap import ModelTap, eval_mode


class AnchorSet:
    """Tokenized anchor prompts, their reference safety logits, and a deterministic cycling order.

    Args:
        tokenizer: the model's tokenizer (the prompts are rendered as a user turn with its chat template).
        prompts: a list, a file, or None for the package's own harmful anchor prompts.
        column: the column when `prompts` is a CSV/JSONL file.
        batch_size: anchors per anchor forward.
        seed: order of the anchors.
        pad_token_id: id used to right-pad (masked out).

    Raises:
        STRConfigError: no usable prompt.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompts: Sequence[str] | str | None = None,
        column: str | None = None,
        batch_size: int = 8,
        seed: int = 0,
        pad_token_id: int | None = None,
    ) -> None:
        if isinstance(prompts, str) and column is not None:
            texts = read_text_list(prompts, column=column, what="anchor prompts")
        else:
            texts = resolve_texts(prompts, "harmful_anchors", "anchor prompts")
        self.prompts = texts
        self.encoded = [encode_prompt(tokenizer, text) for text in texts]
        if any(len(ids) == 0 for ids in self.encoded):
            raise STRConfigError("an anchor prompt tokenizes to nothing; remove empty prompts.")
        self.batch_size = min(batch_size, len(texts))
        generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(texts), generator=generator).tolist()
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.encoded)

    def batch_indices(self, cursor: int) -> list[int]:
        """The anchors of the batch that starts at `cursor` (wraps around)."""
        return [self.order[(cursor + i) % len(self.order)] for i in range(self.batch_size)]

    def tensors(
        self, indices: list[int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, last_position) for the given anchors, right-padded."""
        rows = [self.encoded[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, encoded in enumerate(rows):
            ids[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
            mask[row, : len(encoded)] = 1
        last = mask.sum(dim=1) - 1
        return ids.to(device), mask.to(device), last.to(device)

    def decision_logits(self, tap: ModelTap, indices: list[int]) -> torch.Tensor:
        """Safety logits [n, k] at the decision point of the given anchors, through `tap`'s model (the
        current grad mode and train/eval mode apply)."""
        ids, mask, last = self.tensors(indices, tap.device())
        sink = tap.run(
            input_ids=ids,
            attention_mask=mask,
            **tap.lean_kwargs(),
        )
        logits = sink.safety_logits
        assert logits is not None  # tap.run guarantees it
        return logits[torch.arange(len(indices), device=logits.device), last.to(logits.device)]

    @torch.no_grad()
    def compute_reference(self, tap: ModelTap, peft_model: nn.Module | None) -> torch.Tensor:
        """Reference logits of every anchor, from the model as it is now (adapters disabled if any)."""
        context: contextlib.AbstractContextManager[Any] = (
            peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()  # type: ignore[operator]
        )
        parts: list[torch.Tensor] = []
        with context, eval_mode(tap.causal_lm):
            for start in range(0, len(self.encoded), self.batch_size):
                indices = list(range(start, min(start + self.batch_size, len(self.encoded))))
                parts.append(self.decision_logits(tap, indices).float().cpu())
        self.reference = torch.cat(parts, dim=0)
        return self.reference
