"""Hand-written losses and gradient comparisons: the independent computations the tests check against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positions_by_hand(batch: dict[str, torch.Tensor], mode: str, first_n: int) -> torch.Tensor:
    labels, mask = batch["labels"], batch["attention_mask"]
    rows, width = labels.shape
    out = torch.zeros((rows, width), dtype=torch.bool)
    for r in range(rows):
        taken = 0
        for t in range(width):
            if mode == "all":
                out[r, t] = bool(mask[r, t])
            elif t + 1 < width and labels[r, t + 1] != -100 and (mode == "supervised" or taken < first_n):
                out[r, t] = True
                taken += 1
    return out


def penalty_by_hand(
    policy_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    ids: list[int],
    weights: list[float],
    where: torch.Tensor,
    form: str,
    margin: float,
) -> torch.Tensor:
    if form == "kl":
        # KL(reference || policy) over the k safety tokens plus one bucket for every other token.
        p_all, q_all = torch.softmax(reference_logits.float(), -1), torch.softmax(policy_logits.float(), -1)
        total = torch.zeros(())
        for r, t in where.nonzero().tolist():
            p = [p_all[r, t, i] for i in ids] + [1 - sum(p_all[r, t, i] for i in ids)]
            q = [q_all[r, t, i] for i in ids] + [1 - sum(q_all[r, t, i] for i in ids)]
            total = total + sum(a * (torch.log(a) - torch.log(b)) for a, b in zip(p, q, strict=True))
        return total / max(int(where.sum()), 1)
    if form == "logprob":
        policy = torch.log_softmax(policy_logits.float(), dim=-1)[..., ids]
        reference = torch.log_softmax(reference_logits.float(), dim=-1)[..., ids]
    else:
        policy, reference = policy_logits.float()[..., ids], reference_logits.float()[..., ids]
    total = torch.zeros(())
    for r, t in where.nonzero().tolist():
        for j, w in enumerate(weights):
            d = policy[r, t, j] - reference[r, t, j]
            phi = d**2 if form in ("mse", "logprob") else torch.relu(-(d + margin)) ** 2
            total = total + w * phi
    return total / max(int(where.sum()), 1)


def ce_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(
    ours: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    rtol: float = 2e-5,
    atol: float = 1e-7,
    what: str = "",
) -> None:
    """Per tensor: max |ours - theirs| <= rtol * max |theirs| + atol; the same names, and at least one."""
    assert ours.keys() == theirs.keys() and ours, what
    for name in ours:
        scale = theirs[name].abs().max().clamp_min(1e-8)
        err = (ours[name] - theirs[name]).abs().max()
        assert err <= rtol * scale + atol, (
            f"{what} {name}: max error {float(err):.3g} vs scale {float(scale):.3g}"
        )
