"""Framework-free penalty math: which positions are penalized and how much.

`pen_sum = sum_{t in P} sum_s w_s * phi(z_{t,s} - r_{t,s})` (docs/design.md section 1); the caller divides by the
host's normalizer and multiplies by coef. The forms `logprob` and `kl` compare distributions instead of raw
logits: both read the *coarse* log-probabilities of a position, the k safety tokens' log-softmax values plus one
"everything else" bucket (`coarse_logprobs`, [N, k + 1]), so a task token that gains probability moves them even
where it leaves the safety logits alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from str_hooks.errors import STRConfigError

IGNORE_INDEX = -100


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token label is supervised: `labels[:, t + 1] != -100`, like the causal-LM CE
    (which shifts labels left by one). Shape [B, T], bool; the last position is never supervised."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def penalty_positions(
    mode: str,
    shape: tuple[int, int],
    device: torch.device,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    first_n: int = 1,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [B, T] mask of the positions the penalty is evaluated at.

    Args:
        mode: `supervised`, `all` (non-padding positions) or `first_n` (first n supervised per row).
        shape: (B, T) of the batch.
        labels: [B, T] labels with -100 for unsupervised tokens (needed by `supervised`, `first_n`).
        attention_mask: [B, T], 1 for real tokens (used by `all`; all positions when None).
        first_n: for `first_n`.
        shift_labels: labels already shifted left (as context/sequence-parallel collators pass them); used
            unshifted when `labels` is None.

    Raises:
        STRConfigError: a mode that needs labels got none, or an unknown mode.
    """
    if mode == "all":
        if attention_mask is None:
            return torch.ones(shape, dtype=torch.bool, device=device)
        return attention_mask.to(device=device).bool()
    if mode not in ("supervised", "first_n"):
        raise STRConfigError(
            f"`penalty.positions` {mode!r} is unknown: use 'supervised', 'all' or 'first_n'."
        )
    if labels is None and shift_labels is not None:
        mask = shift_labels.to(device) != IGNORE_INDEX
        return mask & (torch.cumsum(mask.long(), dim=1) <= first_n) if mode == "first_n" else mask
    if labels is None:
        raise STRConfigError(
            f"`penalty.positions` is {mode!r}, which needs labels, but the forward got none: pass `labels=` to "
            "the model (or `handle.loss(labels=...)`), or use positions 'all'."
        )
    mask = supervised_mask(labels.to(device))
    if mode == "first_n":
        mask = mask & (torch.cumsum(mask.long(), dim=1) <= first_n)
    return mask


COARSE_FORMS = ("logprob", "kl")


def coarse_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, low_memory: bool = False) -> torch.Tensor:
    """[..., V] logits -> [..., k + 1] float32: log-softmax over the whole vocabulary at the k safety ids, then
    the log of the probability mass of every other token.

    Exact (a log-sum-exp over the other tokens, one more [..., V] tensor) by default, which the few anchor
    positions afford; `low_memory` (every training position) takes `log(1 - sum_s p_s)` as a log1mexp of the
    safety tokens' log-mass instead, exact down to a rest mass of about 1e-7 (fp32 resolution), where it is
    clamped.
    """
    full = logits.float()
    ids = token_ids.to(full.device)
    total = torch.logsumexp(full, dim=-1, keepdim=True)
    safety = full.index_select(-1, ids) - total
    if not low_memory:
        rest = torch.logsumexp(full.index_fill(-1, ids, float("-inf")), dim=-1, keepdim=True) - total
        return torch.cat([safety, rest], dim=-1)
    mass = torch.logsumexp(safety, dim=-1, keepdim=True).clamp(max=-1e-7)
    # log(1 - e^x), accurate on both sides of x = -log 2.
    rest = torch.where(mass > -0.6931, torch.log(-torch.expm1(mass)), torch.log1p(-torch.exp(mass)))
    return torch.cat([safety, rest], dim=-1)


def form_values(
    logits: torch.Tensor, token_ids: torch.Tensor, form: str, low_memory: bool = False
) -> torch.Tensor:
    """What form `logprob` or `kl` compares, from full-vocabulary logits [..., V]: the safety tokens'
    log-probs [..., k] (`logprob`) or the coarse log-probs with the rest bucket [..., k + 1] (`kl`;
    `low_memory` as for `coarse_logprobs`)."""
    if form == "kl":
        return coarse_logprobs(logits, token_ids, low_memory=low_memory)
    full = logits.float()
    return full.index_select(-1, token_ids.to(full.device)) - torch.logsumexp(full, dim=-1, keepdim=True)


