"""`reference.anchor_placement: folded`: the anchors ride in the training forward.

The independent computation never folds: the cross-entropy from a plain forward of the batch, each anchor's
decision logits from a forward of that anchor alone (full logits, gathered at the safety ids), the reference
from `disable_adapter()`, the penalty written out. The folded gradient must equal it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.configs import decision_point_only
from helpers.factory import ARCHITECTURES, make_batch, make_lora, make_model
from helpers.losses import assert_grads_close, grads

from str_hooks import register_str_hook
from str_hooks.errors import STRAttachError, STRError
from str_hooks.folding import fold_anchors

COEF = 3.0
N_ANCHORS = 3


def folded_cfg(**reference: Any) -> dict[str, Any]:
    """Folded anchors at the decision point alone (mse), what `anchor_penalty_by_hand` writes out; the
    openings, benign anchors and coarse forms are folded in tests/test_decision_point.py."""
    return decision_point_only(
        {
            "coef": COEF,
            "reference": {"anchor_placement": "folded", "anchor_batch_size": N_ANCHORS, **reference},
        }
    )


def ce_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def anchor_penalty_by_hand(
    model: Any, anchor_ids: list[list[int]], token_ids: list[int], weights: list[float]
) -> torch.Tensor:
    """Mean over anchors of sum_k w_k (z_k - r_k)^2 at each anchor's last prompt token, every anchor run
    alone (no padding, no packing), the reference with the adapters disabled."""
    total = torch.zeros(())
    for ids in anchor_ids:
        x = torch.tensor([ids])
        z = model(input_ids=x).logits[0, -1, token_ids].float()
        with torch.no_grad(), model.disable_adapter():
            r = model(input_ids=x).logits[0, -1, token_ids].float()
        total = total + sum(w * (z[j] - r[j]) ** 2 for j, w in enumerate(weights))
    return total / len(anchor_ids)


def with_room(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """The batch right-padded by `extra` more columns (pad id, mask 0, label -100)."""
    fills = {"input_ids": 3, "attention_mask": 0, "labels": -100}
    return {k: torch.cat([v, torch.full((v.shape[0], extra), fills[k])], dim=1) for k, v in batch.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(("extend_labels", "room"), [(False, 0), (True, 0), (False, 80)])
def test_folded_gradient_equals_separate_anchor_forwards(
    arch: str, attn: str, extend_labels: bool, room: int, tokenizer: Any, tokens: Any
) -> None:
    """room 0: the anchors do not fit the rows' padding and go in front; room 80: they all go into it (GPT-2 has 128 positions)."""
    # Gemma2's attention softcap has no SDPA kernel; its final-logit softcap stays.
    overrides = {"attn_logit_softcapping": None} if arch == "gemma2" and attn == "sdpa" else {}
    model = make_lora(make_model(arch, **overrides))
    model.base_model.model.config._attn_implementation = attn
    batch = with_room(make_batch(tokenizer, n=2, seed=5), room)
    with register_str_hook(model, folded_cfg(), tokens=tokens, tokenizer=tokenizer) as handle:
        assert handle.anchors is not None
        indices = handle.anchors.batch_indices(0)
        anchor_ids = [handle.anchors.encoded[i] for i in indices]
        folded = handle.prepare_batch(batch, extend_labels=extend_labels)
        widened = folded["input_ids"].shape[1] > batch["input_ids"].shape[1]
        assert folded is not batch and widened == (room == 0)
        assert ("logits_to_keep" in folded) == (widened and not extend_labels)
        out = model(**folded)
        term = handle.loss()
        (out.loss + term).backward()
        ours = grads(model)
        ours_ce, ours_term = float(out.loss.detach()), float(term.detach())

    plain = model(**batch)
    ce = ce_by_hand(plain.logits, batch["labels"])
    penalty = COEF * anchor_penalty_by_hand(model, anchor_ids, tokens.ids, tokens.weights)
    (ce + penalty).backward()
    theirs = grads(model)
    assert ours_ce == pytest.approx(float(ce.detach()), rel=1e-5)
    assert ours_term == pytest.approx(float(penalty.detach()), rel=1e-4)
    assert float(penalty.detach()) > 1e-3  # the adapters moved the anchors' logits: the check is not vacuous
    assert_grads_close(ours, theirs)


