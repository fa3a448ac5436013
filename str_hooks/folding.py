"""Folding anchor prompts into a training batch (`reference.anchor_placement: folded`).

A separate anchor forward+backward is latency-bound on a GPU: it costs x1.28-x1.41 per step whatever its
size (docs/design.md section 4), and running it only every N-th step loses the refusals it was meant to keep
(results/study). Folded, the anchors ride in the training forward as packed segments of their own, in the
rows' trailing padding where they fit, else in front of the rows: every segment restarts its position ids
at 0 and the attention mask is dropped, so transformers builds a block-diagonal causal mask (it detects
packed sequences from position ids when no mask and no KV cache are given). An anchor then sees only
itself and the training tokens never see an anchor: the anchors' decision-point logits equal a separate
forward's, and the training tokens' logits are unchanged. When the rows are widened, the labels stay
[B, T] with `logits_to_keep` = the rows' positions, so the LM head runs on the training positions only and
the cross-entropy is exactly plain SFT's; forwards without `logits_to_keep` (and TRL's fused LM head,
which scores every labelled position) get labels extended with -100 instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from str_hooks.errors import STRError

IGNORE_INDEX = -100
# Per-token batch fields the fold knows: model inputs it extends (with this fill value) and loss targets
# it keeps (logits_to_keep) or extends with IGNORE_INDEX.
_INPUT_FILL = {"token_type_ids": 0}
_TARGET_FIELDS = ("labels", "shift_labels")
_SEQUENCE_FIELDS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class FoldedAnchors:
    """Where the anchors of one folded batch sit.

    Attributes:
        indices: anchor indices (into the `AnchorSet`), in fold order.
        rows, cols: row and column of every penalized point, anchor after anchor in fold order, each
            anchor's points (its last `points` positions: the decision point and its opening) in order; on
            the batch's device.
        input_ids: the folded input_ids; the training forward must run on them (anchors in the padding
            leave the shape as it was, so `loss()` checks the ids, not just their shape).
    """

    indices: list[int]
    rows: torch.Tensor
    cols: torch.Tensor
    input_ids: torch.Tensor
    # Without reading the batch (`fold_in_front`): a 0-dim int tensor of `PROBLEMS` bits found on the device,
    # reported by `handle.step()`; None when the batch was checked on the host before folding.
    problems: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, width) of the folded input_ids."""
        return (int(self.input_ids.shape[0]), int(self.input_ids.shape[1]))


def _placement_error(problem: str, fix: str) -> STRError:
    return STRError(
        f"`reference.anchor_placement` is 'folded' but {problem}: {fix}, or set `reference.anchor_placement: "
        "separate` (a separate anchor forward, which takes any batch)."
    )


