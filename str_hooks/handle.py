"""`STRHandle`: an attached STR hook, which turns each training forward into the penalty term."""

from __future__ import annotations

from typing import Any

import torch

from str_hooks.device_index import DeviceCopies
from str_hooks.errors import STRCacheError, STRConfigError, STRError
from str_hooks.folding import problem_error
from str_hooks.metrics import PenaltyMetrics
from str_hooks.parts import Attachment, LossParts
from str_hooks.penalty import guarded_penalty_sum
from str_hooks.schedule import StepSchedule
from str_hooks.sites import AnchorSite, SiteTerm, TokenSite
from str_hooks.tokens import SafetyTokens
from str_hooks.usage import UsageChecks

# Marker set on the causal LM while a handle is attached (not a parameter or buffer: never saved).
ATTACHED_ATTR = "_str_hooks_handle"
STATE_VERSION = 1


class STRHandle:
    """An attached STR hook: builds the penalty from the last training forward.

    Use `loss()` after each training forward, `step()` after each optimizer step, `metrics()` to log,
    `remove()` (or a `with` block) to detach. Create it with `register_str_hook`.
    """

    def __init__(self, parts: Attachment) -> None:
        self.config = parts.config
        self.tokens = parts.tokens
        self.tap = parts.tap
        self.peft_model = parts.peft_model
        self.reference = parts.reference
        self.anchors = parts.anchors
        self.cache_identity = parts.cache_identity
        self.projection_verified = parts.projection_verified
        self._token_ids = torch.tensor(self.tokens.ids, dtype=torch.long)
        self._weights = DeviceCopies(torch.tensor(self.tokens.weights, dtype=torch.float32))
        # The last term's metrics and the non-finite count (on the device until `check_step()` reads it).
        self._metrics = PenaltyMetrics(self.config, self.tokens)
        # The step `check_step()` last ran at: `step()` runs it when nobody did during the step.
        self._checked_at = -1
        self.schedule = StepSchedule(
            self.config.coef,
            self.config.warmup_steps,
            self.config.reference.anchor_every,
            len(self.anchors) if self.anchors is not None else 0,
        )
        # Source `anchors` penalizes the anchors, and with `reference.rows` the training rows too; every other
        # source penalizes the training rows only.
        self.anchor_site = (
            AnchorSite(self.config, self.anchors, self.tap, self.schedule)
            if self.anchors is not None
            else None
        )
        self.token_site = (
            TokenSite(self.config, self.reference, self.tap.rows) if self.reference is not None else None
        )
        # The rows' term beside the anchors' one keeps metrics of its own, under `rows/`.
        self._rows_metrics = (
            PenaltyMetrics(self.config, self.tokens, prefix="rows/")
            if self.anchor_site is not None and self.token_site is not None
            else None
        )
        self._usage = UsageChecks(self.config, self.tap.causal_lm, self.schedule, self.anchors is not None)
        self._attached = True
        setattr(self.tap.causal_lm, ATTACHED_ATTR, self)

    # -- training-time API ---------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimizer steps seen through `step()` (drives warm-up and the anchor interval)."""
        return self.schedule.step

    def current_coef(self) -> float:
        return self.schedule.current_coef()

    def check_step(self) -> int:
        """Read, once per optimizer step, what this step's micro-batches flagged on the device, and act on it
        before the optimizer step changes the weights (the trainer integrations call it there; in a plain
        loop call it before `optimizer.step()`, or let `step()` call it afterwards):

        - folded anchors in a batch the fold could not keep exact (`fold_into_padding: no`): `STRError`;
        - cached examples missing from the reference cache: `STRCacheError`;
        - non-finite STR terms (zeroed on the device): `STRNonFiniteError` under `on_nonfinite: raise`; under
          `skip` a warning and the count, so that the caller can skip the optimizer step (the integrations
          drop its gradients: a non-finite forward can put NaN into every gradient, not only the STR term's).

        Returns:
            The number of micro-batches with a non-finite term (0 when none, always 0 under `raise`).
        """
        self._checked_at = self.schedule.step
        problems = self.anchor_site.take_fold_problems() if self.anchor_site is not None else None
        missing = self.reference.missing() if self.reference is not None else 0
        nonfinite = self._metrics.read_nonfinite()
        if problems is not None and int(problems):
            raise problem_error(int(problems))
        if missing:
            assert self.reference is not None
            raise STRCacheError(
                f"{missing} example(s) of this optimizer step are not in the reference cache ("
                f"{self.reference.describe()}): the cache was built over other data or another tokenization; "
                "rebuild it over this training set with `str-hooks cache`."
            )
        self._metrics.account_nonfinite(nonfinite)
        self._usage.check_refused_rows()
        self._usage.check_task_refusals()
        return nonfinite

    def step(self) -> None:
        """Call once after each optimizer step: advances the coef warm-up and the anchor schedule (and runs
        `check_step()` first when nobody called it during this step)."""
        if self._checked_at != self.schedule.step:
            self.check_step()
        self.schedule.advance()

    def prepare_batch(self, batch: Any, *, extend_labels: bool | None = None) -> Any:
        """Fold this step's anchors into a training batch (`reference.anchor_placement: folded`).

        Call on every training micro-batch, before the forward, and run the forward on what it returns
        (`model(**batch)`): on the first micro-batch of an optimizer step where an anchor penalty is due
        (every `anchor_every` steps) it returns a new batch with the anchor prompts packed in (into the
        rows' trailing padding where they fit, else in front of the rows), and the following `loss()` reads their decision-point logits from that forward. On every
        other call, in eval mode, and for any other source or placement it returns `batch` itself.

        Args:
            batch: a mapping with `input_ids` [B, T], unpadded or right-padded (`attention_mask`),
                optionally `position_ids` (padding-free packing), `labels`, `shift_labels`,
                `token_type_ids`.
            extend_labels: False keeps the labels [B, T] and passes `logits_to_keep` (the rows), so the LM
                head runs on the training positions only; True extends the labels with -100 over the anchor
                prefix instead (for forwards that compute the loss from all hidden states, like TRL's
                fused LM head). None: False when the model's forward accepts `logits_to_keep`.

        Returns:
            The batch to run the forward on.

        Raises:
            STRError: a batch that cannot be folded exactly (left padding, `inputs_embeds`, packed-sample
                attention masks, unknown per-token fields); the message names the fix.
        """
        if not self._attached:
            raise STRError("this STR handle was removed; register a new one with register_str_hook.")
        if self.anchor_site is None:
            return batch
        return self.anchor_site.prepare(batch, extend_labels)

    def loss(
        self,
        num_items_in_batch: int | torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        accumulation_steps: int = 1,
    ) -> torch.Tensor:
        """The penalty term for the last training forward, for every source the same contract: the term to
        add to this micro-batch's share of the optimizer step's loss, i.e. to a loss that is summed over the
        step's micro-batches before the optimizer step. In a plain loop with gradient accumulation:

            loss = out.loss / accumulation_steps + handle.loss(accumulation_steps=accumulation_steps)

        Token sources (`adapter`, `model`, `cache`): `coef * pen_sum / num_items_in_batch` when the
        host's cross-entropy is a token sum over that normalizer (pass the same number: then summing the
        micro-batches gives the step's token mean); otherwise `coef * pen_sum / positions /
        accumulation_steps` (this micro-batch's mean, as `out.loss / accumulation_steps` is).
        Source `anchors`: `coef` times the mean over the anchor batch's points (each anchor's decision point
        and opening; benign anchors' points weighted by `benign_weight`), on the first call of an optimizer
        step where one is due (every `anchor_every` steps) and 0 on the others, so the step's sum holds it
        once; the arguments do not change it.

        Args:
            num_items_in_batch: the host's cross-entropy normalizer over the whole optimizer step (e.g. the
                HF Trainer's count of supervised tokens), or None.
            labels: labels, when the forward was called without them (needed by positions `supervised`
                and `first_n`).
            accumulation_steps: micro-batches per optimizer step (used without `num_items_in_batch`).

        Returns:
            A 0-dim float32 tensor. Zero when the model was in eval mode (with a one-time warning when
            gradients were enabled: a training step on an eval-mode model), or when no anchor term is due.

        Raises:
            STRError: no training forward since the last call (token sources), or the handle was removed.
            STRConfigError: `accumulation_steps` < 1.
            STRNonFiniteError: NaN/inf in the safety logits (when `penalty.on_nonfinite` is 'raise').
        """
        if accumulation_steps < 1:
            raise STRConfigError(
                f"`accumulation_steps` must be >= 1, got {accumulation_steps}: pass the number of micro-batches "
                "per optimizer step (1 without gradient accumulation)."
            )
        parts = self.loss_parts(num_items_in_batch, labels)
        term = parts.anchors
        if parts.rows is not None:
            rows = parts.rows
            if num_items_in_batch is None and accumulation_steps != 1:
                rows = rows / accumulation_steps
            term = rows if term is None else term + rows.to(term.device)
        assert term is not None  # loss_parts gives at least one part
        return term

    def loss_parts(
        self, num_items_in_batch: int | torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> LossParts:
        """`loss()` in its two parts, for hosts that scale them differently (the step driver): the anchors'
        per-step mean (None without anchors) and the training rows' term (None without a row source),
        `coef * pen_sum / num_items_in_batch`, or this micro-batch's mean over its positions without a
        normalizer. A part with nothing to add this call (eval mode, no anchor term due) is a zero tensor."""
        if not self._attached:
            raise STRError("this STR handle was removed; register a new one with register_str_hook.")
        self._usage.loss_called()
        self._metrics.clear()  # metrics() describe only a term this call computed
        if self._rows_metrics is not None:
            self._rows_metrics.clear()
        sink = self.tap.take()
        self._usage.forward_seen(sink)
        if self.config.penalty.min_reference_mass is None:  # the gate's own warning covers gated configs
            self._usage.count_task_refusals(sink, labels, self.tap.rows)
        device = sink.safety_logits.device if sink.safety_logits is not None else self.tap.device()
        anchors = rows = None
        finite: list[torch.Tensor] = []
        # The rows' reference forward runs on the captured batch first, before an anchor forward of its own.
        if self.token_site is not None:
            term = self.token_site.term(sink, labels)
            metrics = self._rows_metrics if self._rows_metrics is not None else self._metrics
            rows = torch.zeros((), device=device)
            if term is not None:
                rows, rows_finite = self._finish(term, num_items_in_batch, metrics)
                finite.append(rows_finite)
                if self.config.penalty.min_reference_mass is not None and term.mask is not None:
                    self._usage.count_refused_rows(term.mask)
        if self.anchor_site is not None:
            term = self.anchor_site.term(sink)
            anchors = torch.zeros((), device=device)
            if term is not None:
                # The anchor term is a mean over the anchor points: the host's normalizer does not apply to it.
                anchors, anchors_finite = self._finish(term, None, self._metrics)
                finite.append(anchors_finite.to(device))
        if finite:
            # One micro-batch counts once, however many of its terms were not finite.
            self._metrics.count_nonfinite(torch.stack(finite).all())
        return LossParts(anchors, rows)

    def _finish(
        self, term: SiteTerm, num_items_in_batch: int | torch.Tensor | None, metrics: PenaltyMetrics
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The term's value (zero when it is not finite), recorded in `metrics`, and whether it was finite."""
        # Tensor math only, no host synchronization (docs/host_sync.md): the positions are a mask, the
        # normalizer stays a tensor, and a non-finite term is zeroed here and counted on the device;
        # `check_step()` (before the optimizer step, or in `step()`) reads the count once per step.
        policy, reference, n_places, mask = term.policy, term.reference, term.n_places, term.mask
        if mask is None:
            mask = torch.ones(policy.shape[:-1], dtype=torch.bool, device=policy.device)
        guarded = guarded_penalty_sum(
            policy,
            reference,
            self._weights.on(policy.device),
            self.config.penalty.form,
            self.config.penalty.margin,
            term.row_weights,
            mask,
            checked=term.candidates,
        )
        pen_sum, finite = guarded.pen_sum, guarded.finite
        count = n_places.clamp_min(1) if isinstance(n_places, torch.Tensor) else (n_places or 1)
        normalizer = count if num_items_in_batch is None else num_items_in_batch
        if isinstance(normalizer, torch.Tensor):
            normalizer = normalizer.to(pen_sum.device)
        value = torch.where(finite, self.current_coef() * pen_sum / normalizer, 0.0)
        # Drift is a mean over the places it was summed at: the gated positions for a gated token term.
        # A gated term's drift is a mean over the gated positions (metrics also report their share).
        gated_places = mask.sum() if term.candidates is not None else None
        metrics.record(
            value,
            pen_sum,
            n_places,
            count,
            guarded.policy,
            guarded.reference,
            mask,
            finite,
            gated_places,
            referenced=term.referenced,
        )
        return value, finite

    def step_metrics(self) -> dict[str, torch.Tensor]:
        """The last `loss()` call's metrics as 0-dim device tensors, without a host read (what the trainer
        integrations accumulate): `penalty`, `computed` (1 for a finite term, 0 for a non-finite one), `drift`,
        `abs_drift` and `drift/<token>` for the top-weighted tokens (0 for a non-finite term). Empty when that
        call computed no term (eval mode, no anchor step due)."""
        out = self._metrics.step_tensors()
        if self._rows_metrics is not None:
            out.update(self._rows_metrics.step_tensors())
        return out

    @property
    def term_computed(self) -> bool:
        """Whether the last `loss()` call computed a term (False in eval mode or when no anchor step was due;
        a non-finite term counts as computed here: it is zeroed on the device, see `step_metrics`)."""
        rows = self._rows_metrics is not None and self._rows_metrics.computed
        return self._metrics.computed or rows

    def metrics(self) -> dict[str, float]:
        """Plain floats from the last `loss()` call (a host read): `penalty` (the added term), `pen_mean`
        (penalty per position before coef), `drift` (mean z - r), `abs_drift` (mean |z - r|), `drift/<token>`
        for the top-weighted tokens (`drift/_Sorry` for the tokenizer's `ĠSorry`, `drift/Sorry` for `Sorry`;
        `SafetyTokens.readable_names` gives the rules), `coef`,
        `positions`, `skipped`, `step`; with `reference.rows` beside anchors, the rows' term's own
        `rows/penalty`, `rows/pen_mean`, `rows/positions` (the candidates the gate chose from), `rows/drift`...
        A gated term also reports `gated` (or `rows/gated`): the share of its candidate positions the gate let
        through. Only `coef`, `skipped` and `step` when that call computed no term
        (eval mode, no anchor step due, a skipped non-finite micro-batch). Non-finite micro-batches not yet
        reported are counted in `skipped` here, with a warning (or `STRNonFiniteError` under
        `on_nonfinite: raise`)."""
        self._metrics.account_nonfinite(self._metrics.read_nonfinite())
        out = self._metrics.floats(self.current_coef(), self.schedule.step)
        if self._rows_metrics is not None:
            out.update(self._rows_metrics.term_floats())
        return out

    # -- lifecycle -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Resumable state: step (warm-up, anchor schedule), anchor position, tokens, config, cache identity."""
        return {
            "version": STATE_VERSION,
            "step": self.schedule.step,
            "anchor_cursor": self.schedule.anchor_cursor,
            "skipped": self._metrics.skipped,
            "tokens": self.tokens.to_dict(),
            "config": self.config.model_dump(mode="json"),
            "cache": self.cache_identity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output. Raises STRError if it belongs to other tokens or another cache."""
        if state.get("version") != STATE_VERSION:
            raise STRError(
                f"STR state version {state.get('version')!r} is not {STATE_VERSION}; cannot resume."
            )
        saved = SafetyTokens.from_dict(state["tokens"], source="the STR checkpoint state")
        if saved.ids != self.tokens.ids:
            raise STRError(
                f"the checkpoint's STR state is for safety tokens {saved.ids[:8]}..., not the attached "
                f"{self.tokens.ids[:8]}...: resume with the same tokens (set `tokens.path` to the saved file)."
            )
        if (state.get("cache") or None) != (self.cache_identity or None):
            raise STRError(
                f"the checkpoint's STR state used reference cache {state.get('cache')}, not {self.cache_identity}: "
                "resume with the same cache."
            )
        self.schedule.load(int(state["step"]), int(state["anchor_cursor"]))
        self._metrics.skipped = int(state.get("skipped", 0))

    def remove(self) -> None:
        """Detach every hook and marker; the model is left exactly as before. Safe to call twice."""
        if not self._attached:
            return
        self.tap.detach()
        if self.reference is not None:
            self.reference.detach()
        if getattr(self.tap.causal_lm, ATTACHED_ATTR, None) is self:
            delattr(self.tap.causal_lm, ATTACHED_ATTR)
        self._attached = False
        self._metrics.clear()
        if self._rows_metrics is not None:
            self._rows_metrics.clear()

    @property
    def uses_anchors(self) -> bool:
        """True for source `anchors`: `loss()` is then a per-optimizer-step mean over the anchor batch,
        added once per step, not a per-token term."""
        return self.anchors is not None

    @property
    def attached(self) -> bool:
        return self._attached

    def __enter__(self) -> STRHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"STRHandle(source={self.config.reference.source!r}, form={self.config.penalty.form!r}, "
            f"k={self.tokens.k}, coef={self.config.coef}, attached={self._attached})"
        )


__all__ = ["ATTACHED_ATTR", "STATE_VERSION", "Attachment", "LossParts", "STRHandle"]
