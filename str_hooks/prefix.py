"""The anchors' shared prompt prefix, run once per anchor step instead of once per anchor.

Every anchor is rendered with the same chat template, and most templates open every prompt with the same
tokens (a default system prompt, a role header): 24 of the ~47 tokens of each anchor on SmolLM2. A separate
anchor step can run that prefix once (one row), repeat its KV cache for every anchor, and run only the
anchors' own tokens on it: the same logits and the same gradient as the full rows (the cache's tensors carry
the prefix's graph, and the repeat sums the anchors' gradients into it), at (batch - 1) x prefix fewer tokens.
So more anchors a step (a less noisy anchor term) cost what fewer did.

Where a model cannot, the full rows run instead: no KV cache argument or `position_ids`, activation
checkpointing (transformers' drops the cache in training; a recomputing wrapper would append to it twice),
or a one-off check at attach finds the two paths' values apart.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from str_hooks.penalty import form_values
from str_hooks.tap import ModelTap, Sink, eval_mode, logits_close

# The second forward has a fixed cost of its own: sharing pays only where it saves this many tokens a step,
# (batch - 1) x prefix. On SmolLM2 (a 24-token prefix, 2 CPU threads) one anchor step's forward and backward
# took x1.26 of the full rows' time shared at 2 anchors (24 tokens saved), x0.98 at 4 (72), x0.78 at 8 (168):
# `python -m study anchor-prefix` (results/harmful_mixing/ANCHOR_PREFIX.md).
MIN_SAVED_TOKENS = 96


def worth_sharing(mode: str, prefix_length: int, batch_size: int, device: torch.device) -> bool:
    """Whether to run the shared prefix once (`reference.share_anchor_prefix`): `auto` where the anchor step
    is token-bound (the CPU) and it saves enough tokens to pay for the second forward."""
    if mode == "no" or prefix_length == 0:
        return False
    if mode == "yes":
        return True
    return device.type == "cpu" and (batch_size - 1) * prefix_length >= MIN_SAVED_TOKENS


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many tokens every prompt opens with, leaving each at least one token of its own."""
    if len(prompts) < 2:
        return 0
    first = prompts[0]
    limit = min(len(p) for p in prompts) - 1
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


@dataclass(frozen=True)
class PrefixSplit:
    """One anchor batch split at the shared prefix (everything on the training device).

    Attributes:
        prefix_ids: the shared prefix, one row [1, P].
        suffix_ids: each anchor's own tokens, right-padded [B, S].
        attention_mask: the prefix's ones then the suffixes' mask [B, P + S].
        position_ids: positions of the suffix tokens [B, S] (P, P + 1, ...).
        cols: the penalized points' columns in the suffix rows.
    """

    prefix_ids: torch.Tensor
    suffix_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    cols: torch.Tensor

    @classmethod
    def of(
        cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, cols: torch.Tensor, prefix_length: int
    ) -> PrefixSplit:
        suffix = input_ids[:, prefix_length:]
        positions = torch.arange(prefix_length, input_ids.shape[1], device=input_ids.device)
        return cls(
            prefix_ids=input_ids[:1, :prefix_length],
            suffix_ids=suffix,
            attention_mask=attention_mask,
            position_ids=positions.expand(suffix.shape[0], -1),
            cols=cols - prefix_length,
        )

    @property
    def prefix_length(self) -> int:
        return int(self.prefix_ids.shape[1])


def checkpointing_active(model: nn.Module) -> bool:
    """Whether some layer recomputes its forward in the backward (transformers' gradient checkpointing, or a
    checkpoint wrapper such as FSDP's): a KV cache passed through it is dropped or appended to twice."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            return True
        if "CheckpointWrapper" in type(module).__name__:
            return True
    return False


def values_on_prefix(
    tap: ModelTap, split: PrefixSplit, rows: torch.Tensor, coarse: str | None
) -> torch.Tensor | None:
    """The anchors' values at their points (what `AnchorSet.batch_values` returns from the full rows) from
    one forward over the shared prefix and one over the anchors' own tokens on its repeated KV cache; None
    when the model did not extend the cache (a layer dropped it), so the caller runs the full rows."""
    cache_kwargs: dict[str, Any] = {"use_cache": True}
    if tap.accepts_logits_to_keep:
        cache_kwargs["logits_to_keep"] = 1
    prefix = tap.run(
        input_ids=split.prefix_ids, attention_mask=torch.ones_like(split.prefix_ids), **cache_kwargs
    )
    cache = prefix.past_key_values
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(split.suffix_ids.shape[0])
    if coarse:
        tap.request_points(rows, split.cols)
    sink = tap.run(
        input_ids=split.suffix_ids,
        attention_mask=split.attention_mask,
        position_ids=split.position_ids,
        **{str(tap.cache_argument): cache},
        **cache_kwargs,
    )
    if cache.get_seq_length() != split.prefix_length + split.suffix_ids.shape[1]:
        return None
    return point_values(tap, sink, rows, split.cols, coarse)


def full_row_values(
    tap: ModelTap,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    coarse: str | None,
) -> torch.Tensor:
    """The values at (rows, cols) from one forward over the anchors' full rows (no shared prefix)."""
    if coarse:
        tap.request_points(rows, cols)
    sink = tap.run(input_ids=input_ids, attention_mask=attention_mask, **tap.lean_kwargs())
    return point_values(tap, sink, rows, cols, coarse)


def point_values(
    tap: ModelTap, sink: Sink, rows: torch.Tensor, cols: torch.Tensor, coarse: str | None
) -> torch.Tensor:
    """What the penalty compares at (rows, cols) of a forward that was asked for those points when `coarse`:
    the form's values from the full softmax there, else the safety logits."""
    if coarse:
        assert sink.point_logits is not None  # requested before the forward
        return form_values(sink.point_logits, tap.rows.ids_on(sink.point_logits.device), coarse)
    logits = sink.safety_logits
    assert logits is not None  # tap.run guarantees it
    return logits[rows.to(logits.device), cols.to(logits.device)]


@torch.no_grad()
def prefix_problem(
    tap: ModelTap,
    split: PrefixSplit,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> str | None:
    """Why the shared prefix's values differ from the full rows' on this batch (in eval mode), or None when
    they agree within the model's precision (compared as log-probabilities of the safety tokens)."""
    with eval_mode(tap.causal_lm):
        shared = values_on_prefix(tap, split, rows, "logprob")
        full = full_row_values(tap, input_ids, attention_mask, rows, cols, "logprob")
    if shared is None:
        return "the model did not extend the prefix's KV cache"
    err, scale, close = logits_close(shared, full, tap.rows.weight.dtype)
    return (
        None
        if close
        else f"its values differ from the full rows' by {float(err):.3g} (scale {float(scale):.3g})"
    )


def warn_not_shared(tap: ModelTap, prefix_length: int, why: str) -> None:
    warnings.warn(
        f"the anchors' shared prompt prefix ({prefix_length} tokens) is not reused on "
        f"{type(tap.causal_lm).__name__}: {why}. Each anchor step runs the anchors' full rows instead (the same "
        "penalty, at more tokens a step).",
        RuntimeWarning,
        stacklevel=3,
    )
