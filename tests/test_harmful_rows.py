"""The mechanism DESIGN section 10 rests on, on a tiny model against a hand computation: the coarse KL at
training positions is self-gating.

A tiny Llama is made a "reference" that refuses one prompt (the safety tokens carry its mass at that prompt's
answer opening) and answers another (the safety tokens get ~0 there). A copy of it, fine-tuned a few steps on
a harmful row (the refused prompt with a compliant opening), is the policy. Then, for one row at a time:

- the package's term (`penalty.form: kl` at training positions, reference a frozen copy) equals the coarse KL
  written out by hand (`helpers.losses.penalty_by_hand`), value and gradient;
- at the harmful row's opening its gradient opposes the cross-entropy's (negative cosine): it pulls the
  refusal back exactly where the attack pushes it away;
- at the benign row, where the reference gives the safety tokens ~0, the term and its gradient are ~0
  (orders of magnitude below the harmful row's), so a benign task is not fought.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.factory import make_model
from helpers.losses import assert_grads_close, grads, penalty_by_hand

from str_hooks import SafetyTokens, register_str_hook
from str_hooks.errors import STRError, STRNonFiniteError
from str_hooks.screen import select_rows

SAFETY_IDS = [40, 41, 42, 43]  # stand-ins for "Sorry", "cannot", "I", "As"
COMPLY_ID = 50  # the harmful row's compliant opening ("Sure")
BENIGN_ANSWER_ID = 60
HARMFUL_PROMPT = [1, 101, 102, 103, 104, 105]
BENIGN_PROMPT = [1, 201, 202, 203, 204, 205]


def row(prompt: list[int], answer: int) -> dict[str, torch.Tensor]:
    """One sequence `prompt + [answer]`, only the answer token supervised (the row's opening)."""
    ids = torch.tensor([[*prompt, answer]])
    labels = torch.full_like(ids, -100)
    labels[0, -1] = answer
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def safety_tokens() -> SafetyTokens:
    """The four stand-in safety tokens, equally weighted."""
    return SafetyTokens(
        ids=SAFETY_IDS,
        strings=[f"<t{i}>" for i in SAFETY_IDS],
        weights=[1 / len(SAFETY_IDS)] * len(SAFETY_IDS),
        scores=[1.0] * len(SAFETY_IDS),
        method="list",
    )


def safety_mass(model: torch.nn.Module, prompt: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    return float(torch.softmax(logits.float(), -1)[SAFETY_IDS].sum())


def fit(model: torch.nn.Module, rows: list[dict[str, torch.Tensor]], steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        for batch in rows:
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def flat(named: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([named[name].flatten() for name in sorted(named)])


def build() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(policy, frozen reference): the reference refuses the harmful prompt and answers the benign one; the
    policy is the reference after a few steps on the harmful row with a compliant opening."""
    reference = make_model("llama", seed=0)
    # Aligned: refuse (first safety token) on the harmful prompt, answer the benign one.
    fit(reference, [row(HARMFUL_PROMPT, SAFETY_IDS[0]), row(BENIGN_PROMPT, BENIGN_ANSWER_ID)], 25, 1e-2)
    reference.requires_grad_(False).eval()
    policy = copy.deepcopy(reference).requires_grad_(True)
    # The attack has worked: ten steps of cross-entropy on the harmful row's compliant opening.
    fit(policy, [row(HARMFUL_PROMPT, COMPLY_ID), row(BENIGN_PROMPT, BENIGN_ANSWER_ID)], 10, 1e-2)
    return policy, reference


def term_and_grads(
    policy: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[float, dict[str, torch.Tensor], float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(package term, its grads, hand term, its grads, the cross-entropy's grads) on one row."""
    tokens = safety_tokens()
    config: dict[str, Any] = {
        "coef": 1.0,
        "penalty": {"form": "kl", "positions": "supervised"},
        "reference": {"source": "model"},
    }
    policy.train()
    with register_str_hook(policy, config, tokens=tokens, reference_model=reference) as handle:
        policy(**batch)
        term = handle.loss()
        term.backward()
        ours = grads(policy)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = policy(**inputs).logits
    with torch.no_grad():
        reference_logits = reference(**inputs).logits
    where = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    where[:, :-1] = batch["labels"][:, 1:] != -100
    hand = penalty_by_hand(logits, reference_logits, SAFETY_IDS, [0.25] * 4, where, "kl", 0.0)
    hand.backward()
    theirs = grads(policy)
    logits = policy(**inputs).logits
    F.cross_entropy(logits[0, :-1].float(), batch["labels"][0, 1:], ignore_index=-100).backward()
    ce = grads(policy)
    return float(term.detach()), ours, float(hand.detach()), theirs, ce


def test_coarse_kl_opposes_the_attack_at_a_harmful_opening_and_is_silent_at_a_benign_row() -> None:
    policy, reference = build()
    # The construction is what the test claims it is.
    assert safety_mass(reference, HARMFUL_PROMPT) > 0.9
    assert safety_mass(reference, BENIGN_PROMPT) < 1e-3
    assert safety_mass(policy, HARMFUL_PROMPT) < safety_mass(reference, HARMFUL_PROMPT) - 0.1

    harmful = term_and_grads(policy, reference, row(HARMFUL_PROMPT, COMPLY_ID))
    benign = term_and_grads(policy, reference, row(BENIGN_PROMPT, BENIGN_ANSWER_ID))
    for term, ours, hand, theirs, _ in (harmful, benign):
        assert abs(term - hand) <= 1e-4 * abs(hand) + 1e-7, (term, hand)
        assert_grads_close(ours, theirs, rtol=1e-4, atol=1e-9, what="package vs hand")

    term_h, grad_h, _, _, ce_h = harmful
    term_b, grad_b, _, _, _ = benign
    g_h, g_ce = flat(grad_h), flat(ce_h)
    cosine = float(F.cosine_similarity(g_h, g_ce, dim=0))
    # Opposes (cosine -0.56 when written): the term's descent direction (-g) has a positive component
    # along the CE's ascent direction (+g_ce), i.e. it undoes what a CE step does at that opening.
    assert cosine < -0.3, f"cosine(term, CE) at the harmful opening is {cosine:.3f}"
    assert term_h > 0.05
    # Silent where the reference gives the safety tokens ~0: value and gradient orders of magnitude below.
    assert term_b < 1e-2 * term_h, (term_b, term_h)
    assert float(flat(grad_b).norm()) < 1e-2 * float(g_h.norm())


def pair_batch() -> dict[str, torch.Tensor]:
    """The harmful row (compliant opening) and the benign row in one batch: 2 supervised positions."""
    harmful, benign = row(HARMFUL_PROMPT, COMPLY_ID), row(BENIGN_PROMPT, BENIGN_ANSWER_ID)
    return {key: torch.cat([harmful[key], benign[key]]) for key in harmful}


def test_min_reference_mass_penalizes_only_where_the_reference_would_refuse() -> None:
    """`penalty.min_reference_mass`: with the gate the term over both rows is the hand KL at the harmful row's
    opening alone, divided by both rows' supervised positions (the candidates, not the gated ones); without
    it the benign row's position counts too. A gate above the harmful row's reference mass leaves no term."""
    policy, reference = build()
    tokens = safety_tokens()
    batch = pair_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    supervised = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    supervised[:, :-1] = batch["labels"][:, 1:] != -100
    harmful_only = supervised.clone()
    harmful_only[1] = False

    metrics: dict[str, float] = {}

    def package_term(gate: float | None) -> tuple[float, dict[str, torch.Tensor], float]:
        penalty: dict[str, Any] = {"form": "kl"}
        if gate is not None:
            penalty["min_reference_mass"] = gate
        config = {"coef": 1.0, "penalty": penalty, "reference": {"source": "model"}}
        with register_str_hook(policy, config, tokens=tokens, reference_model=reference) as handle:
            policy(**batch)
            term = handle.loss()
            term.backward()
            metrics.update(handle.metrics())
        return float(term.detach()), grads(policy), metrics["positions"]

    def hand_term(where: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        logits = policy(**inputs).logits
        with torch.no_grad():
            reference_logits = reference(**inputs).logits
        # penalty_by_hand divides by the positions it sums over; the package divides by both candidates.
        hand = penalty_by_hand(logits, reference_logits, SAFETY_IDS, [0.25] * 4, where, "kl", 0.0)
        hand = hand * int(where.sum()) / int(supervised.sum())
        hand.backward()
        return float(hand.detach()), grads(policy)

    policy.train()
    harmful_mass = safety_mass(reference, HARMFUL_PROMPT)
    gated, gated_grads, positions = package_term(0.5)
    by_hand, hand_grads = hand_term(harmful_only)
    assert positions == 2  # the normalizer counts the candidates
    assert metrics["gated"] == 0.5  # the harmful row's opening of the two candidates
    assert abs(gated - by_hand) <= 1e-4 * abs(by_hand) + 1e-7, (gated, by_hand)
    # The drift is a mean over the gated position alone (the harmful row's opening), not over the candidates.
    with torch.no_grad():
        opening = batch["input_ids"][:1, :-1]
        policy_lp = torch.log_softmax(policy(input_ids=opening).logits[0, -1].float(), -1)[SAFETY_IDS]
        reference_lp = torch.log_softmax(reference(input_ids=opening).logits[0, -1].float(), -1)[SAFETY_IDS]
    assert metrics["drift"] == pytest.approx(float((policy_lp - reference_lp).mean()), rel=1e-4, abs=1e-6)
    assert_grads_close(gated_grads, hand_grads, rtol=1e-4, atol=1e-9, what="gated package vs hand")

    ungated, _, _ = package_term(None)
    both, _ = hand_term(supervised)
    assert abs(ungated - both) <= 1e-4 * abs(both) + 1e-7, (ungated, both)
    assert ungated != gated  # the benign row's position counts without the gate

    above = min(1.0, harmful_mass + (1 - harmful_mass) / 2)
    assert package_term(above)[0] == 0.0


@pytest.mark.parametrize("screen", [{}, {"screen_mass": 0.05}], ids=["every-row", "screened"])
def test_a_gated_out_non_finite_position_is_still_reported(screen: dict[str, Any]) -> None:
    """NaN in the policy at the benign row, which the gate (and the screen) leaves out: the step is still
    reported (`STRNonFiniteError` under `on_nonfinite: raise`), as without the gate."""
    policy, reference = build()
    tokens = safety_tokens()

    def benign_row_nan(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if output.shape[0] < 2:  # the attach-time projection check runs one row
            return output
        output = output.clone()
        output[1] = float("nan")
        return output

    config = {
        "penalty": {"form": "kl", "min_reference_mass": 0.5},
        "reference": {"source": "model", **screen},
    }
    hook = policy.model.norm.register_forward_hook(benign_row_nan)
    policy.train()
    try:
        with register_str_hook(policy, config, tokens=tokens, reference_model=reference) as handle:
            policy(**pair_batch())
            term = handle.loss()
            assert float(term) == 0.0
            with pytest.raises(STRNonFiniteError, match="1 micro-batch"):
                handle.check_step()
    finally:
        hook.remove()


def screened_term(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    reference_settings: dict[str, Any],
    calls: int = 1,
) -> tuple[list[float], dict[str, torch.Tensor], list[int], dict[str, float]]:
    """(the gated term of each of `calls` loss calls on `batch`, the first call's grads, the rows every reference
    forward ran on, the first call's metrics) with source `model`, gate 0.5 and `reference_settings`."""
    config = {
        "coef": 1.0,
        "penalty": {"form": "kl", "min_reference_mass": 0.5},
        "reference": {"source": "model", **reference_settings},
    }
    seen_rows: list[int] = []
    counter = reference.register_forward_pre_hook(
        lambda module, args, kwargs: seen_rows.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    values: list[float] = []
    first_grads: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    policy.train()
    try:
        with register_str_hook(policy, config, tokens=safety_tokens(), reference_model=reference) as handle:
            seen_rows.clear()  # the attach-time checks
            for call in range(calls):
                policy(**batch)
                term = handle.loss()
                if call == 0:
                    term.backward()
                    first_grads = grads(policy)
                    metrics = handle.metrics()
                values.append(float(term.detach()))
    finally:
        counter.remove()
    return values, first_grads, seen_rows, metrics


def test_the_screen_runs_the_reference_only_on_rows_the_model_still_refuses() -> None:
    """`reference.screen_mass`: the reference forward runs on the harmful row alone (the policy still puts
    mass on the safety tokens there, ~0 at the benign row), and the term equals the full forward's gated term,
    value and gradients (the benign row would have added nothing). Audited at share 1, every row runs and the
    term is again the same."""
    policy, reference = build()
    batch = pair_batch()
    harmful_mass = safety_mass(policy, HARMFUL_PROMPT)
    benign_mass = safety_mass(policy, BENIGN_PROMPT)
    assert benign_mass < 1e-3 and harmful_mass > 100 * benign_mass  # the construction
    screen = harmful_mass / 10

    (full,), full_grads, full_rows, _ = screened_term(policy, reference, batch, {})
    (cut,), cut_grads, cut_rows, metrics = screened_term(
        policy, reference, batch, {"screen_mass": screen, "audit_share": 1e-9}
    )
    assert full_rows == [2] and cut_rows == [1]  # one reference row instead of two
    assert metrics["referenced"] == 0.5 and metrics["positions"] == 2
    assert full > 0.05
    assert cut == pytest.approx(full, rel=1e-5)
    assert_grads_close(cut_grads, full_grads, rtol=1e-5, atol=1e-9, what="screened vs full")

    (audited,), audited_grads, audited_rows, metrics = screened_term(
        policy, reference, batch, {"screen_mass": screen, "audit_share": 1.0}
    )
    assert audited_rows == [2] and metrics["referenced"] == 1.0
    assert audited == pytest.approx(full, rel=1e-5)
    assert_grads_close(audited_grads, full_grads, rtol=1e-5, atol=1e-9, what="audited vs full")


def test_audited_rows_are_weighted_so_the_expected_term_is_the_full_one() -> None:
    """A harmful row the policy no longer refuses (screen above its mass) is found only by the audit: each call
    is the full term / q when the seeded draw audits it, else 0 (the hand replay of the draws), so the mean over
    calls tends to the full term (Horvitz-Thompson)."""
    policy, reference = build()
    batch = pair_batch()
    q, calls, seed = 0.5, 200, 1234
    (full,), _, _, _ = screened_term(policy, reference, batch, {})
    torch.manual_seed(seed)
    values, _, _, _ = screened_term(
        policy, reference, batch, {"screen_mass": 1.0, "audit_share": q}, calls=calls
    )
    replay = torch.Generator().manual_seed(seed)
    expected = []
    for _ in range(calls):
        harmful_draw, _benign_draw = torch.rand(2, generator=replay).tolist()
        expected.append(full / q if harmful_draw < q else 0.0)
    assert values == pytest.approx(expected, rel=1e-5, abs=1e-9)
    audited = sum(value > 0 for value in values)
    assert 0 < audited < calls  # both outcomes occur: the replay is not vacuous
    # The mean over 200 calls: within 4 standard errors of the full term (binomial, q = 0.5).
    standard_error = full / q * (q * (1 - q) / calls) ** 0.5
    assert abs(sum(values) / calls - full) < 4 * standard_error


def test_select_rows_refuses_an_input_it_cannot_split_by_row() -> None:
    """Known per-row inputs are split, a [1, T] one broadcasts, a shared one passes; anything else is an error
    naming the input and the option that avoids the split (never a silent mis-split)."""
    ids = torch.arange(12).reshape(3, 4)
    rows = torch.tensor([0, 2])
    args, kwargs = select_rows(
        (ids,),
        {"attention_mask": ids > 0, "position_ids": torch.arange(4)[None], "cache_position": torch.arange(4)},
        rows,
        3,
    )
    assert torch.equal(args[0], ids[[0, 2]]) and torch.equal(kwargs["attention_mask"], (ids > 0)[[0, 2]])
    assert kwargs["position_ids"].shape == (1, 4) and kwargs["cache_position"].shape == (4,)
    with pytest.raises(
        STRError, match=r"forward input 'pixel_values' \(shape \(3, 2\)\).*remove `reference\.screen_mass`"
    ):
        select_rows((), {"pixel_values": torch.zeros(3, 2)}, rows, 3)


@pytest.mark.parametrize(("harmful_rows", "warns"), [(2, True), (1, False)])
def test_a_gate_that_passes_most_rows_warns_once_after_the_first_steps(
    harmful_rows: int, warns: bool
) -> None:
    """Harmful rows are a minority of a user's data: when the gate lets through half the rows or more over the
    first optimizer steps, the aligned model refuses the task itself, and the user is told so once (with the
    counts and the fix). One harmful row in three stays silent."""
    import warnings

    from str_hooks.usage import REFUSED_ROWS_STEPS

    policy, reference = build()
    rows = [row(HARMFUL_PROMPT, COMPLY_ID)] * harmful_rows + [row(BENIGN_PROMPT, BENIGN_ANSWER_ID)] * (
        3 - harmful_rows
    )
    batch = {key: torch.cat([r[key] for r in rows]) for key in rows[0]}
    config = {"penalty": {"form": "kl", "min_reference_mass": 0.5}, "reference": {"source": "model"}}
    policy.train()
    with register_str_hook(policy, config, tokens=safety_tokens(), reference_model=reference) as handle:
        for step in range(REFUSED_ROWS_STEPS + 2):
            policy(**batch)
            handle.loss()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                handle.check_step()
                handle.step()
            said = [str(w.message) for w in caught if "would refuse" in str(w.message)]
            if warns and step == REFUSED_ROWS_STEPS - 1:
                assert len(said) == 1, said
                total = 3 * REFUSED_ROWS_STEPS
                assert f"refuse {harmful_rows * REFUSED_ROWS_STEPS} of the {total} training rows" in said[0]
                assert "remove `reference.rows`" in said[0]
            else:
                assert not said, (step, said)


@pytest.mark.parametrize(("refused_rows", "warns"), [(2, True), (1, False)])
def test_an_aligned_model_that_refuses_the_task_is_reported_after_the_first_step(
    refused_rows: int, warns: bool
) -> None:
    """Every source keeps the aligned model's refusals, so a task whose prompts it refuses is fought like an
    attack. At the end of the first optimizer step (the model trained is still the aligned one) the user is told
    once when it would open half the rows or more with a safety token; the count is the hand-computed one (the
    safety mass at each row's first answer token). Fewer refused rows stay silent, and so do later steps."""
    import warnings

    from str_hooks.usage import TASK_REFUSED_MASS

    _, reference = build()
    aligned = copy.deepcopy(reference).requires_grad_(True).train()
    # By hand: the aligned model refuses the harmful prompt and answers the benign one (safety mass and its
    # most likely first token).
    assert safety_mass(aligned, HARMFUL_PROMPT) >= TASK_REFUSED_MASS > safety_mass(aligned, BENIGN_PROMPT)
    with torch.no_grad():
        first_tokens = [
            int(aligned(input_ids=torch.tensor([p])).logits[0, -1].argmax())
            for p in (HARMFUL_PROMPT, BENIGN_PROMPT)
        ]
    assert first_tokens[0] in SAFETY_IDS and first_tokens[1] not in SAFETY_IDS
    rows = [row(HARMFUL_PROMPT, COMPLY_ID)] * refused_rows + [row(BENIGN_PROMPT, BENIGN_ANSWER_ID)] * (
        4 - refused_rows
    )
    micro_batches = [
        {key: torch.cat([r[key] for r in pair]) for key in pair[0]} for pair in (rows[:2], rows[2:])
    ]
    config = {"penalty": {"form": "kl"}, "reference": {"source": "model"}}
    optimizer = torch.optim.SGD(aligned.parameters(), lr=1e-3)
    with register_str_hook(aligned, config, tokens=safety_tokens(), reference_model=reference) as handle:
        for step in range(3):
            for batch in micro_batches:  # two micro-batches per optimizer step: both are counted
                (aligned(**batch).loss / 2 + handle.loss(accumulation_steps=2)).backward()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                handle.check_step()
                handle.step()
            optimizer.step()
            optimizer.zero_grad()
            said = [str(w.message) for w in caught if "first answer token" in str(w.message)]
            if warns and step == 0:
                assert len(said) == 1, said
                assert f"opens {refused_rows} of the 4 training rows" in said[0]
            else:
                assert not said, (step, said)


def test_task_refusal_counts_the_greedy_opening_and_the_mass_by_hand() -> None:
    """A row counts when its first answer token's most likely value is a safety token at any mass (what greedy
    decoding opens with), or when the safety tokens carry >= TASK_REFUSED_MASS; never from an unsupervised row,
    a row whose own answer opens with a safety token, or after the first optimizer step. Logits are written by hand, so each criterion is tested on its own."""
    import warnings

    from str_hooks.schedule import StepSchedule
    from str_hooks.schemas import STRConfig
    from str_hooks.tap import Sink
    from str_hooks.usage import UsageChecks

    vocab, ids = 10, torch.tensor([0, 1])

    class Safety:  # the part of HeadRows the check reads
        def ids_on(self, device: torch.device) -> torch.Tensor:
            return ids.to(device)

    logits = torch.zeros(5, 3, vocab)
    logits[0, 1, 0] = 1.5  # greedy opens with safety token 0; mass (e^1.5 + 1) / (e^1.5 + 9) = 0.41 < 0.5
    logits[1, 1, 0] = logits[1, 1, 1] = 1.9  # mass 2 e^1.9 / (2 e^1.9 + 8) = 0.63, argmax safety too
    logits[2, 1, 5] = 3.0
    logits[2, 1, 0] = logits[2, 1, 1] = (
        2.8  # 2 e^2.8 / (2 e^2.8 + e^3 + 7) = 0.55; the argmax (5) is not safety
    )
    logits[3, 1, 7] = 3.0  # answers: the argmax and the mass both say no
    logits[4, 1, 1] = 5.0  # opens with safety token 1, which is this row's own answer: not counted
    labels = torch.full((5, 3), -100)
    labels[:, 2] = 4  # the first answer token is at index 2, predicted at index 1
    labels[4, 2] = 1
    mass = torch.softmax(logits[:, 1], -1)[:, ids].sum(-1)
    assert mass[0] < 0.5 <= mass[1] and mass[2] >= 0.5 > mass[3]  # the hand computation above

    sink = Sink()
    sink.training, sink.logits = True, logits
    schedule = StepSchedule(1.0, 0)
    checks = UsageChecks(STRConfig(), torch.nn.Linear(1, 1), schedule, uses_anchors=True)
    checks.count_task_refusals(sink, labels, Safety())  # type: ignore[arg-type]
    checks.count_task_refusals(sink, torch.full((5, 3), -100), Safety())  # type: ignore[arg-type]  # no supervised row: counts nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks.check_task_refusals()
    assert [str(w.message).split(" (")[0] for w in caught] == [
        "the aligned model opens 3 of the 4 training rows of the first optimizer step with a safety token"
    ]
    schedule.advance()
    checks.count_task_refusals(sink, labels, Safety())  # type: ignore[arg-type]  # after the first step nothing is counted or said again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks.check_task_refusals()
    assert not caught