def fold_anchors(
    batch: Mapping[str, Any],
    anchors: Sequence[Sequence[int]],
    indices: Sequence[int],
    *,
    pad_token_id: int,
    keep_logits: bool,
    points: Sequence[int] | None = None,
) -> tuple[dict[str, Any], FoldedAnchors]:
    """Pack anchor prompts into a batch as segments of their own.

    An anchor goes into a row's trailing padding where it fits (padding whose targets are all ignored:
    the batch keeps its width, so such an anchor costs no extra tokens); the others go in front of the
    rows, longest first into the row with the shortest prefix so far, and a row with fewer prefix tokens
    than the longest starts with a padding segment of its own. The rows' own position ids are kept (the
    batch's `position_ids`, or 0..T-1), so the training tokens see exactly what they saw before.

    Args:
        batch: the training batch (a mapping with `input_ids` [B, T]; right-padded `attention_mask`,
            `position_ids`, `labels`, `shift_labels`, `token_type_ids` optional).
        anchors: the token ids of each anchor prompt to fold.
        indices: the anchors' indices in their `AnchorSet` (returned in `FoldedAnchors.indices`).
        pad_token_id: id of the filler tokens.
        keep_logits: True passes `logits_to_keep` = the indices of the T row positions and leaves the
            targets as they are (the forward must accept `logits_to_keep`); False extends the targets with
            -100 over the prefix.
        points: per anchor, how many of its last positions are penalized (default 1: the decision point).

    Returns:
        The folded batch (a new dict; the input is not modified) and where its anchors sit.

    Raises:
        STRError: a batch the fold cannot keep exact: no `input_ids`, `inputs_embeds`, left padding or
            packed-sample attention masks, an unknown per-token field, or a `logits_to_keep` of its own.
    """
    ids = _check_fields(batch)
    n_rows, width = ids.shape
    device = ids.device
    mask = batch.get("attention_mask")
    if mask is not None:
        _check_right_padded(mask, (n_rows, width))

    positions = batch.get("position_ids")
    if positions is None:
        row_positions = torch.arange(width, dtype=torch.long).expand(n_rows, width)
    else:
        row_positions = positions.detach().to("cpu", torch.long).expand(n_rows, width)

    lengths = [len(a) for a in anchors]
    free = _free_tails(batch, mask, n_rows, width)
    tail_members, prefix_members = _place(lengths, free)
    prefix = max(sum(lengths[j] for j in members) for members in prefix_members)
    prefix_ids = torch.full((n_rows, prefix), pad_token_id, dtype=torch.long)
    new_positions = torch.cat([torch.zeros((n_rows, prefix), dtype=torch.long), row_positions], dim=1)
    last_at: list[tuple[int, int]] = [(0, 0)] * len(anchors)  # (row, column) of each anchor's last token
    tail_ids: list[tuple[int, int, int]] = []  # (row, start column, anchor) written into the rows' padding
    starts: list[tuple[int, int]] = []  # (row, column) where a segment other than the first begins
    for r in range(n_rows):
        # The prefix: a padding segment, then this row's prefix anchors, then the row itself.
        offset = prefix - sum(lengths[j] for j in prefix_members[r])
        new_positions[r, :offset] = torch.arange(offset)
        for j in prefix_members[r]:
            prefix_ids[r, offset : offset + lengths[j]] = torch.tensor(list(anchors[j]), dtype=torch.long)
            new_positions[r, offset : offset + lengths[j]] = torch.arange(lengths[j])
            if offset > 0:
                starts.append((r, offset))
            last_at[j] = (r, offset + lengths[j] - 1)
            offset += lengths[j]
        if prefix > 0:
            starts.append((r, prefix))
        if not tail_members[r]:
            continue
        # The tail: anchors written over the row's trailing padding (labels there are all ignored, and a
        # real token never attends forward), then what is left of the padding as a segment of its own.
        offset = prefix + width - free[r]
        for j in tail_members[r]:
            new_positions[r, offset : offset + lengths[j]] = torch.arange(lengths[j])
            tail_ids.append((r, offset - prefix, j))
            starts.append((r, offset))
            last_at[j] = (r, offset + lengths[j] - 1)
            offset += lengths[j]
        if offset < prefix + width:
            new_positions[r, offset:] = torch.arange(prefix + width - offset)
            starts.append((r, offset))
    for r, c in starts:
        # transformers starts a new segment wherever a position id is not the previous one plus 1.
        if c > 0 and int(new_positions[r, c]) == int(new_positions[r, c - 1]) + 1:
            raise _placement_error(
                f"row {r}'s position ids continue across the anchor segment boundary at column {c}",
                "give the rows position ids that start at 0",
            )
    body = ids
    if tail_ids:
        body = ids.clone()
        for r, start, j in tail_ids:
            body[r, start : start + lengths[j]] = torch.tensor(
                list(anchors[j]), dtype=ids.dtype, device=device
            )

    folded: dict[str, Any] = {
        key: value for key, value in batch.items() if key not in ("attention_mask", "position_ids")
    }
    folded["input_ids"] = torch.cat([prefix_ids.to(device, ids.dtype), body], dim=1) if prefix else body
    folded["position_ids"] = new_positions.to(device)
    _extend_fields(batch, folded, prefix, width, keep_logits, device)
    counts = list(points) if points is not None else [1] * len(anchors)
    rows = [r for (r, _), n in zip(last_at, counts, strict=True) for _ in range(n)]
    cols = [c - n + 1 + q for (_, c), n in zip(last_at, counts, strict=True) for q in range(n)]
    where = FoldedAnchors(
        indices=list(indices),
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        cols=torch.tensor(cols, dtype=torch.long, device=device),
        input_ids=folded["input_ids"],
    )
    return folded, where


# Problems `fold_in_front` finds on the device (bits of `FoldedAnchors.problems`), with their fixes.
PROBLEMS = {
    1: (
        "the batch is left-padded (or has holes in its `attention_mask`): without a mask, real tokens attend "
        "to the padding before them",
        "pad on the right (tokenizer.padding_side = 'right')",
    ),
    2: (
        "the batch's `attention_mask` holds values other than 0 and 1 (packed samples numbered by segment)",
        "pack samples with `position_ids` restarting at 0 instead (padding-free batches)",
    ),
    4: (
        "a row's position ids continue across the anchor segment boundary",
        "give the rows position ids that start at 0",
    ),
}


