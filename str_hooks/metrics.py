"""`PenaltyMetrics`: what an `STRHandle` reports about its terms (the last term's metrics, as device tensors
or plain floats) and the count of non-finite micro-batches, kept on the device until a step reads it."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from str_hooks.errors import STRNonFiniteError
from str_hooks.schemas.config import STRConfig
from str_hooks.tokens import SafetyTokens


class PenaltyMetrics:
    """The last penalty term's metrics and the non-finite accounting of one handle.

    Args:
        config: the handle's config, read when used (`logging.top_tokens`, `penalty.on_nonfinite`).
        tokens: the safety tokens (the per-token drift is keyed by their `readable_names`).
        prefix: put in front of every key (`rows/` for the rows' term beside the anchors' one).
    """

    def __init__(self, config: STRConfig, tokens: SafetyTokens, prefix: str = "") -> None:
        self.config = config
        self.prefix = prefix
        self.k = tokens.k
        # Tokens are frozen, so their keys are built once, highest weight first (ties keep the tokens'
        # order: `sorted` is stable); `logging.top_tokens` says how many are logged.
        names = tokens.readable_names
        order = sorted(range(self.k), key=lambda i: -tokens.weights[i])
        self.ranked_keys = [(i, f"{prefix}drift/{names[i]}") for i in order]
        # Non-finite micro-batches counted since the last host read, and all that were reported (resumable).
        self.skipped = 0
        self._nonfinite: torch.Tensor | None = None
        self._last: dict[str, Any] = {}

    @property
    def computed(self) -> bool:
        """Whether the last `loss()` call recorded a term (a non-finite one included)."""
        return bool(self._last)

    def clear(self) -> None:
        """Forget the last term: metrics describe only a term the latest `loss()` call computed."""
        self._last = {}

    def record(
        self,
        value: torch.Tensor,
        pen_sum: torch.Tensor,
        n_places: float | torch.Tensor,
        count: float | torch.Tensor,
        policy: torch.Tensor,
        reference: torch.Tensor,
        mask: torch.Tensor,
        finite: torch.Tensor,
        gated_places: torch.Tensor | None = None,
        referenced: torch.Tensor | None = None,
    ) -> None:
        """Keep a term's metrics as device tensors (no host read); `count_nonfinite` counts the micro-batch.

        `policy` and `reference` are the compared values with non-finite entries already replaced, `count`
        the places clamped to at least 1, `finite` a 0-dim bool tensor, `gated_places` the positions a gate
        (`penalty.min_reference_mass`) let through: the drift is then a mean over them, and their share of
        the candidates is reported as `gated`; `referenced` is the share of rows a screened reference forward
        ran on (`reference.screen_mass`)."""
        with torch.no_grad():
            # Per safety token: logits or log-probs (for `kl` the last column, the rest bucket, is left out).
            k = self.k
            drift = policy.detach()[..., :k] - reference[..., :k]
            drift = torch.where(mask.unsqueeze(-1) & torch.isfinite(drift), drift, 0.0)
            drift = torch.where(finite, drift.reshape(-1, k), 0.0)
            self._last = {
                "penalty": value.detach(),
                "pen_mean": pen_sum.detach() / count,
                "drift_sum": drift.sum(dim=0),
                "abs_drift_sum": drift.abs().sum(dim=0),
                "count": torch.where(finite, n_places, 0) if isinstance(n_places, torch.Tensor) else n_places,
                "drift_count": count if gated_places is None else gated_places,
                "finite": finite,
            }
            if gated_places is not None:
                self._last["gated"] = gated_places.float() / count
            if referenced is not None:
                self._last["referenced"] = referenced.detach()

    def count_nonfinite(self, finite: torch.Tensor) -> None:
        """Count one micro-batch when `finite` (a 0-dim bool tensor) is False, on the device."""
        skipped = (~finite).to(torch.int64)
        self._nonfinite = (
            skipped if self._nonfinite is None else self._nonfinite + skipped.to(self._nonfinite.device)
        )

    def read_nonfinite(self) -> int:
        """Non-finite micro-batches since the last read (a host read: once per optimizer step at most)."""
        if self._nonfinite is None:
            return 0
        count, self._nonfinite = int(self._nonfinite), None
        return count

    def account_nonfinite(self, count: int) -> None:
        """Add `count` to `skipped` and raise or warn once for them. Call it straight from the public method
        the user called: the warning points two frames up, at the user's line."""
        if not count:
            return
        message = (
            f"NaN/inf in the STR penalty of {count} micro-batch(es) (the model's hidden states, head or logits are "
            "not finite; check the learning rate and precision)."
        )
        self.skipped += count
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

    def step_tensors(self) -> dict[str, torch.Tensor]:
        """`STRHandle.step_metrics()`: the last term's metrics as 0-dim device tensors; empty without one."""
        if not self._last:
            return {}
        last = self._last
        count = last["drift_count"]
        count = count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1)
        per_token = last["drift_sum"] / count
        prefix = self.prefix
        out = {
            f"{prefix}penalty": last["penalty"],
            f"{prefix}computed": last["finite"].float(),
            f"{prefix}drift": per_token.sum() / self.k,
            f"{prefix}abs_drift": last["abs_drift_sum"].sum() / (count * self.k),
        }
        for i, key in self.ranked_keys[: self.config.logging.top_tokens]:
            out[key] = per_token[i]
        for name in ("gated", "referenced"):
            if name in last:
                out[f"{prefix}{name}"] = last[name]
        return out

    def floats(self, coef: float, step: int) -> dict[str, float]:
        """`STRHandle.metrics()` after its accounting: plain floats (a host read)."""
        out: dict[str, float] = {"coef": float(coef), "skipped": float(self.skipped), "step": float(step)}
        return {**out, **self.term_floats()} if not self.prefix else self.term_floats()

    def term_floats(self) -> dict[str, float]:
        """The last term's metrics as plain floats (a host read); empty without a finite term."""
        if not self._last or not bool(self._last["finite"]):
            return {}
        prefix = self.prefix
        out = {key: float(value) for key, value in self.step_tensors().items() if key != f"{prefix}computed"}
        out[f"{prefix}pen_mean"] = float(self._last["pen_mean"])
        out[f"{prefix}positions"] = float(self._last["count"])
        return out


__all__ = ["PenaltyMetrics"]
