"""Where the penalty is evaluated: the two sites of STR's one loss path.

A site turns the last training forward (the tap's capture) into a `SiteTerm`: the values the penalty compares
for the model being trained (safety logits, or for `logprob`/`kl` coarse log-probs), the aligned model's at
the same places, how many places, and an optional weight per place (benign anchors).
`TokenSite` takes the training batch's own positions (sources `adapter`, `model`, `cache`);
`AnchorSite` takes the anchor prompts' decision points (source `anchors`), from a forward of their own
(`separate`) or from the training forward they were folded into (`folded`). None means no term this call
(eval mode, or no anchor term due this step); `STRHandle` does the rest the same way for both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from str_hooks.anchors import AnchorBatch, AnchorSet
from str_hooks.errors import STRAttachError, STRError
from str_hooks.folding import FoldedAnchors, fold_anchors, fold_in_front
from str_hooks.penalty import COARSE_FORMS, form_values, penalty_positions, reference_safety_mass
from str_hooks.projection import HeadRows
from str_hooks.reference import ReferenceSource
from str_hooks.schedule import StepSchedule
from str_hooks.schemas.config import STRConfig
from str_hooks.screen import RowScreen
from str_hooks.tap import ModelTap, Sink


class SiteTerm(NamedTuple):
    """What the penalty compares: policy and reference values [..., C] (C = k, or k + 1 for the coarse
    forms), the number of places they count at, per-place weights, and for the training batch's positions
    a [B, T] mask of the penalized ones (a mask, not a selection: shapes stay static, no host sync)."""

    policy: torch.Tensor
    reference: torch.Tensor
    n_places: float | torch.Tensor
    row_weights: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    # The positions checked for NaN/inf when a gate (`penalty.min_reference_mass`) left some out of `mask`:
    # a non-finite policy must not go unreported because the reference gated its positions away.
    candidates: torch.Tensor | None = None
    # With `reference.screen_mass`: the share of the batch's rows the reference forward ran on (0-dim).
    referenced: torch.Tensor | None = None


class TokenSite:
    """The training batch's positions (`penalty.positions`) against a reference source."""

    def __init__(self, config: STRConfig, reference: ReferenceSource, rows: HeadRows) -> None:
        self.config = config
        self.reference = reference
        self.rows = rows  # the safety ids, copied to each device once (`HeadRows.ids_on`)
        # The safety tokens' count: the first k columns of either coarse form's values are their log-probs.
        self.k = int(rows.ids_on(torch.device("cpu")).numel())
        screen_mass = config.reference.screen_mass
        self.screen = (
            # Seeded from the run's seed (read, not drawn: the run's random streams stay as they were).
            RowScreen(screen_mass, config.reference.audit_share, seed=torch.initial_seed())
            if screen_mass is not None
            else None
        )

    def term(self, sink: Sink, labels: torch.Tensor | None) -> SiteTerm | None:
        if sink.safety_logits is None:
            raise STRError(
                "handle.loss() found no forward pass since the last call: run the model on the training batch "
                "first (out = model(...)), then call handle.loss()."
            )
        if not sink.training:
            return None
        form = self.config.penalty.form
        coarse = form if form in COARSE_FORMS else None
        labels = labels if labels is not None else sink.get("labels")
        mask = sink.get("attention_mask")
        batch, width = sink.safety_logits.shape[:2]
        positions = penalty_positions(
            self.config.penalty.positions,
            (batch, width),
            sink.safety_logits.device,
            labels=labels,
            attention_mask=mask if isinstance(mask, torch.Tensor) else None,
            first_n=self.config.penalty.first_n,
            shift_labels=sink.get("shift_labels"),
        )
        if coarse:
            if sink.logits is None or sink.logits.shape[1] != width:
                raise STRAttachError(
                    f"`penalty.form` {self.config.penalty.form!r} needs the full logits of the training forward, "
                    "but it returned none (a fused loss kernel, or logits_to_keep): use form 'mse' or 'hinge', or "
                    "source 'anchors' (which takes the softmax at the anchors' positions only)."
                )
            if self.screen is not None:
                return self._screened(sink, sink.logits, positions, coarse)
            policy = form_values(sink.logits, self.rows.ids_on(sink.logits.device), form, low_memory=True)
        else:
            policy = sink.safety_logits
        reference = self.reference.logits(sink, coarse).to(policy.device)
        found = getattr(self.reference, "found", None)
        if isinstance(found, torch.Tensor):
            # Cached examples missing from the cache: left out here, reported by `check_step()`.
            positions = positions & found.to(positions.device).unsqueeze(1)
        # The normalizer counts the candidates, not the gated ones: a batch whose rows the aligned model would
        # not refuse adds nothing, rather than a mean over the few positions that pass.
        gate = self.config.penalty.min_reference_mass
        if gate is None:
            return SiteTerm(policy, reference, positions.sum(), mask=positions)
        gated = positions & (reference_safety_mass(reference, self.k) >= gate)
        return SiteTerm(policy, reference, positions.sum(), mask=gated, candidates=positions)

    def _screened(self, sink: Sink, logits: torch.Tensor, positions: torch.Tensor, coarse: str) -> SiteTerm:
        """The term with the reference forward on the rows `RowScreen` picks, each weighted by 1 / its
        inclusion probability. The screen already reads the host, so the trained model's values are built
        with gradient at the penalized positions only (a few rows' openings, not a backward through the
        whole [B, T, V] softmax); elsewhere they are detached, and a row left out compares them with
        themselves (no penalty, but a NaN in them is still reported, as `candidates`)."""
        assert self.screen is not None  # the caller checked it
        ids = self.rows.ids_on(logits.device)
        with torch.no_grad():
            values = form_values(logits, ids, coarse, low_memory=True)
        chosen = self.screen.select(values, positions, self.k)
        reference = values.clone()
        if chosen.rows.numel():
            rows = chosen.rows.to(values.device)
            found = self.reference.logits(sink, coarse, rows).to(values.device, reference.dtype)
            reference = reference.index_copy(0, rows, found)
        penalized = positions & chosen.selected.to(positions.device).unsqueeze(1)
        gate = self.config.penalty.min_reference_mass
        if gate is not None:
            penalized = penalized & (reference_safety_mass(reference, self.k) >= gate)
        where = penalized.nonzero(as_tuple=True)  # a second host read, of the few penalized positions
        policy = values.index_put(where, form_values(logits[where], ids, coarse, low_memory=True))
        weights = chosen.weights.to(values.device).unsqueeze(1)
        referenced = chosen.selected.float().mean()
        return SiteTerm(
            policy,
            reference,
            positions.sum(),
            weights,
            penalized,
            candidates=positions,
            referenced=referenced,
        )