def problem_error(bits: int) -> STRError:
    """The error for the `PROBLEMS` bits a folded step found (the first one, with its fix)."""
    # A segment-numbered mask also looks left-padded (1 -> 2 rises): name the cause, as the host check does.
    problem, fix = next(PROBLEMS[b] for b in (2, 1, 4) if bits & b)
    return _placement_error(problem, fix)


def fold_in_front(
    batch: Mapping[str, Any],
    anchors: Sequence[torch.Tensor],
    indices: Sequence[int],
    *,
    pad_token_id: int,
    keep_logits: bool,
    points: Sequence[int] | None = None,
) -> tuple[dict[str, Any], FoldedAnchors]:
    """`fold_anchors` without reading the batch on the host (no synchronization on an accelerator): every
    anchor goes in front of the rows, whatever their padding, and the layout is built from the anchors'
    lengths alone, with device ops only (`anchors` are token-id tensors on the batch's device). What
    `fold_anchors` refuses before folding (left padding, segment-numbered masks, position ids continuing into
    a row) is found on the device instead and returned in `FoldedAnchors.problems`."""
    ids = _check_fields(batch)
    n_rows, width = ids.shape
    device = ids.device
    lengths = [int(a.shape[0]) for a in anchors]
    _, prefix_members = _place(lengths, [0] * n_rows)
    prefix = max(sum(lengths[j] for j in members) for members in prefix_members)
    row_ids: list[torch.Tensor] = []
    row_positions: list[torch.Tensor] = []
    last_at: list[tuple[int, int]] = [(0, 0)] * len(anchors)
    for r in range(n_rows):
        filler = prefix - sum(lengths[j] for j in prefix_members[r])
        parts = [torch.full((filler,), pad_token_id, dtype=ids.dtype, device=device)]
        positions = [torch.arange(filler, device=device)]
        offset = filler
        for j in prefix_members[r]:
            parts.append(anchors[j].to(device, ids.dtype))
            positions.append(torch.arange(lengths[j], device=device))
            last_at[j] = (r, offset + lengths[j] - 1)
            offset += lengths[j]
        row_ids.append(torch.cat(parts))
        row_positions.append(torch.cat(positions))
    given = batch.get("position_ids")
    own = (
        torch.arange(width, device=device).expand(n_rows, width)
        if given is None
        else given.to(device, torch.long).expand(n_rows, width)
    )
    new_positions = torch.cat([torch.stack(row_positions), own], dim=1)
    folded: dict[str, Any] = {k: v for k, v in batch.items() if k not in ("attention_mask", "position_ids")}
    folded["input_ids"] = torch.cat([torch.stack(row_ids), ids], dim=1)
    folded["position_ids"] = new_positions
    _extend_fields(batch, folded, prefix, width, keep_logits, device)
    problems = torch.zeros((), dtype=torch.long, device=device)
    mask = batch.get("attention_mask")
    if mask is not None:
        _check_mask_shape(mask, (n_rows, width))
        values = mask.detach()
        problems = problems + 2 * (~((values == 0) | (values == 1)).all()).long()
        if width > 1:
            problems = problems + (values[:, 1:] > values[:, :-1]).any().long()
    # transformers starts a new segment wherever a position id is not the previous one plus 1.
    continues = (new_positions[:, prefix] == new_positions[:, prefix - 1] + 1).any()
    problems = problems + 4 * continues.long()
    counts = list(points) if points is not None else [1] * len(anchors)
    where = FoldedAnchors(
        indices=list(indices),
        rows=torch.cat(
            [
                torch.full((n,), r, dtype=torch.long, device=device)
                for (r, _), n in zip(last_at, counts, strict=True)
            ]
        ),
        cols=torch.cat(
            [torch.arange(c - n + 1, c + 1, device=device) for (_, c), n in zip(last_at, counts, strict=True)]
        ),
        input_ids=folded["input_ids"],
        problems=problems,
    )
    return folded, where


