"""`RowScreen`: which training rows a reference forward runs on (`reference.screen_mass`, `audit_share`).

The gate (`penalty.min_reference_mass`) keeps the rows' term to positions where the aligned model would refuse,
which in a benign task with a few harmful rows are a few rows' openings; yet the reference forward that finds
them costs a whole no-grad forward of the batch (about half a LoRA step). The model being trained is a cheap,
free witness: where it still puts mass on the safety tokens, the aligned model very likely does too. Rows it
would not refuse are audited at random with probability q and weighted 1 / q, so the penalty's expectation is
exactly the full forward's (a Horvitz-Thompson estimate: each row's inclusion probability is known, 1 or q).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from str_hooks.errors import STRError
from str_hooks.penalty import reference_safety_mass

# Forward inputs with one row per training example (dim 0); everything else passes through unchanged.
ROW_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds")
# Per-position inputs shared by every row.
SHARED_INPUTS = ("cache_position",)


class RowSelection(NamedTuple):
    """The rows the reference runs on ([n] long indices), a [B] bool mask of them, and each row's weight [B]
    (1 for a screened row, 1 / q for an audited one, 0 for a row left out)."""

    rows: torch.Tensor
    selected: torch.Tensor
    weights: torch.Tensor


class RowScreen:
    """Picks the rows of a training batch a reference forward runs on.

    Args:
        screen_mass: a row is screened in when the trained model's safety mass reaches this at one of its
            penalized positions.
        audit_share: the probability q that any other row is chosen (weighted 1 / q).
        seed: seeds the audit draws (a generator of its own, so the run's RNG streams are untouched).
    """

    def __init__(self, screen_mass: float, audit_share: float, seed: int = 0) -> None:
        self.screen_mass = screen_mass
        self.audit_share = audit_share
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, policy: torch.Tensor, positions: torch.Tensor, k: int) -> RowSelection:
        """`policy`: the trained model's coarse values [B, T, C] (forms `kl`/`logprob`); `positions`: the [B, T]
        candidate mask; `k`: the number of safety tokens. One host read (the number of rows chosen)."""
        with torch.no_grad():
            mass = reference_safety_mass(policy.detach(), k)
            mass = torch.where(positions & torch.isfinite(mass), mass, 0.0)
            screened = (mass >= self.screen_mass).any(dim=1)
            draws = torch.rand(screened.shape[0], generator=self.generator).to(screened.device)
            audited = ~screened & (draws < self.audit_share)
            selected = screened | audited
            weights = torch.where(screened, 1.0, torch.where(audited, 1.0 / self.audit_share, 0.0))
            rows = selected.nonzero().flatten()
        return RowSelection(rows, selected, weights)


def select_rows(
    args: tuple[Any, ...], kwargs: dict[str, Any], rows: torch.Tensor, batch: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The forward inputs of the rows `rows` of a batch of `batch` rows.

    Raises:
        STRError: a tensor input this module does not know the layout of (it cannot tell whether dim 0 is the
            batch), naming the option that runs every row instead.
    """

    def take(name: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or name in SHARED_INPUTS:
            return value
        if name in ROW_INPUTS and value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        if name in ROW_INPUTS and value.dim() > 0 and value.shape[0] == 1:
            return value  # broadcast over the batch (e.g. position_ids [1, T])
        raise STRError(
            f"`reference.screen_mass` runs the reference forward on some rows of the batch, but the forward input "
            f"{name!r} (shape {tuple(value.shape)}) is not one it knows how to split by row: remove "
            "`reference.screen_mass` to run the reference on every row."
        )

    positional = tuple(take("input_ids" if i == 0 else f"argument {i}", a) for i, a in enumerate(args))
    return positional, {name: take(name, value) for name, value in kwargs.items()}


__all__ = ["ROW_INPUTS", "RowScreen", "RowSelection", "select_rows"]