def reference_safety_mass(values: torch.Tensor, k: int) -> torch.Tensor:
    """The probability the safety tokens hold together, [...], from the values forms `kl` ([..., k + 1]) and
    `logprob` ([..., k]) compare: their first k columns are log-softmax values."""
    return torch.logsumexp(values[..., :k].float(), dim=-1).exp()


def penalty_terms(diff: torch.Tensor, form: str, margin: float = 0.0) -> torch.Tensor:
    """phi(d) elementwise. `mse` and `logprob`: d^2. `hinge`: relu(-(d + margin))^2."""
    if form in ("mse", "logprob"):
        return diff.square()
    if form == "hinge":
        return torch.relu(-(diff + margin)).square()
    raise STRConfigError(f"`penalty.form` {form!r} is unknown: use 'mse', 'hinge', 'logprob' or 'kl'.")


def penalty_rows(
    policy: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor, form: str, margin: float = 0.0
) -> torch.Tensor:
    """The penalty of each row, [N] float32.

    `mse`, `hinge`: `sum_s w_s phi(z_s - r_s)` on [N, k] safety logits. `logprob`: the same with phi = d^2 on
    the first k columns of [N, k + 1] coarse log-probs. `kl`: KL(reference || policy) between the coarse
    distributions, `sum_b p_b (log p_b - log q_b)` over the k + 1 buckets (the token weights do not apply:
    the reference probabilities weight the buckets).
    """
    if form == "kl":
        ref = reference.float()
        # A bucket the reference gives probability 0 (log-prob -inf) contributes 0, not 0 * inf.
        terms = torch.where(torch.isneginf(ref), 0.0, ref.exp() * (ref - policy.float()))
        return terms.sum(dim=-1)
    k = weights.shape[0]
    diff = policy[..., :k].float() - reference[..., :k].float()
    return (penalty_terms(diff, form, margin) * weights.float()).sum(dim=-1)


def weighted_penalty_sum(
    policy: torch.Tensor,
    reference: torch.Tensor,
    weights: torch.Tensor,
    form: str,
    margin: float = 0.0,
    row_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sum_t v_t penalty_rows(...)_t` over the rows t (every leading index: [N] or [B, T]) where `mask` is
    True (all without a mask), v_t = 1 without `row_weights`; a 0-dim float32 tensor. A mask instead of
    selecting the rows keeps the shapes static: no host synchronization (docs/host_sync.md)."""
    rows = penalty_rows(policy, reference, weights, form, margin)
    if row_weights is not None:
        rows = rows * row_weights.to(rows.device, torch.float32)
    if mask is not None:
        rows = torch.where(mask.to(rows.device), rows, 0.0)
    return rows.sum()


class GuardedSum(NamedTuple):
    """`guarded_penalty_sum`'s result: the sum, the values it compared (non-finite entries replaced) and
    whether the term was finite (a 0-dim bool tensor)."""

    pen_sum: torch.Tensor
    policy: torch.Tensor
    reference: torch.Tensor
    finite: torch.Tensor


def guarded_penalty_sum(
    policy: torch.Tensor,
    reference: torch.Tensor,
    weights: torch.Tensor,
    form: str,
    margin: float,
    row_weights: torch.Tensor | None,
    mask: torch.Tensor,
    checked: torch.Tensor | None = None,
) -> GuardedSum:
    """`weighted_penalty_sum` that tolerates NaN/inf: non-finite entries compare equal (zero penalty and zero
    gradient into them) and `finite` says whether any row of `checked` (default: the penalized rows, `mask`)
    had one, so the caller can zero the term on the device instead of reading it on the host
    (docs/host_sync.md)."""
    # A reference log-prob of -inf (probability 0) is a valid `kl` bucket; anything else must be finite.
    reference_ok = torch.isfinite(reference)
    if form == "kl":
        reference_ok = reference_ok | torch.isneginf(reference)
    entries_ok = torch.isfinite(policy) & reference_ok
    reference = torch.where(reference_ok, reference.float(), 0.0)
    safe = torch.where(entries_ok, policy.float(), reference)
    pen_sum = weighted_penalty_sum(safe, reference, weights, form, margin, row_weights=row_weights, mask=mask)
    checked = mask if checked is None else checked
    finite = (entries_ok.all(dim=-1) | ~checked.to(entries_ok.device)).all() & torch.isfinite(pen_sum)
    return GuardedSum(pen_sum, safe, reference, finite)


def coef_at(step: int, coef: float, warmup_steps: int) -> float:
    """Linear warm-up of coef from 0 over `warmup_steps` optimizer steps."""
    if warmup_steps <= 0:
        return coef
    return coef * min(1.0, step / warmup_steps)