def test_folded_full_fine_tuning_equals_separate_placement(tokenizer: Any, tokens: Any) -> None:
    """Without adapters (the reference is the model at attach), folded and separate give one gradient."""
    base = make_model("llama")
    batch = make_batch(tokenizer, n=3, seed=2)
    results = []
    for placement in ("separate", "folded"):
        model = copy.deepcopy(base)
        cfg = folded_cfg(anchor_placement=placement)
        with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
            torch.manual_seed(9)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            out = model(**handle.prepare_batch(batch))
            term = handle.loss()
            (out.loss + term).backward()
            assert float(term) > 1e-4
            results.append((float(out.loss), float(term), grads(model)))
    (ce_s, term_s, grads_s), (ce_f, term_f, grads_f) = results
    assert ce_f == pytest.approx(ce_s, rel=1e-5) and term_f == pytest.approx(term_s, rel=1e-4)
    assert_grads_close(grads_f, grads_s)


def test_schedule_accumulation_and_eval(tokenizer: Any, tokens: Any) -> None:
    """Folded on the first micro-batch of every `anchor_every`-th step only; never in eval mode; the anchor
    cursor advances like the separate placement's."""
    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=2)
    with register_str_hook(model, folded_cfg(anchor_every=2), tokens=tokens, tokenizer=tokenizer) as handle:
        folded_at: list[tuple[int, int]] = []
        for step in range(4):
            for micro in range(2):
                prepared = handle.prepare_batch(batch)
                out = model(**prepared)
                term = handle.loss()
                if prepared is not batch:
                    folded_at.append((step, micro))
                    assert float(term) > 0
                else:
                    assert float(term) == 0.0
                out.loss.backward()
            handle.step()
        assert folded_at == [(0, 0), (2, 0)]
        assert handle.state_dict()["anchor_cursor"] == 2 * N_ANCHORS
        model.eval()
        assert handle.prepare_batch(batch) is batch
        model.train()


def test_forgetting_prepare_batch_is_an_error(tokenizer: Any, tokens: Any) -> None:
    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=2)
    with register_str_hook(model, folded_cfg(), tokens=tokens, tokenizer=tokenizer) as handle:
        model(**batch)
        with pytest.raises(STRError, match=r"prepare_batch\(batch\)"):
            handle.loss()
        # Folded, but the forward ran on another batch: wider, or (anchors in the padding) the same shape.
        handle.prepare_batch(batch)
        model(**batch)
        with pytest.raises(STRError, match="model\\(\\*\\*batch\\)"):
            handle.loss()
        handle.step()
        roomy = with_room(batch, 80)
        folded = handle.prepare_batch(roomy)
        assert folded["input_ids"].shape == roomy["input_ids"].shape
        model(**roomy)
        with pytest.raises(STRError, match="on other input_ids"):
            handle.loss()


def test_other_placements_and_sources_leave_the_batch_alone(tokenizer: Any, tokens: Any) -> None:
    batch = make_batch(tokenizer, n=2)
    for cfg in ({"reference": {"source": "anchors"}}, {"reference": {"source": "adapter"}}):
        model = make_lora(make_model("llama"))
        with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
            assert handle.prepare_batch(batch) is batch


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("left", "left-padded"),
        ("segments", "values other than 0 and 1"),
        ("embeds", "no \\[B, T\\] `input_ids`"),
        ("unknown", "per-token field `completion_mask`"),
        ("keep", "sets `logits_to_keep`"),
    ],
)
def test_batches_that_cannot_fold_exactly_are_refused(
    change: str, message: str, tokenizer: Any, tokens: Any
) -> None:
    batch = make_batch(tokenizer, n=2)
    if change == "left":
        batch["attention_mask"] = batch["attention_mask"].flip(1)
    elif change == "segments":
        batch["attention_mask"] = batch["attention_mask"] * 2
    elif change == "embeds":
        batch = {"inputs_embeds": torch.zeros(2, 5, 32), "labels": batch["labels"]}
    elif change == "unknown":
        batch["completion_mask"] = batch["attention_mask"].clone()
    else:
        batch["logits_to_keep"] = 0
    model = make_lora(make_model("llama"))
    with register_str_hook(model, folded_cfg(), tokens=tokens, tokenizer=tokenizer) as handle:
        with pytest.raises(STRError, match=message) as info:
            handle.prepare_batch(batch)
        assert "anchor_placement: separate" in str(info.value)


