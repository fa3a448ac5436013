"""`StepDriver`: the per-step contract every trainer adapter needs, written once, framework-free.

An adapter maps its host's events onto five calls and holds no schedule, scaling, metrics or probe logic:

- `prepare_batch(batch)` before each training forward (folds this step's anchors in when due; `prepare_call`
  does it for a step function's arguments, and `add_to_output` adds `penalty` to what the step returns);
- `penalty(normalization)` after it: the term to add to the host's loss, scaled the way the host scales
  its own loss (`HostNormalization`, read from the host's flags by the adapter);
- `before_optimizer_step(optimizer)` once per optimizer step, before it: the one host read of the step's
  flags (bad folded batches, cache misses, non-finite terms), raising or dropping the step's gradients;
- `end_step(model)` once per optimizer step, after it: advances the handle's schedule, closes the step's
  metrics and runs the refusal probe when due;
- `log_metrics()` when the host logs: the means over the optimizer steps since the last call, one key set
  for every host (`STEP_KEYS`, plus `drift/<token>` and `refusal_rate` when the probe ran).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from str_hooks.errors import STRConfigError, STRError
from str_hooks.handle import STRHandle
from str_hooks.probe import ProbeRunner
from str_hooks.schemas.config import STRConfig

# Logged for every optimizer step by every host: the STR term in that step's loss (as the host scales it),
# the coefficient, the mean drift of the safety logits (z - r and |z - r|) over the micro-batches that
# computed a term, and the count of skipped non-finite micro-batches so far.
STEP_KEYS = ("penalty", "coef", "drift", "abs_drift", "skipped")


@dataclass(frozen=True)
class HostNormalization:
    """How the host turns a micro-batch's loss into the optimizer step's gradient, so that the penalty is
    normalized exactly like the host's cross-entropy (docs/design.md section 3).

    Args:
        num_items_in_batch: the host's cross-entropy normalizer over the whole optimizer step (the HF
            Trainer's count of supervised tokens), when its CE is `token_sum / num_items_in_batch`; None
            when its CE is a per-micro-batch mean.
        accumulation_steps: micro-batches per optimizer step.
        host_divides_by: what the host divides the returned loss by before backward (the accumulation
            steps for Lightning and for the HF Trainer when its loss is a per-micro-batch mean; 1 when the
            loss is already normalized over the step).
        token_scale: a factor the host applied to its token-normalized CE (the HF Trainer's
            `num_processes` under `average_tokens_across_devices`, undoing DDP's gradient averaging);
            applied to token-position terms only, not to the anchors' per-step mean.
    """

    num_items_in_batch: int | torch.Tensor | None = None
    accumulation_steps: int = 1
    host_divides_by: int = 1
    token_scale: int = 1

    @classmethod
    def of_host(
        cls,
        accumulation_steps: int,
        *,
        divides_by_accumulation: bool,
        num_items_in_batch: int | torch.Tensor | None = None,
        token_scale: int = 1,
    ) -> HostNormalization:
        """From what an adapter reads off its host: whether the host divides the returned loss by the
        accumulation steps (its CE is a per-micro-batch mean; `num_items_in_batch` is then not used), else
        whether its CE is normalized by the step's token count (`num_items_in_batch` given) or already a
        mean over the step."""
        if divides_by_accumulation:
            return cls(accumulation_steps=accumulation_steps, host_divides_by=accumulation_steps)
        if num_items_in_batch is not None:
            return cls(num_items_in_batch, accumulation_steps, token_scale=token_scale)
        return cls(accumulation_steps=accumulation_steps)


def build_probe(config: STRConfig, tokenizer: Any, owner: str) -> ProbeRunner | None:
    """The refusal probe `probe.every` asks for (None when off); the same error in every adapter."""
    if config.probe.every <= 0:
        return None
    if tokenizer is None:
        raise STRConfigError(
            f"`probe.every` is {config.probe.every}, but the refusal probe generates text and {owner} has no "
            "tokenizer: pass tokenizer=..., or set `probe.every: 0`."
        )
    return ProbeRunner(config.probe, tokenizer)


class StepDriver:
    """Drives one attached `STRHandle` through a host's training loop (see the module docstring).

    Args:
        handle: the attached handle.
        probe: the refusal probe to run every `probe.every` optimizer steps (`build_probe`), or None.
    """

    def __init__(self, handle: STRHandle, probe: ProbeRunner | None = None) -> None:
        self.handle = handle
        self.probe = probe
        self.prefix = handle.config.logging.prefix
        # Sums and counts over the optimizer steps since the last `log_metrics()` (bounded however rarely
        # the host logs).
        self._window_sums: dict[str, torch.Tensor | float] = {}
        self._window_counts: dict[str, torch.Tensor | float] = {}
        self._reset_step()

    # -- per micro-batch -------------------------------------------------------------------------------
    def prepare_batch(self, batch: Any, *, extend_labels: bool | None = None) -> Any:
        """The batch to run the training forward on (`STRHandle.prepare_batch`)."""
        return self.handle.prepare_batch(batch, extend_labels=extend_labels)

    def prepare_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], owner: str
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments of a step function (`owner`) whose batch is its first positional argument or `batch=`,
        with the batch passed through `prepare_batch` under `reference.anchor_placement: folded` (the step must
        forward the batch's keys as given, `model(**batch)`)."""
        if self.handle.config.reference.anchor_placement != "folded":
            return args, kwargs
        if args:
            return (self.prepare_batch(args[0]), *args[1:]), kwargs
        if "batch" in kwargs:
            return args, {**kwargs, "batch": self.prepare_batch(kwargs["batch"])}
        raise STRError(
            f"`reference.anchor_placement` is 'folded' but {owner} was called without a batch to fold; set "
            "`reference.anchor_placement: separate`."
        )

    def add_to_output(self, output: Any, normalization: HostNormalization, owner: str) -> Any:
        """What a step function (`owner`) returned, the loss or a mapping with a 'loss' tensor, with `penalty()`
        added to the loss (on the loss's device)."""
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, torch.Tensor):
            shape = (
                f"a {type(output).__name__} without a 'loss' tensor" if isinstance(output, Mapping) else None
            )
            raise STRError(
                f"{owner} returned {shape or type(output).__name__}: with STR it must return the loss (a tensor, "
                "or a dict with a 'loss' tensor) so the penalty can be added to it; returning None to skip a batch "
                "is not supported."
            )
        new_loss = loss + self.penalty(normalization).to(loss.device)
        if not isinstance(output, Mapping):
            return new_loss
        updated = copy.copy(output) if isinstance(output, dict) else dict(output)
        updated["loss"] = new_loss
        return updated

    def penalty(self, normalization: HostNormalization, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The STR term for the micro-batch just forwarded, to add to the loss the host returns.

        `STRHandle.loss` gives the term for a loss summed over the step's micro-batches; the host divides
        what it gets by `host_divides_by`, so the term is multiplied by it here (and a token-normalized term
        by `token_scale`). Records whether a term was computed and its metrics.
        """
        handle = self.handle
        anchors, rows = handle.loss_parts(normalization.num_items_in_batch, labels=labels)
        # The anchors' per-step mean is summed over the step like the host's loss: times what it divides by.
        term = anchors * normalization.host_divides_by if anchors is not None else None
        if rows is not None:
            if normalization.num_items_in_batch is not None:
                rows = rows * (normalization.host_divides_by * normalization.token_scale)
            elif normalization.host_divides_by != normalization.accumulation_steps:
                # A per-micro-batch mean: divided by the accumulation steps for a summed loss, then multiplied
                # back by what the host divides by (skipped in the usual case, where the two are equal).
                rows = rows / normalization.accumulation_steps * normalization.host_divides_by
            term = rows if term is None else term + rows.to(term.device)
        assert term is not None  # loss_parts gives at least one part
        # Device tensors only: read on the host when the host logs (docs/host_sync.md).
        divisor = normalization.host_divides_by
        rows_in_step = rows.detach() / divisor if rows is not None and anchors is not None else None
        self._record(handle.step_metrics(), term.detach() / divisor, rows_in_step)
        return term

    @property
    def term_computed(self) -> bool:
        """Whether the last `penalty()` computed a term (False in eval mode or when no anchor step was due;
        a non-finite micro-batch's term is computed as 0 and counted in `skipped`)."""
        return self._last_computed

    # -- per optimizer step ----------------------------------------------------------------------------
    def before_optimizer_step(self, optimizer: Any = None) -> None:
        """Call once per optimizer step, before it: the one host read of what the step's micro-batches flagged
        (`STRHandle.check_step`, which raises for bad folded batches, cache misses and, under
        `on_nonfinite: raise`, non-finite terms). Under `skip`, a step with a non-finite term has its
        gradients dropped (`optimizer`'s parameters get `grad = None`), so the optimizer step changes nothing:
        a non-finite forward can put NaN into every gradient, not only the STR term's."""
        if self.handle.check_step() and optimizer is not None:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None

    def end_step(self, model: Any = None) -> None:
        """Call once after each optimizer step: advances the coef warm-up and the anchor schedule, adds the
        step's metrics to the logging window (as device tensors: nothing is read on the host here) and runs
        the refusal probe on `model` when due."""
        handle = self.handle
        step: dict[str, torch.Tensor | float] = {
            "penalty": self._penalty,
            "coef": self._coef if self._coef is not None else handle.current_coef(),
        }
        if self._rows_penalty is not None:
            step["rows/penalty"] = self._rows_penalty
        # Drift averaged over the step's micro-batches with a finite term of its own (the anchors' or, under
        # `rows/`, the rows'); none: no drift this step.
        for key, total in self._drift.items():
            step[key] = total / self._computed[_term_prefix(key)].clamp_min(1)
        handle.step()
        if self.probe is not None and model is not None and self.probe.due(handle.step_count):
            step["refusal_rate"] = self.probe.run(model).refusal_rate
        for key, value in step.items():
            present: torch.Tensor | float = 1.0
            if key in self._drift:
                present = (self._computed[_term_prefix(key)] > 0).float()
                value = value * present
            self._window_sums[key] = self._window_sums.get(key, 0.0) + value
            self._window_counts[key] = self._window_counts.get(key, 0.0) + present
        self._reset_step()

    def log_metrics(self) -> dict[str, float]:
        """The means over the optimizer steps since the last call, prefixed (`logging.prefix`): the one host
        read of the metrics. A key present in only some steps (`refusal_rate`, drift of a step that computed
        no finite term) is averaged over those, and `skipped` is the running count of non-finite micro-batches.
        Empty when no step ended since the last call."""
        if not self._window_counts:
            return {}
        means: dict[str, float] = {}
        for key, total in self._window_sums.items():
            count = float(self._window_counts[key])
            if count > 0:
                means[key] = float(total) / count
        means["skipped"] = self.handle.metrics()["skipped"]
        self._window_sums, self._window_counts = {}, {}
        return {f"{self.prefix}{key}": value for key, value in means.items()}

    # -- resume ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.handle.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.handle.load_state_dict(state)

    # -- internals -------------------------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._penalty: torch.Tensor | float = 0.0
        self._coef: float | None = None
        # Per term (`""`, or `rows/` for the rows beside anchors): micro-batches with a finite term this step.
        self._computed: dict[str, torch.Tensor] = {}
        self._drift: dict[str, torch.Tensor] = {}
        self._rows_penalty: torch.Tensor | None = None
        self._last_computed = False

    def _record(
        self, metrics: dict[str, torch.Tensor], term_in_step: torch.Tensor, rows_in_step: torch.Tensor | None
    ) -> None:
        self._penalty = self._penalty + term_in_step
        if rows_in_step is not None:
            self._rows_penalty = (
                rows_in_step if self._rows_penalty is None else self._rows_penalty + rows_in_step
            )
        self._last_computed = bool(metrics)
        for prefix in ("", "rows/"):
            computed = metrics.get(f"{prefix}computed")
            if computed is None:
                continue
            before = self._computed.get(prefix)
            self._computed[prefix] = computed if before is None else before + computed
            self._coef = self.handle.current_coef()
            for key, value in metrics.items():
                name = key[len(prefix) :] if key.startswith(prefix) else None
                if name is not None and (
                    name in ("drift", "abs_drift", "gated", "referenced") or name.startswith("drift/")
                ):
                    self._drift[key] = self._drift.get(key, 0.0) + value


def _term_prefix(key: str) -> str:
    """The term a metric key belongs to: `rows/` for the rows' term beside anchors, else `""`."""
    return "rows/" if key.startswith("rows/") else ""


__all__ = ["STEP_KEYS", "HostNormalization", "StepDriver", "build_probe"]