class AnchorSite:
    """The anchor prompts' decision points, once per optimizer step where the schedule says one is due."""

    def __init__(self, config: STRConfig, anchors: AnchorSet, tap: ModelTap, schedule: StepSchedule) -> None:
        self.config = config
        self.folded = config.reference.anchor_placement == "folded"
        self.coarse = config.penalty.form if config.penalty.form in COARSE_FORMS else None
        self.anchors = anchors
        self.tap = tap
        self.schedule = schedule
        # The fold of this step's anchors and their batch, set by `prepare`.
        self.pending: tuple[FoldedAnchors, AnchorBatch] | None = None
        # Problems a fold without a host read found in its batch (`folding.PROBLEMS` bits), still on the
        # device: `STRHandle.check_step()` reads them once per optimizer step.
        self.fold_problems: torch.Tensor | None = None

    def prepare(self, batch: Any, extend_labels: bool | None) -> Any:
        """`STRHandle.prepare_batch` for source `anchors` (see there): `batch` with this step's anchors folded
        in when an anchor term is due on a training forward, else `batch` itself."""
        anchors = self.anchors
        if (
            self.config.reference.anchor_placement != "folded"
            or not self.tap.causal_lm.training
            or not self.schedule.anchor_due()
        ):
            return batch
        if not isinstance(batch, dict) and not hasattr(batch, "keys"):
            raise STRError(
                f"`reference.anchor_placement` is 'folded' but the batch is a {type(batch).__name__}: fold needs "
                "a mapping with `input_ids` (like the HF collators return), or set `reference.anchor_placement: "
                "separate`."
            )
        keep_logits = not extend_labels if extend_labels is not None else self.tap.accepts_logits_to_keep
        prepared = anchors.batch(self.schedule.anchor_cursor, self.tap.device())
        ids = batch.get("input_ids") if hasattr(batch, "get") else None
        on_cpu = isinstance(ids, torch.Tensor) and ids.device.type == "cpu"
        into_padding = self.config.reference.fold_into_padding
        if into_padding == "yes" or (into_padding == "auto" and on_cpu):
            folded, where = fold_anchors(
                batch,
                [anchors.encoded[i] for i in prepared.indices],
                prepared.indices,
                pad_token_id=anchors.pad_token_id,
                keep_logits=keep_logits,
                points=prepared.points,
            )
        else:
            # No read of the batch on the host (docs/host_sync.md): anchors in front, checks on the device.
            folded, where = fold_in_front(
                batch,
                list(prepared.encoded),
                prepared.indices,
                pad_token_id=anchors.pad_token_id,
                keep_logits=keep_logits,
                points=prepared.points,
            )
            if where.problems is not None:
                self.fold_problems = where.problems
        if self.config.penalty.form in COARSE_FORMS:
            # The full softmax at the anchors' points only, computed inside the forward (FSDP-safe).
            self.tap.request_points(where.rows, where.cols)
        if self.tap.accepts_use_cache:
            # A KV cache (the config default) turns transformers' packed-sequence detection off.
            folded["use_cache"] = False
        self.schedule.take_anchors(prepared.indices)
        self.pending = (where, prepared)
        return folded

    def take_fold_problems(self) -> torch.Tensor | None:
        """The fold problems flagged since the last call (device bits, or None), cleared."""
        problems, self.fold_problems = self.fold_problems, None
        return problems

    def term(self, sink: Sink) -> SiteTerm | None:
        return self._folded(sink) if self.folded else self._separate()

    @staticmethod
    def _term(policy: torch.Tensor, batch: AnchorBatch) -> SiteTerm:
        # A weighted mean over the points: benign anchors at a small weight leave the harmful ones' strength.
        places = batch.n_points if batch.weights is None else batch.weight_sum
        return SiteTerm(policy, batch.reference, places, batch.weights)

    def _separate(self) -> SiteTerm | None:
        if not self.tap.causal_lm.training or not self.schedule.anchor_due():
            return None
        batch = self.anchors.batch(self.schedule.anchor_cursor, self.tap.device())
        self.schedule.take_anchors(batch.indices)
        return self._term(self.anchors.batch_values(self.tap, batch, self.coarse), batch)

    def _folded(self, sink: Sink) -> SiteTerm | None:
        pending, self.pending = self.pending, None
        if pending is None:
            if self.tap.causal_lm.training and self.schedule.anchor_due():
                raise STRError(
                    "`reference.anchor_placement` is 'folded' and an anchor penalty is due, but this batch was "
                    "not folded: pass each training batch through `batch = handle.prepare_batch(batch)` before "
                    "the forward (the trainer integrations do it for you)."
                )
            return None
        where, batch = pending
        logits = sink.safety_logits
        ids = sink.input_ids()
        other_ids = ids is not None and ids is not where.input_ids and not torch.equal(ids, where.input_ids)
        if logits is None or tuple(logits.shape[:2]) != where.shape or other_ids:
            found = "no forward" if logits is None else f"a forward of shape {tuple(logits.shape[:2])}"
            if logits is not None and other_ids:
                found += " on other input_ids"
            raise STRError(
                f"handle.prepare_batch folded the anchors into a batch of shape {where.shape}, but handle.loss() "
                f"found {found}: run the forward on the batch prepare_batch returned, with all its keys "
                "(model(**batch))."
            )
        if not sink.training:
            return None
        if self.coarse:
            if sink.point_logits is None or sink.point_logits.shape[0] != where.rows.shape[0]:
                raise STRError(
                    "handle.prepare_batch asked the next forward for the full logits at the folded anchors' "
                    "positions, but the forward handle.loss() found did not compute them: run the forward on the "
                    "batch prepare_batch returned, right after it, with no other forward in between."
                )
            policy = form_values(
                sink.point_logits, self.tap.rows.ids_on(sink.point_logits.device), self.coarse
            )
        else:
            policy = logits[where.rows, where.cols]
        return self._term(policy, batch)
