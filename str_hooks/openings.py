"""The anchors' openings: the aligned model's own greedy reply openings, decoded once at attach.

Each decoding step's forward already holds, at the position that predicts the next opening token, the values
the penalty compares there (safety logits, or a coarse form's values): the anchor's reference at that point.
`decode_openings` returns them beside the openings, so that the reference needs no second pass over the
anchors' full rows (`AnchorSet.compute_reference` checks them against one batch of full rows first).

The prompts' first forward is most of the decoding's cost, and about half of every anchor's prompt is the chat
template's opening that all of them share (24 of SmolLM2's ~43 prompt tokens): that prefix runs once per batch
and its KV cache is repeated for every anchor, as the separate anchor step does (str_hooks/prefix.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from str_hooks.prefix import point_values
from str_hooks.tap import ModelTap, Sink

if TYPE_CHECKING:
    from str_hooks.anchors import AnchorSet

# An opening (token ids, the end token included when one was reached) and its values [len(opening), C].
Decoded = dict[int, tuple[list[int], torch.Tensor]]


def _record(
    decoded: dict[int, tuple[list[int], list[torch.Tensor]]],
    anchors: list[int],
    tokens: list[int],
    values: torch.Tensor,
    end_ids: set[int],
) -> None:
    """Append each still-open anchor's next token and the values at the point that predicted it."""
    values = values.float().cpu()  # one copy a step, not one per anchor
    for row, (index, token) in enumerate(zip(anchors, tokens, strict=True)):
        opening, kept = decoded[index]
        if not opening or opening[-1] not in end_ids:
            opening.append(int(token))
            kept.append(values[row])


def _finished(decoded: dict[int, tuple[list[int], list[torch.Tensor]]], anchors: list[int]) -> Decoded:
    return {i: (decoded[i][0], torch.stack(decoded[i][1])) for i in anchors}


@dataclass(frozen=True)
class Decoding:
    """What every batch of one decoding shares: the anchors, the model's tap, the opening's length, the
    tokens that end it and the values to keep along it (`coarse`, as in `AnchorSet.compute_reference`)."""

    anchors: AnchorSet
    tap: ModelTap
    n_tokens: int
    end_ids: set[int]
    coarse: str | None
    # Tokens every prompt opens with, run once per batch (0: each prompt runs whole).
    prefix_length: int = 0


def _prefill(
    run: Decoding, indices: list[int], kwargs: dict[str, Any]
) -> tuple[Sink, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompts' forward, left-padded so that every prompt ends in the last column: on the shared prefix's
    repeated KV cache where there is one (the padding then sits between the prefix and each prompt's own
    tokens, masked), else over the whole prompts. Returns the forward, its attention mask, its positions and
    the column of each row's last token."""
    anchors, tap = run.anchors, run.tap
    length = run.prefix_length if len(indices) > 1 else 0  # one prompt alone shares nothing
    device = tap.device()
    rows = torch.arange(len(indices), device=device)
    if length:
        prefix_ids = torch.tensor([anchors.prompt_ids[indices[0]][:length]], dtype=torch.long, device=device)
        prefix = tap.run(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids), **kwargs)
        cache = prefix.past_key_values
        if cache is not None and hasattr(cache, "batch_repeat_interleave"):
            cache.batch_repeat_interleave(len(indices))
            ids, own = anchors.padded([anchors.prompt_ids[i][length:] for i in indices], device, left=True)
            mask = torch.cat([torch.ones((len(indices), length), dtype=own.dtype, device=device), own], dim=1)
            positions = length + (own.cumsum(dim=1) - 1).clamp_min(0)
            last = torch.full_like(rows, ids.shape[1] - 1)
            tap.request_points(rows, last)
            sink = tap.run(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                **{str(tap.cache_argument): cache},
                **kwargs,
            )
            if cache.get_seq_length() == length + ids.shape[1]:
                return sink, mask, positions, last
        # A model that did not extend the cache decodes from the whole prompts (the same openings).
    ids, mask = anchors.padded([anchors.prompt_ids[i] for i in indices], device, left=True)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    last = torch.full_like(rows, ids.shape[1] - 1)
    tap.request_points(rows, last)
    return (
        tap.run(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs),
        mask,
        positions,
        last,
    )


def greedy_with_cache(run: Decoding, indices: list[int]) -> Decoded:
    """Greedy openings decoded on a KV cache: one forward over the left-padded prompts (their shared prefix
    once), then one token per forward (positions from the attention mask, so padding moves nothing)."""
    tap, n_tokens, end_ids, coarse = run.tap, run.n_tokens, run.end_ids, run.coarse
    device = tap.device()
    kwargs: dict[str, Any] = {"use_cache": True}
    if tap.accepts_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    rows = torch.arange(len(indices), device=device)
    decoded: dict[int, tuple[list[int], list[torch.Tensor]]] = {i: ([], []) for i in indices}
    sink, mask, positions, cols = _prefill(run, indices, kwargs)
    for step in range(n_tokens):
        assert sink.point_logits is not None  # requested above
        tokens = sink.point_logits.argmax(dim=-1)
        _record(decoded, indices, tokens.tolist(), point_values(tap, sink, rows, cols, coarse), end_ids)
        if all(decoded[i][0][-1] in end_ids for i in indices) or step == n_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        cols = torch.zeros_like(rows)  # each later forward is one token wide
        tap.request_points(rows, cols)
        sink = tap.run(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions,
            **{str(tap.cache_argument): sink.past_key_values},
            **kwargs,
        )
    return _finished(decoded, indices)


def greedy_full_forwards(run: Decoding, indices: list[int]) -> Decoded:
    """Greedy openings for models without a usable KV cache: one full forward per token."""
    anchors, tap, end_ids = run.anchors, run.tap, run.end_ids
    decoded: dict[int, tuple[list[int], list[torch.Tensor]]] = {i: ([], []) for i in indices}
    for _ in range(run.n_tokens):
        active = [i for i in indices if not decoded[i][0] or decoded[i][0][-1] not in end_ids]
        if not active:
            break
        sequences = [anchors.prompt_ids[i] + decoded[i][0] for i in active]
        ids, mask = anchors.padded(sequences, tap.device())
        rows = torch.arange(len(active), device=ids.device)
        cols = mask.sum(dim=1) - 1
        tap.request_points(rows, cols)
        sink = tap.run(input_ids=ids, attention_mask=mask, **tap.lean_kwargs())
        assert sink.point_logits is not None  # requested above
        tokens = sink.point_logits.argmax(dim=-1).tolist()
        _record(decoded, active, tokens, point_values(tap, sink, rows, cols, run.coarse), end_ids)
    return _finished(decoded, indices)


def decode_openings(
    anchors: AnchorSet,
    tap: ModelTap,
    n_tokens: int,
    end_ids: set[int],
    coarse: str | None,
    prefix_length: int = 0,
) -> Decoded:
    """Every anchor's greedy opening of up to `n_tokens` tokens and the values along it, in wide batches
    (the caller disables adapters and sets eval mode); the first `prefix_length` tokens, shared by every
    prompt, run once per batch where the model decodes on a KV cache."""
    decode = greedy_with_cache if tap.can_decode_with_cache else greedy_full_forwards
    run = Decoding(anchors, tap, n_tokens, end_ids, coarse, prefix_length)
    decoded: Decoded = {}
    for indices in anchors.setup_batches():
        decoded.update(decode(run, indices))
    return decoded


__all__ = ["Decoded", "Decoding", "decode_openings", "greedy_full_forwards", "greedy_with_cache"]
