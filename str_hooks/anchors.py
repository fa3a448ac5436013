"""Anchor prompts: requests whose reply-opening safety logits must not drift.

Harmful anchors are requests the aligned model refuses; benign anchors (optional, `benign_weight` > 0) are
ordinary and sensitive-sounding safe requests it answers. Each anchor is penalized at its *points*: the
decision point (the last prompt position, where the first reply token is predicted) and, with
`anchor_tokens` = n > 1, the next n - 1 positions of the aligned model's own greedy opening, generated once at
attach and teacher-forced during training (docs/design.md section 1). The reference values at every point
are computed once at attach, with the adapters disabled. During training a batch of anchors is penalized
every `anchor_every` optimizer steps, so the penalty acts exactly where replies are decided.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from str_hooks.errors import STRConfigError
from str_hooks.openings import decode_openings
from str_hooks.prefix import (
    PrefixSplit,
    checkpointing_active,
    full_row_values,
    prefix_problem,
    shared_prefix_length,
    values_on_prefix,
    warn_not_shared,
)
from str_hooks.prompts import encode_prompt, read_text_list, resolve_texts
from str_hooks.tap import ModelTap, eval_mode, logits_close

# Anchors per forward in the one-off passes before training (no gradient; with `logits_to_keep` only the
# requested positions' logits are built, otherwise [32, T, V] logits for the duration of one forward).
SETUP_BATCH_SIZE = 32


def _texts(prompts: Sequence[str] | str | None, column: str | None, default: str, what: str) -> list[str]:
    if isinstance(prompts, str) and column is not None:
        return read_text_list(prompts, column=column, what=what)
    return resolve_texts(prompts, default, what)


def end_token_ids(tokenizer: Any, model: nn.Module | None = None) -> set[int]:
    """Ids that end a reply: the tokenizer's end-of-sequence token and the model's generation-config ones
    (chat models often end a turn with a token of their own, e.g. ChatML's `<|im_end|>`)."""
    found: set[int] = set()
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    generation = getattr(model, "generation_config", None)
    candidates.append(getattr(generation, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value if isinstance(v, int))
    return found


@dataclass(frozen=True)
class AnchorBatch:
    """One anchor step's anchors, everything on the training device (built once per cursor, so that an
    anchor step copies nothing from the host: docs/host_sync.md).

    Attributes:
        indices: the anchors (into the `AnchorSet`), in order.
        input_ids, attention_mask: one right-padded row per anchor (the separate placement's forward).
        rows, cols: every penalized point in those rows (the last `points` positions of each anchor).
        reference: the reference values at those points [n_points, C].
        weights: per-point weights (benign anchors `benign_weight`), or None when all are harmful.
        n_points: how many points.
        weight_sum: the sum of the points' weights (`n_points` when all are harmful): the anchor term is the
            weighted mean over the points.
        encoded: each anchor's token ids (prompt and teacher-forced opening), for folding without a host copy.
        points: each anchor's number of points.
        split: the rows split at the prompts' shared prefix (str_hooks/prefix.py), or None where they share
            fewer than `MIN_SHARED_PREFIX` tokens.
    """

    indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    reference: torch.Tensor
    weights: torch.Tensor | None
    n_points: int
    weight_sum: float
    encoded: tuple[torch.Tensor, ...]
    points: tuple[int, ...]
    split: PrefixSplit | None = None


class AnchorSet:
    """Tokenized anchor prompts, their penalized points and reference values, and a deterministic order.

    Args:
        tokenizer: the model's tokenizer (the prompts are rendered as a user turn with its chat template).
        prompts: harmful prompts: a list, a file, or None for the package's own harmful anchor prompts.
        column: the column when a prompt file is CSV/JSONL (harmful and benign files alike).
        batch_size: anchors per anchor step.
        seed: order of the anchors.
        pad_token_id: id used to right-pad (masked out).
        benign_prompts: benign prompts (list or file; None for the package's own), used when
            `benign_weight` > 0.
        benign_weight: weight of a benign anchor's points relative to a harmful anchor's (1); 0 for none.

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
        benign_prompts: Sequence[str] | str | None = None,
        benign_weight: float = 0.0,
    ) -> None:
        harmful = _texts(prompts, column, "harmful_anchors", "anchor prompts")
        benign = (
            _texts(benign_prompts, column, "benign_anchors", "benign anchor prompts")
            if benign_weight > 0
            else []
        )
        self.prompts = harmful + benign
        self.is_benign = [False] * len(harmful) + [True] * len(benign)
        self.benign_weight = float(benign_weight)
        self.prompt_ids = [encode_prompt(tokenizer, text) for text in self.prompts]
        if any(len(ids) == 0 for ids in self.prompt_ids):
            raise STRConfigError("an anchor prompt tokenizes to nothing; remove empty prompts.")
        # The chat template's opening that every prompt shares: a separate anchor step may run it once.
        self.prefix_length = shared_prefix_length(self.prompt_ids)
        # What a training forward sees: the prompt, then the opening up to its last token (teacher-forced).
        self.encoded = [list(ids) for ids in self.prompt_ids]
        self.openings: list[list[int]] = [[] for _ in self.prompts]
        # The values `build_openings` met along its decoding (its `coarse`, per anchor), until used.
        self._decoded: tuple[str | None, list[torch.Tensor]] | None = None
        self.points = [1] * len(self.prompts)
        self.batch_size = min(batch_size, len(self.prompts))
        self.share_prefix = (
            False  # attach decides (`reference.share_anchor_prefix`), before the batches are built
        )
        generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(self.prompts), generator=generator).tolist()
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        # [sum(points), C]: safety logits or log-probs (C = k), or coarse log-probs (`kl`, C = k + 1),
        # anchor after anchor.
        self.reference: torch.Tensor | None = None
        self._offsets: list[int] = []
        self._built: dict[tuple[int, str], AnchorBatch] = {}

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def n_benign(self) -> int:
        return sum(self.is_benign)

    def batch_indices(self, cursor: int) -> list[int]:
        """The anchors of the batch that starts at `cursor` (wraps around)."""
        return [self.order[(cursor + i) % len(self.order)] for i in range(self.batch_size)]

    def n_points(self, indices: Sequence[int]) -> int:
        return sum(self.points[i] for i in indices)

    def point_weights(self, indices: Sequence[int]) -> torch.Tensor | None:
        """[sum(points)] weight of each point of `indices` (benign ones `benign_weight`), or None when all
        are harmful."""
        if not any(self.is_benign[i] for i in indices):
            return None
        values = [
            self.benign_weight if self.is_benign[i] else 1.0 for i in indices for _ in range(self.points[i])
        ]
        return torch.tensor(values, dtype=torch.float32)

    def tensors(
        self, indices: Sequence[int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, point_rows, point_cols) of the given anchors, one right-padded row
        each; the points of anchor `indices[j]` are the last `points` positions of row j, in order."""
        ids, mask = self.padded([self.encoded[i] for i in indices], device)
        point_rows: list[int] = []
        point_cols: list[int] = []
        for row, index in enumerate(indices):
            end = len(self.encoded[index])
            point_rows.extend([row] * self.points[index])
            point_cols.extend(range(end - self.points[index], end))
        rows = torch.tensor(point_rows, dtype=torch.long, device=device)
        return ids, mask, rows, torch.tensor(point_cols, dtype=torch.long, device=device)

    def policy_values(self, tap: ModelTap, indices: Sequence[int], coarse: str | None) -> torch.Tensor:
        """The values the penalty compares at every point of the given anchors, through `tap`'s model (the
        current grad mode and train/eval mode apply): safety logits [P, k], or with `coarse` (a form,
        `logprob` or `kl`) what that form compares (`penalty.form_values`), from the full softmax at those P
        positions only."""
        ids, mask, rows, cols = self.tensors(indices, tap.device())
        return full_row_values(tap, ids, mask, rows, cols, coarse)

    def batch(self, cursor: int, device: torch.device) -> AnchorBatch:
        """The anchor batch that starts at `cursor`, on `device` (built on first use, then reused)."""
        key = (cursor, str(device))
        cached = self._built.get(key)
        if cached is None:
            indices = self.batch_indices(cursor)
            ids, mask, rows, cols = self.tensors(indices, device)
            weights = self.point_weights(indices)
            cached = AnchorBatch(
                indices=indices,
                input_ids=ids,
                attention_mask=mask,
                rows=rows,
                cols=cols,
                reference=self.reference_for(indices).to(device),
                weights=None if weights is None else weights.to(device),
                n_points=self.n_points(indices),
                weight_sum=sum(
                    (self.benign_weight if self.is_benign[i] else 1.0) * self.points[i] for i in indices
                ),
                encoded=tuple(torch.tensor(self.encoded[i], dtype=torch.long).to(device) for i in indices),
                points=tuple(self.points[i] for i in indices),
                split=PrefixSplit.of(ids, mask, cols, self.prefix_length) if self.share_prefix else None,
            )
            self._built[key] = cached
        return cached

    def build_batches(self, device: torch.device) -> None:
        """Build every batch a run from cursor 0 visits (the cursor advances by `batch_size` modulo the set:
        n / gcd(n, batch_size) batches), so that no anchor step copies from the host."""
        n = len(self.order)
        for step in range(n // math.gcd(n, self.batch_size)):
            self.batch(step * self.batch_size % n, device)

    def batch_values(self, tap: ModelTap, batch: AnchorBatch, coarse: str | None) -> torch.Tensor:
        """`policy_values` for a prepared batch: its own forward through `tap`'s model, on the shared
        prefix's KV cache where the model allows it (str_hooks/prefix.py), else over the full rows."""
        if batch.split is not None and self._can_share_prefix(tap):
            values = values_on_prefix(tap, batch.split, batch.rows, coarse)
            if values is not None:
                return values
            self._stop_sharing(tap, "the model did not extend the prefix's KV cache")
        return full_row_values(tap, batch.input_ids, batch.attention_mask, batch.rows, batch.cols, coarse)

    def _can_share_prefix(self, tap: ModelTap) -> bool:
        # Checked at every anchor step: a trainer may turn activation checkpointing on after attach.
        return self.share_prefix and tap.can_decode_with_cache and not checkpointing_active(tap.causal_lm)

    def _stop_sharing(self, tap: ModelTap, why: str) -> None:
        self.share_prefix = False
        warn_not_shared(tap, self.prefix_length, why)

    def verify_prefix_sharing(self, tap: ModelTap) -> None:
        """Once at attach: the first batch's values on the shared prefix's cache must equal the full rows'
        (a model whose cache or positions behave otherwise runs the full rows, with a warning)."""
        batch = self.batch(0, tap.device())
        if batch.split is not None and tap.can_decode_with_cache:
            problem = prefix_problem(
                tap, batch.split, batch.input_ids, batch.attention_mask, batch.rows, batch.cols
            )
            if problem is not None:
                self._stop_sharing(tap, problem)

    def reference_for(self, indices: Sequence[int]) -> torch.Tensor:
        """Reference values at every point of the given anchors, in `tensors()` order."""
        if self.reference is None:
            raise STRConfigError("the anchors' reference values were never computed (compute_reference).")
        parts = [self.reference[self._offsets[i] : self._offsets[i] + self.points[i]] for i in indices]
        return torch.cat(parts, dim=0)

    def setup_batches(self) -> list[list[int]]:
        """Batches of the one-off no-grad passes (openings, reference values): wider than the per-step anchor
        batch, which is sized for step time (2 by default: the 180 default anchors two at a time were 450
        sequential forwards, about 80 s of a 2-core CPU before the first step on a 135M model)."""
        step = max(self.batch_size, SETUP_BATCH_SIZE)
        return [list(range(s, min(s + step, len(self.encoded)))) for s in range(0, len(self.encoded), step)]

    @torch.no_grad()
    def build_openings(
        self,
        tap: ModelTap,
        peft_model: nn.Module | None,
        n_tokens: int,
        end_ids: set[int],
        coarse: str | None = None,
        share_prefix: bool = True,
    ) -> None:
        """Greedy-generate each anchor's opening of up to `n_tokens` tokens with the model as it is now
        (adapters disabled), stopping after an end token; the anchors are then penalized at every position
        of it. `n_tokens` = 1 keeps the decision point only (nothing is generated). The values (`coarse`, as
        in `compute_reference`) met along the decoding are kept for `compute_reference`. `share_prefix` runs
        the prompts' shared prefix once per decoding batch."""
        if n_tokens <= 1:
            return
        prefix_length = self.prefix_length if share_prefix else 0
        with _adapters_off(peft_model), eval_mode(tap.causal_lm):
            decoded = decode_openings(self, tap, n_tokens, end_ids, coarse, prefix_length)
        for i, (opening, _) in decoded.items():
            self.openings[i] = opening
            self.encoded[i] = self.prompt_ids[i] + opening[:-1]
            self.points[i] = len(opening)
        self._decoded = (coarse, [decoded[i][1] for i in range(len(self.encoded))])

    def padded(
        self, rows: list[list[int]], device: torch.device, left: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of `rows`, padded on the right (or the left, for decoding)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[r, span] = torch.tensor(row, dtype=torch.long)
            mask[r, span] = 1
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def compute_reference(
        self, tap: ModelTap, peft_model: nn.Module | None, coarse: str | None = None
    ) -> torch.Tensor:
        """Reference values at every point of every anchor, from the model as it is now (adapters disabled
        if any): safety logits, or with `coarse` (a form) what that form compares. After `build_openings`
        with the same `coarse` they are the values its decoding met, once the first setup batch's full rows
        agree with them (else, and without openings, one pass over the full rows)."""
        batches = self.setup_batches()
        decoded = self._decoded[1] if self._decoded is not None and self._decoded[0] == coarse else None
        self._decoded = None
        with _adapters_off(peft_model), eval_mode(tap.causal_lm):
            parts = [self.policy_values(tap, batches[0], coarse).float().cpu()]
            # Both pass over the same model and tokens; only their kernels (a KV cache, padding) differ.
            if decoded is not None and self._agree(decoded, batches[0], parts[0], tap):
                parts += [decoded[i] for batch in batches[1:] for i in batch]
            else:
                parts += [self.policy_values(tap, batch, coarse).float().cpu() for batch in batches[1:]]
        self.reference = torch.cat(parts, dim=0)
        offsets = [0]
        for points in self.points[:-1]:
            offsets.append(offsets[-1] + points)
        self._offsets = offsets
        return self.reference

    @staticmethod
    def _agree(decoded: list[torch.Tensor], batch: list[int], full: torch.Tensor, tap: ModelTap) -> bool:
        along = torch.cat([decoded[i] for i in batch], dim=0)
        return logits_close(along, full, tap.rows.weight.dtype, rtol=1e-4)[2]


def _adapters_off(peft_model: nn.Module | None) -> contextlib.AbstractContextManager[Any]:
    if peft_model is None:
        return contextlib.nullcontext()
    disable: Any = peft_model.disable_adapter
    context: contextlib.AbstractContextManager[Any] = disable()
    return context