def _free_tails(batch: Mapping[str, Any], mask: Any, n_rows: int, width: int) -> list[int]:
    """Per row, the trailing positions an anchor may overwrite: padding (mask 0) whose targets are all
    ignored. Without an attention mask there is no padding to use."""
    if mask is None:
        return [0] * n_rows
    free = mask.detach() == 0
    for key in _TARGET_FIELDS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == (n_rows, width):
            free = free & (value.detach() == IGNORE_INDEX)
    trailing = free.flip(1).long().cumprod(dim=1).sum(dim=1)
    return [int(n) for n in trailing.tolist()]


def _place(lengths: list[int], free: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Anchors into the rows' trailing padding where they fit (longest first, best fit), the rest into a
    prefix balanced over the rows. Returns (tail anchors per row, prefix anchors per row)."""
    n_rows = len(free)
    room = list(free)
    tails: list[list[int]] = [[] for _ in range(n_rows)]
    prefixes: list[list[int]] = [[] for _ in range(n_rows)]
    prefix_len = [0] * n_rows
    for j in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        fitting = [r for r in range(n_rows) if room[r] >= lengths[j]]
        if fitting:
            r = min(fitting, key=lambda r: (room[r], r))
            tails[r].append(j)
            room[r] -= lengths[j]
        else:
            r = min(range(n_rows), key=lambda r: (prefix_len[r], r))
            prefixes[r].append(j)
            prefix_len[r] += lengths[j]
    return tails, prefixes


def _extend(value: torch.Tensor, prefix: int, fill: int) -> torch.Tensor:
    pad = torch.full((value.shape[0], prefix, *value.shape[2:]), fill, dtype=value.dtype, device=value.device)
    return torch.cat([pad, value], dim=1)


def _check_fields(batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch's [B, T] `input_ids`, after refusing what no fold can keep exact (shapes only: no read)."""
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        found = "inputs_embeds" if "inputs_embeds" in batch else f"input_ids={type(ids).__name__}"
        raise _placement_error(
            f"the batch has no [B, T] `input_ids` tensor ({found})", "pass token ids in `input_ids`"
        )
    if "logits_to_keep" in batch:
        raise _placement_error(
            "the batch sets `logits_to_keep` itself", "drop it (the fold sets it to the training width)"
        )
    n_rows, width = ids.shape
    for key, value in batch.items():
        if (
            isinstance(value, torch.Tensor)
            and value.dim() >= 2
            and tuple(value.shape[:2]) == (n_rows, width)
            and key not in _SEQUENCE_FIELDS
            and key not in _TARGET_FIELDS
            and key not in _INPUT_FILL
        ):
            raise _placement_error(
                f"the batch has a per-token field `{key}` {tuple(value.shape)} the fold does not know how to "
                f"extend (it knows {', '.join(_SEQUENCE_FIELDS + _TARGET_FIELDS + tuple(_INPUT_FILL))})",
                f"drop `{key}` from the batch before the forward",
            )
    return ids


def _extend_fields(
    batch: Mapping[str, Any],
    folded: dict[str, Any],
    prefix: int,
    width: int,
    keep_logits: bool,
    device: torch.device,
) -> None:
    """Per-token inputs extended over the prefix; the targets kept (with `logits_to_keep`) or extended."""
    for key, fill in _INPUT_FILL.items():
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and prefix:
            folded[key] = _extend(value, prefix, fill)
    if not prefix:
        return  # every anchor went into the rows' padding: the batch keeps its width and its targets
    if keep_logits:
        # Indices rather than the int `width`: the kept hidden states are then a contiguous copy, which fused
        # losses that `.view()` them (Liger) need; a slice of the last T positions is not contiguous for B > 1.
        folded["logits_to_keep"] = torch.arange(prefix, prefix + width, device=device)
        return
    for key in _TARGET_FIELDS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            folded[key] = _extend(value, prefix, IGNORE_INDEX)


def _check_mask_shape(mask: Any, shape: tuple[int, int]) -> None:
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        raise _placement_error(
            f"the batch's `attention_mask` is not a {list(shape)} tensor "
            f"({tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__})",
            "pass a 2D 0/1 padding mask",
        )


def _check_right_padded(mask: Any, shape: tuple[int, int]) -> None:
    _check_mask_shape(mask, shape)
    values = mask.detach()
    if not bool(((values == 0) | (values == 1)).all()):
        raise _placement_error(*PROBLEMS[2])
    # Right padding: ones, then zeros. Without the mask a real token still sees only what comes before it.
    if shape[1] > 1 and not bool((values[:, 1:] <= values[:, :-1]).all()):
        raise _placement_error(*PROBLEMS[1])
