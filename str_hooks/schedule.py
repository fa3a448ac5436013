"""`StepSchedule`: what changes with the optimizer step (coef warm-up, the anchor cadence and the anchor
batch cursor), the one place that says when an anchor term is due, and the state a resume needs."""

from __future__ import annotations

from str_hooks.penalty import coef_at


class StepSchedule:
    """Optimizer steps seen, the coefficient at this step, and the anchor schedule.

    Args:
        coef: the full penalty coefficient.
        warmup_steps: steps of linear warm-up from 0 to `coef`.
        anchor_every: an anchor term is due every this many optimizer steps (once per due step).
        n_anchors: anchor prompts in the set (the cursor wraps around them); 0 without anchors.
    """

    def __init__(self, coef: float, warmup_steps: int, anchor_every: int = 1, n_anchors: int = 0) -> None:
        self.coef = coef
        self.warmup_steps = warmup_steps
        self.anchor_every = anchor_every
        self.n_anchors = n_anchors
        self.step = 0
        self.anchor_cursor = 0
        self._anchor_done_at: int | None = None

    def current_coef(self) -> float:
        return coef_at(self.step, self.coef, self.warmup_steps)

    def advance(self) -> None:
        """One optimizer step done."""
        self.step += 1

    def anchor_due(self) -> bool:
        """Whether this step takes an anchor term that has not been taken yet."""
        return self.step % self.anchor_every == 0 and self._anchor_done_at != self.step

    def take_anchors(self, indices: list[int]) -> None:
        """Mark this step's anchor term as taken, on the anchors at `indices` (the cursor moves past them)."""
        self._anchor_done_at = self.step
        self.anchor_cursor = (self.anchor_cursor + len(indices)) % max(self.n_anchors, 1)

    def load(self, step: int, anchor_cursor: int) -> None:
        self.step = step
        self.anchor_cursor = anchor_cursor