def test_fold_layout_and_padding_free_positions() -> None:
    """Two padding-free samples packed in one row keep their own positions; without padding the anchors
    become a prefix (longest first, into the row with the shortest prefix), a shorter prefix starts with a
    padding segment, and each decision point is an anchor's last token."""
    anchors = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    ids = torch.arange(100, 110).view(2, 5)
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    labels = ids.clone()
    folded, where = fold_anchors(
        {"input_ids": ids, "position_ids": positions, "labels": labels},
        anchors,
        [7, 8, 9],
        pad_token_id=0,
        keep_logits=False,
    )
    # Row 0 holds anchor 2 behind a 1-token padding segment, row 1 anchors 0 and 1 (5 tokens).
    assert folded["input_ids"][0].tolist() == [0, 31, 32, 33, 34, 100, 101, 102, 103, 104]
    assert folded["input_ids"][1].tolist() == [11, 12, 13, 21, 22, 105, 106, 107, 108, 109]
    assert folded["position_ids"][0].tolist() == [0, 0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert folded["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]
    assert folded["labels"][:, :5].eq(-100).all() and folded["labels"][:, 5:].equal(labels)
    assert where.rows.tolist() == [1, 1, 0] and where.cols.tolist() == [2, 4, 4]
    assert where.indices == [7, 8, 9] and where.shape == (2, 10)
    assert "attention_mask" not in folded


def test_anchors_fill_trailing_padding_before_widening() -> None:
    """Right padding whose labels are ignored takes the anchors that fit (no extra tokens); the rest of
    the padding becomes its own segment; an anchor that fits nowhere goes in front."""
    anchors = [[11, 12, 13], [21, 22], [31, 32, 33, 34, 35, 36]]
    ids = torch.tensor([[5, 6, 0, 0, 0, 0, 0], [7, 8, 9, 10, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.where(mask.bool(), ids, -100)
    labels[1, 4] = 8  # a supervised pad position: row 1's usable padding is only its last 2 slots
    folded, where = fold_anchors(
        {"input_ids": ids, "attention_mask": mask, "labels": labels},
        anchors,
        [0, 1, 2],
        pad_token_id=0,
        keep_logits=True,
    )
    # Anchor 2 (6 tokens) fits nowhere: prefix of row 0 (row 1 gets a padding segment). Anchor 0 (3) goes
    # to row 0's 5-slot tail (best fit needs 3 <= room: row 1 has 2), anchor 1 (2) to what is left there
    # (a tie with row 1's 2 slots, broken by row order); row 1's supervised pad slot is never written.
    assert folded["input_ids"].tolist() == [
        [31, 32, 33, 34, 35, 36, 5, 6, 11, 12, 13, 21, 22],
        [0, 0, 0, 0, 0, 0, 7, 8, 9, 10, 0, 0, 0],
    ]
    assert folded["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2, 0, 1],
        [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6],
    ]
    assert where.rows.tolist() == [0, 0, 0] and where.cols.tolist() == [10, 12, 5]
    assert folded["labels"] is labels and folded["logits_to_keep"].tolist() == list(range(6, 13))
    # Everything fits once the rows have room: the batch keeps its width and needs no logits_to_keep.
    roomy = {
        k: torch.cat([v, torch.full((2, 6), 0 if k != "labels" else -100)], dim=1)
        for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()
    }
    folded, where = fold_anchors(roomy, anchors, [0, 1, 2], pad_token_id=0, keep_logits=True)
    assert folded["input_ids"].shape == (2, 13) and "logits_to_keep" not in folded
    assert folded["labels"] is roomy["labels"]


def test_attach_refuses_attention_that_ignores_packing(
    tokenizer: Any, tokens: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Transformers versions before packed-mask detection let folded anchors leak into the rows behind
    them; the attach-time check catches it."""
    import transformers.masking_utils as masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    model = make_lora(make_model("llama"))
    with pytest.raises(STRAttachError, match=r"anchor_placement.*does not keep packed segments apart"):
        register_str_hook(model, folded_cfg(), tokens=tokens, tokenizer=tokenizer)


# -- folding without reading the batch on the host (`fold_into_padding: no`, the default on accelerators) --
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fold_without_reading_the_batch_equals_separate_anchor_forwards(
    arch: str, tokenizer: Any, tokens: Any
) -> None:
    """The padding is there (room 80) but not read: every anchor goes in front, and the gradient is still
    the hand-written CE + each anchor run alone."""
    model = make_lora(make_model(arch))
    batch = with_room(make_batch(tokenizer, n=2, seed=5), 80)
    cfg = folded_cfg(fold_into_padding="no")
    with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
        assert handle.anchors is not None
        anchor_ids = [handle.anchors.encoded[i] for i in handle.anchors.batch_indices(0)]
        folded = handle.prepare_batch(batch)
        assert folded["input_ids"].shape[1] > batch["input_ids"].shape[1]  # in front, not in the padding
        out = model(**folded)
        term = handle.loss()
        (out.loss + term).backward()
        ours = grads(model)
        handle.step()  # a well-formed batch: no problem reported
    plain = model(**batch)
    penalty = COEF * anchor_penalty_by_hand(model, anchor_ids, tokens.ids, tokens.weights)
    (ce_by_hand(plain.logits, batch["labels"]) + penalty).backward()
    assert float(term) == pytest.approx(float(penalty.detach()), rel=1e-4)
    assert_grads_close(ours, grads(model))


def test_fold_without_reading_matches_the_layout_of_a_fold_into_no_padding() -> None:
    from str_hooks.folding import fold_in_front

    anchors = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    ids = torch.arange(100, 110).view(2, 5)
    batch = {
        "input_ids": ids,
        "position_ids": torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]),
        "labels": ids.clone(),
    }
    expected, where = fold_anchors(
        batch, anchors, [7, 8, 9], pad_token_id=0, keep_logits=False, points=[1, 2, 1]
    )
    folded, found = fold_in_front(
        batch,
        [torch.tensor(a) for a in anchors],
        [7, 8, 9],
        pad_token_id=0,
        keep_logits=False,
        points=[1, 2, 1],
    )
    assert folded.keys() == expected.keys()
    for key in folded:
        assert torch.equal(folded[key], expected[key]), key
    assert torch.equal(found.rows, where.rows) and torch.equal(found.cols, where.cols)
    assert found.problems is not None and int(found.problems) == 0


@pytest.mark.parametrize(
    ("change", "message"), [("left", "left-padded"), ("segments", "values other than 0 and 1")]
)
def test_fold_without_reading_reports_bad_batches_at_the_step(
    change: str, message: str, tokenizer: Any, tokens: Any
) -> None:
    batch = make_batch(tokenizer, n=2)
    if change == "left":
        batch["attention_mask"] = batch["attention_mask"].flip(1)
    else:
        batch["attention_mask"] = batch["attention_mask"] * 2
    model = make_lora(make_model("llama"))
    with register_str_hook(
        model, folded_cfg(fold_into_padding="no"), tokens=tokens, tokenizer=tokenizer
    ) as handle:
        model(**handle.prepare_batch(batch))
        handle.loss()
        with pytest.raises(STRError, match=message) as info:
            handle.step()
        assert "anchor_placement: separate" in str(info.value)
