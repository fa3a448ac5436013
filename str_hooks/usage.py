"""`UsageChecks`: one-time warnings for the ways a training loop silently goes wrong with STR (a model left in
eval mode, `handle.step()` never called, an aligned model that refuses the task itself)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from str_hooks.projection import HeadRows
from str_hooks.schedule import StepSchedule
from str_hooks.schemas.config import STRConfig
from str_hooks.tap import Sink


class RowTally:
    """Refused rows and rows, summed on the device until one host read takes them (`take`); after that it
    counts nothing more, so a check costs one sync per run."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None
        self.taken = False

    def add(self, refused: torch.Tensor, rows: torch.Tensor) -> None:
        counts = torch.stack([refused, rows])
        self.counts = counts if self.counts is None else self.counts + counts

    def take_majority(self) -> tuple[int, int] | None:
        """`(refused, rows)` where at least `REFUSED_ROWS_SHARE` of the counted rows were refused, else None;
        reads the host once and stops the tally."""
        if self.taken or self.counts is None:
            return None
        self.taken = True
        refused, rows = (int(v) for v in self.counts.tolist())
        self.counts = None
        return (refused, rows) if rows and refused >= REFUSED_ROWS_SHARE * rows else None


class UsageChecks:
    """Warns once per handle about a training loop that uses it wrongly; never raises (both cases are legal).

    Call its methods straight from `STRHandle`'s private `_loss`: the warnings name the frame two up.

    Args:
        config: the handle's config, read when used (`warmup_steps`, `reference.anchor_every`).
        causal_lm: the model the hooks are on (named in the eval-mode warning).
        schedule: the handle's step schedule (how many `step()` calls it has seen).
        uses_anchors: source `anchors` (its anchor interval counts optimizer steps).
    """

    def __init__(
        self, config: STRConfig, causal_lm: nn.Module, schedule: StepSchedule, uses_anchors: bool
    ) -> None:
        self.config = config
        self.causal_lm = causal_lm
        self.schedule = schedule
        self.uses_anchors = uses_anchors
        self.loss_calls = 0
        self._warned_no_step = False
        self._warned_eval_mode = False
        # Rows with a gated position, and rows, over the first `REFUSED_ROWS_STEPS` optimizer steps.
        self._refused_rows = RowTally()
        # Rows the model refuses at their first answer token, and rows, in the first optimizer step.
        self._task_refusals = RowTally()

    def loss_called(self) -> None:
        """Count a `loss()` call; after 1000 of them without a `step()` a warm-up or an anchor interval never
        advances, which no error would reveal."""
        self.loss_calls += 1
        needs_steps = self.config.warmup_steps > 0 or (
            self.uses_anchors and self.config.reference.anchor_every > 1
        )
        if needs_steps and self.schedule.step == 0 and self.loss_calls > 1000 and not self._warned_no_step:
            self._warned_no_step = True
            warnings.warn(
                "handle.loss() was called 1000 times but handle.step() never: coef warm-up and the anchor "
                "interval count optimizer steps; call handle.step() after each optimizer.step().",
                RuntimeWarning,
                stacklevel=3,
            )

    def forward_seen(self, sink: Sink) -> None:
        """A forward that builds a graph while the causal LM is in eval mode is almost always a training
        step whose model was never put in training mode (`from_pretrained` returns an eval-mode model, and
        `get_peft_model` wraps it in a module that reports `training=True`): the penalty is 0 in eval mode,
        so say so once instead of training without STR."""
        if self._warned_eval_mode or sink.safety_logits is None or sink.training or not sink.grad_enabled:
            return
        self._warned_eval_mode = True
        warnings.warn(
            f"handle.loss() saw a forward with gradients enabled while {type(self.causal_lm).__name__} "
            "is in eval mode, so the STR penalty is 0 for it (the penalty applies in training mode only). "
            "If this is a training step, call model.train() first (`from_pretrained` returns a model in eval "
            "mode, and a PEFT wrapper reports training=True while its modules stay in eval mode); if it is an "
            "evaluation, run it under torch.no_grad().",
            RuntimeWarning,
            stacklevel=3,
        )

    def count_refused_rows(self, gated: torch.Tensor) -> None:
        """Count the rows of a training batch with a position the gate let through ([B, T] mask; device ops,
        no host read), until `check_refused_rows` has read them."""
        if self._refused_rows.taken:
            return
        with torch.no_grad():
            rows = gated.any(dim=1)
            self._refused_rows.add(rows.sum(), torch.ones_like(rows, dtype=torch.long).sum())

    def check_refused_rows(self) -> None:
        """After the first `REFUSED_ROWS_STEPS` optimizer steps, one host read: warn when the gate let through
        at least `REFUSED_ROWS_SHARE` of the rows. Harmful rows in a user's data are a minority (the field's
        attacks mix 5-20 %); a majority means the aligned model refuses the task itself, which the rows' term
        would then hold, keeping the model from learning it (SST-2 on the project's subject: 88 of 100 rows,
        accuracy 28 % against plain SFT's 88 %, results/harmful_mixing/GATE.md)."""
        if self.schedule.step + 1 < REFUSED_ROWS_STEPS:
            return
        majority = self._refused_rows.take_majority()
        if majority is not None:
            refused, rows = majority
            warnings.warn(
                f"the aligned model would refuse {refused} of the {rows} training rows of the first "
                f"{REFUSED_ROWS_STEPS} optimizer steps (its safety-token probability at their answer positions "
                f"is >= penalty.min_reference_mass = {self.config.penalty.min_reference_mass:g}): the STR term "
                "holds those refusals and will keep the model from learning this task. If the task is benign, the "
                "aligned model over-refuses it: remove `reference.rows` (anchors only) or the gated source, or "
                "raise `penalty.min_reference_mass`; the share is logged as `gated` / `rows/gated`.",
                RuntimeWarning,
                stacklevel=3,
            )

    def count_task_refusals(self, sink: Sink, labels: torch.Tensor | None, safety: HeadRows) -> None:
        """In the first optimizer step only, where the model being trained is still the aligned one (STR's
        premise: fine-tuning starts from it), count the rows whose answer the model would open with a safety
        token (the most likely first token is one, or they carry >= `TASK_REFUSED_MASS`); device ops, no host
        read. Needs the host's logits and the labels (the call's, else the forward's `labels`), aligned with the
        input ids; a forward without them is not counted (fused heads return no logits), nor a row whose own
        answer opens with a safety token (a task that answers "No" is not refused by a model that opens with it)."""
        if self._task_refusals.taken or self.schedule.step > 0 or not sink.training or sink.logits is None:
            return
        labels = labels if labels is not None else sink.kwargs.get("labels")
        logits = sink.logits
        if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
            return  # e.g. anchors folded in front of the rows: the labels no longer line up
        with torch.no_grad():
            labels = labels.to(logits.device)
            supervised = labels != -100
            first = supervised.int().argmax(dim=1)  # the first answer token's index
            rows = torch.arange(logits.shape[0], device=logits.device)
            ids = safety.ids_on(logits.device)
            # A row whose own answer opens with a safety token ("No", "I") is the task's answer, not a refusal.
            counted = supervised.any(dim=1) & (first > 0) & ~torch.isin(labels[rows, first], ids)
            at_opening = logits[rows, (first - 1).clamp(min=0)].float()  # the position that predicts it
            mass = torch.softmax(at_opening, dim=-1)[:, ids].sum(-1)
            # Greedy decoding opens with a safety token where one is the most likely, at any mass (the demo's
            # subject refuses 66 % of its sort prompts with 0.2-0.4 on the safety tokens).
            greedy_opens = torch.isin(at_opening.argmax(dim=-1), ids)
            refused = counted & ((mass >= TASK_REFUSED_MASS) | greedy_opens)
            self._task_refusals.add(refused.sum(), counted.sum())

    def check_task_refusals(self) -> None:
        """At the end of the first optimizer step, one host read: warn when the aligned model would refuse at
        least `REFUSED_ROWS_SHARE` of the task's rows. Every STR source keeps the aligned model's refusals, and
        a row it refused asks fine-tuning for what a harmful row asks (to answer where it refused): the penalty
        cannot tell them apart, so the task's accuracy pays, more with harmful rows in the data (the project's
        subject refuses 95 % of SST-2's prompts: `{}` cost -1.5 / -3.5 / -10.8 points of accuracy at 5 / 10 /
        20 % harmful rows, nothing on AG News, which it answers; results/harmful_mixing)."""
        majority = self._task_refusals.take_majority()
        if majority is not None:
            refused, rows = majority
            warnings.warn(
                f"the aligned model opens {refused} of the {rows} training rows of the first optimizer step with "
                "a safety token (at their first answer token one is the most likely, or they carry >= "
                f"{TASK_REFUSED_MASS:g} of the probability): it refuses this task's prompts. STR keeps its "
                "refusals and cannot tell these rows from harmful ones, so expect the task to learn slower than "
                "plain fine-tuning, more so if the data holds harmful rows. "
                "If the task is benign, the aligned model over-refuses it; measure both (`str-hooks eval` for "
                "refusals, your task's metric against a run without STR) before trusting either.",
                RuntimeWarning,
                stacklevel=3,
            )


# The first optimizer steps whose rows `check_refused_rows` counts, and the share of them that warns.
REFUSED_ROWS_STEPS = 4
REFUSED_ROWS_SHARE = 0.5
# A row's first answer token counts as refused where the model puts this much on the safety tokens (the
# rows gate's default, `penalty.min_reference_mass`).
TASK_REFUSED_MASS = 0.5

__all__ = ["REFUSED_ROWS_SHARE", "REFUSED_ROWS_STEPS", "TASK_REFUSED_MASS", "RowTally", "UsageChecks"]
