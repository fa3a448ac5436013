"""`STRHandle`: an attached STR hook, which turns each training forward into the penalty term."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from str_hooks.anchors import AnchorSet
from str_hooks.device_index import DeviceCopies
from str_hooks.errors import STRCacheError, STRConfigError, STRError, STRNonFiniteError
from str_hooks.folding import fold_anchors, fold_in_front, problem_error
from str_hooks.penalty import COARSE_FORMS, weighted_penalty_sum
from str_hooks.reference import ReferenceSource
from str_hooks.schedule import StepSchedule
from str_hooks.schemas.config import STRConfig
from str_hooks.sites import AnchorSite, SiteTerm, TokenSite
from str_hooks.tap import ModelTap
from str_hooks.tokens import SafetyTokens

# Marker set on the causal LM while a handle is attached (not a parameter or buffer: never saved).
ATTACHED_ATTR = "_str_hooks_handle"
STATE_VERSION = 1


@dataclass
class Attachment:
    """What `register_str_hook` built for a handle: the hooks (`tap`), the tokens, the reference."""

    config: STRConfig
    tokens: SafetyTokens
    tap: ModelTap
    peft_model: nn.Module | None
    reference: ReferenceSource | None = None
    anchors: AnchorSet | None = None
    cache_identity: dict[str, Any] | None = None
    projection_verified: bool | None = None


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
        # Non-finite micro-batches not yet read by the host (a device tensor: counted without a sync).
        self._nonfinite: torch.Tensor | None = None
        # Problems a fold without a host read found in its batch (`folding.PROBLEMS` bits), read by
        # `check_step()`, and the step it last ran at.
        self._fold_problems: torch.Tensor | None = None
        self._checked_at = -1
        self.schedule = StepSchedule(
            self.config.coef,
            self.config.warmup_steps,
            self.config.reference.anchor_every,
            len(self.anchors) if self.anchors is not None else 0,
        )
        self.site: TokenSite | AnchorSite
        if self.anchors is not None:
            self.site = AnchorSite(self.config, self.anchors, self.tap, self.schedule)
        else:
            assert self.reference is not None  # every source but anchors has one
            self.site = TokenSite(self.config, self.reference, self.tap.rows)
        self._loss_calls = 0
        self._skipped = 0
        self._last: dict[str, Any] = {}
        self._warned_no_step = False
        self._warned_eval_mode = False
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
        problems, self._fold_problems = self._fold_problems, None
        missing = self.reference.missing() if self.reference is not None else 0
        nonfinite = self._read_nonfinite()
        if problems is not None and int(problems):
            raise problem_error(int(problems))
        if missing:
            assert self.reference is not None
            raise STRCacheError(
                f"{missing} example(s) of this optimizer step are not in the reference cache ("
                f"{self.reference.describe()}): the cache was built over other data or another tokenization; "
                "rebuild it over this training set with `str-hooks cache`."
            )
        self._account_nonfinite(nonfinite)
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
        anchors = self.anchors
        if (
            anchors is None
            or self.config.reference.anchor_placement != "folded"
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
        cursor = self.schedule.anchor_cursor
        prepared = anchors.batch(cursor, self.tap.device())
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
                self._fold_problems = where.problems
        if self.config.penalty.form in COARSE_FORMS:
            # The full softmax at the anchors' points only, computed inside the forward (FSDP-safe).
            self.tap.request_points(where.rows, where.cols)
        if self.tap.accepts_use_cache:
            # A KV cache (the config default) turns transformers' packed-sequence detection off.
            folded["use_cache"] = False
        self.schedule.take_anchors(prepared.indices)
        assert isinstance(self.site, AnchorSite)
        self.site.pending = (where, prepared)
        return folded

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
        term = self._loss(num_items_in_batch, labels)
        if self.anchors is None and num_items_in_batch is None and accumulation_steps != 1:
            term = term / accumulation_steps
        return term

    def _loss(
        self, num_items_in_batch: int | torch.Tensor | None, labels: torch.Tensor | None
    ) -> torch.Tensor:
        if not self._attached:
            raise STRError("this STR handle was removed; register a new one with register_str_hook.")
        self._loss_calls += 1
        self._check_step_calls()
        self._last = {}  # metrics() describe only a term this call computed
        sink = self.tap.take()
        self._check_training_mode(sink)
        term = self.site.term(sink) if isinstance(self.site, AnchorSite) else self.site.term(sink, labels)
        if term is None:
            device = sink.safety_logits.device if sink.safety_logits is not None else self.tap.device()
            return torch.zeros((), device=device)
        # The anchor term is a mean over the anchor points: the host's normalizer does not apply to it.
        return self._finish(term, None if self.anchors is not None else num_items_in_batch)

    def _finish(self, term: SiteTerm, num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
        # Tensor math only, no host synchronization (docs/host_sync.md): the positions are a mask, the
        # normalizer stays a tensor, and a non-finite term is zeroed here and counted on the device;
        # `check_step()` (before the optimizer step, or in `step()`) reads the count once per step.
        policy, reference, n_places, mask = term.policy, term.reference, term.n_places, term.mask
        if mask is None:
            mask = torch.ones(policy.shape[:-1], dtype=torch.bool, device=policy.device)
        form = self.config.penalty.form
        # A reference log-prob of -inf (probability 0) is a valid `kl` bucket; anything else must be finite.
        reference_ok = torch.isfinite(reference)
        if form == "kl":
            reference_ok = reference_ok | torch.isneginf(reference)
        entries_ok = torch.isfinite(policy) & reference_ok
        reference = torch.where(reference_ok, reference.float(), 0.0)
        # Non-finite entries compare equal (zero penalty, zero gradient into them).
        safe = torch.where(entries_ok, policy.float(), reference)
        pen_sum = weighted_penalty_sum(
            safe,
            reference,
            self._weights.on(policy.device),
            form,
            self.config.penalty.margin,
            row_weights=term.row_weights,
            mask=mask,
        )
        finite = (entries_ok.all(dim=-1) | ~mask).all() & torch.isfinite(pen_sum)
        count = n_places.clamp_min(1) if isinstance(n_places, torch.Tensor) else (n_places or 1)
        normalizer = count if num_items_in_batch is None else num_items_in_batch
        if isinstance(normalizer, torch.Tensor):
            normalizer = normalizer.to(pen_sum.device)
        value = torch.where(finite, self.current_coef() * pen_sum / normalizer, 0.0)
        skipped = (~finite).to(torch.int64)
        self._nonfinite = (
            skipped if self._nonfinite is None else self._nonfinite + skipped.to(self._nonfinite.device)
        )
        with torch.no_grad():
            # Per safety token: logits or log-probs (for `kl` the last column, the rest bucket, is left out).
            k = self.tokens.k
            drift = safe.detach()[..., :k] - reference[..., :k]
            drift = torch.where(mask.unsqueeze(-1) & torch.isfinite(drift), drift, 0.0)
            drift = torch.where(finite, drift.reshape(-1, k), 0.0)
            self._last = {
                "penalty": value.detach(),
                "pen_mean": pen_sum.detach() / count,
                "drift_sum": drift.sum(dim=0),
                "abs_drift_sum": drift.abs().sum(dim=0),
                "count": torch.where(finite, n_places, 0) if isinstance(n_places, torch.Tensor) else n_places,
                "finite": finite,
            }
        return value

    def _read_nonfinite(self) -> int:
        """Non-finite micro-batches since the last read (a host read: once per optimizer step at most)."""
        if self._nonfinite is None:
            return 0
        count, self._nonfinite = int(self._nonfinite), None
        return count

    def _account_nonfinite(self, count: int) -> None:
        if not count:
            return
        message = (
            f"NaN/inf in the STR penalty of {count} micro-batch(es) (the model's hidden states, head or logits are "
            "not finite; check the learning rate and precision)."
        )
        self._skipped += count
        if self.config.penalty.on_nonfinite == "raise":
            raise STRNonFiniteError(
                message
                + " Their STR term was 0. Set `penalty.on_nonfinite: skip` to skip such steps instead."
            )
        warnings.warn(
            message + " Their STR term was 0; the trainer integrations skip this optimizer step.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _check_training_mode(self, sink: Any) -> None:
        """A forward that builds a graph while the causal LM is in eval mode is almost always a training
        step whose model was never put in training mode (`from_pretrained` returns an eval-mode model, and
        `get_peft_model` wraps it in a module that reports `training=True`): the penalty is 0 in eval mode,
        so say so once instead of training without STR."""
        if self._warned_eval_mode or sink.safety_logits is None or sink.training or not sink.grad_enabled:
            return
        self._warned_eval_mode = True
        warnings.warn(
            f"handle.loss() saw a forward with gradients enabled while {type(self.tap.causal_lm).__name__} "
            "is in eval mode, so the STR penalty is 0 for it (the penalty applies in training mode only). "
            "If this is a training step, call model.train() first (`from_pretrained` returns a model in eval "
            "mode, and a PEFT wrapper reports training=True while its modules stay in eval mode); if it is an "
            "evaluation, run it under torch.no_grad().",
            RuntimeWarning,
            stacklevel=3,
        )

    def _check_step_calls(self) -> None:
        needs_steps = self.config.warmup_steps > 0 or (
            self.anchors is not None and self.config.reference.anchor_every > 1
        )
        if needs_steps and self.schedule.step == 0 and self._loss_calls > 1000 and not self._warned_no_step:
            self._warned_no_step = True
            warnings.warn(
                "handle.loss() was called 1000 times but handle.step() never: coef warm-up and the anchor "
                "interval count optimizer steps; call handle.step() after each optimizer.step().",
                RuntimeWarning,
                stacklevel=3,
            )

    def step_metrics(self) -> dict[str, torch.Tensor]:
        """The last `loss()` call's metrics as 0-dim device tensors, without a host read (what the trainer
        integrations accumulate): `penalty`, `computed` (1 for a finite term, 0 for a non-finite one), `drift`,
        `abs_drift` and `drift/<token>` for the top-weighted tokens (0 for a non-finite term). Empty when that
        call computed no term (eval mode, no anchor step due)."""
        if not self._last:
            return {}
        last = self._last
        count = last["count"]
        count = count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1)
        per_token = last["drift_sum"] / count
        out = {
            "penalty": last["penalty"],
            "computed": last["finite"].float(),
            "drift": per_token.sum() / self.tokens.k,
            "abs_drift": last["abs_drift_sum"].sum() / (count * self.tokens.k),
        }
        names = self.tokens.readable_names
        for i in self._top_tokens:
            out[f"drift/{names[i]}"] = per_token[i]
        return out

    @property
    def _top_tokens(self) -> list[int]:
        order = sorted(range(self.tokens.k), key=lambda i: -self.tokens.weights[i])
        return order[: self.config.logging.top_tokens]

    @property
    def term_computed(self) -> bool:
        """Whether the last `loss()` call computed a term (False in eval mode or when no anchor step was due;
        a non-finite term counts as computed here: it is zeroed on the device, see `step_metrics`)."""
        return bool(self._last)

    def metrics(self) -> dict[str, float]:
        """Plain floats from the last `loss()` call (a host read): `penalty` (the added term), `pen_mean`
        (penalty per position before coef), `drift` (mean z - r), `abs_drift` (mean |z - r|), `drift/<token>`
        for the top-weighted tokens (named as they read: `drift/Sorry`, not the tokenizer's `ĠSorry`), `coef`,
        `positions`, `skipped`, `step`. Only `coef`, `skipped` and `step` when that call computed no term
        (eval mode, no anchor step due, a skipped non-finite micro-batch). Non-finite micro-batches not yet
        reported are counted in `skipped` here, with a warning (or `STRNonFiniteError` under
        `on_nonfinite: raise`)."""
        self._account_nonfinite(self._read_nonfinite())
        out: dict[str, float] = {
            "coef": float(self.current_coef()),
            "skipped": float(self._skipped),
            "step": float(self.schedule.step),
        }
        if not self._last or not bool(self._last["finite"]):
            return out
        tensors = self.step_metrics()
        out["penalty"] = float(tensors["penalty"])
        out["pen_mean"] = float(self._last["pen_mean"])
        out["positions"] = float(self._last["count"])
        for key, value in tensors.items():
            if key != "computed" and key != "penalty":
                out[key] = float(value)
        return out

    # -- lifecycle -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Resumable state: step (warm-up, anchor schedule), anchor position, tokens, config, cache identity."""
        return {
            "version": STATE_VERSION,
            "step": self.schedule.step,
            "anchor_cursor": self.schedule.anchor_cursor,
            "skipped": self._skipped,
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
        self._skipped = int(state.get("skipped", 0))

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
        self._last = {}

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


__all__ = ["ATTACHED_ATTR", "STATE_VERSION", "Attachment", "STRHandle"]
