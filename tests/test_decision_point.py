"""STR at the decision point: `logprob` and `kl` at anchors, anchor openings, benign anchors.

The independent computation never uses str-hooks' anchor code: each anchor's opening is generated here by
a greedy loop over the model's own full logits (adapters disabled), each anchor runs alone (no padding, no
packing), the reference comes from `disable_adapter()`, and every form is written out per point: the
log-softmax over the whole vocabulary, and the coarse KL with the "everything else" bucket as
1 - sum of the safety probabilities.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.factory import ARCHITECTURES, drop_logits, make_batch, make_lora, make_model
from helpers.losses import assert_grads_close, ce_by_hand, grads

from str_hooks import anchors as anchors_module
from str_hooks import openings as openings_module
from str_hooks import register_str_hook
from str_hooks.errors import STRAttachError
from str_hooks.penalty import coarse_logprobs
from str_hooks.prompts import default_texts, encode_prompt
from str_hooks.schemas import STRConfig

COEF = 2.0
OPENING = 3
BENIGN_WEIGHT = 0.5
HARMFUL = ["Tell me how to pick a lock.", "Write a threatening letter.", "How do I make a weapon?"]
BENIGN = ["How do I bake bread?", "Explain how tides work."]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def prompt_files(tmp_path: Path) -> tuple[str, str]:
    harmful, benign = tmp_path / "harmful.txt", tmp_path / "benign.txt"
    harmful.write_text("\n".join(HARMFUL))
    benign.write_text("\n".join(BENIGN))
    return str(harmful), str(benign)


def anchor_cfg(tmp_path: Path, form: str, placement: str, **reference: Any) -> dict[str, Any]:
    harmful, benign = prompt_files(tmp_path)
    return {
        "coef": COEF,
        "penalty": {"form": form},
        "reference": {
            "source": "anchors",
            "anchors_path": harmful,
            "benign_anchors_path": benign,
            "benign_weight": BENIGN_WEIGHT,
            "anchor_tokens": OPENING,
            "anchor_batch_size": len(HARMFUL) + len(BENIGN),
            "anchor_placement": placement,
            **reference,
        },
    }


def greedy_opening(model: Any, prompt: list[int], n: int, end_ids: set[int]) -> list[int]:
    """The aligned model's greedy opening, one full forward per token."""
    sequence, opening = list(prompt), []
    with torch.no_grad(), model.disable_adapter():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
            opening.append(token)
            sequence.append(token)
            if token in end_ids:
                break
    return opening


def point_penalty(
    z: torch.Tensor, r: torch.Tensor, ids: list[int], weights: list[float], form: str
) -> torch.Tensor:
    """One point's penalty from full-vocabulary logits z (policy) and r (reference), written out."""
    if form == "mse":
        return sum(w * (z[i] - r[i]) ** 2 for i, w in zip(ids, weights, strict=True))  # type: ignore[return-value]
    lz, lr = torch.log_softmax(z, dim=-1), torch.log_softmax(r, dim=-1)
    if form == "logprob":
        return sum(w * (lz[i] - lr[i]) ** 2 for i, w in zip(ids, weights, strict=True))  # type: ignore[return-value]
    pz, pr = lz.exp(), lr.exp()
    rest_z = torch.log(1 - sum(pz[i] for i in ids))
    rest_r = torch.log(1 - sum(pr[i] for i in ids))
    buckets = [(lr[i], lz[i]) for i in ids] + [(rest_r, rest_z)]
    return sum(torch.exp(a) * (a - b) for a, b in buckets)  # type: ignore[return-value]


def anchor_penalty_by_hand(
    model: Any, tokenizer: Any, tokens: Any, form: str, openings_out: dict[str, list[int]]
) -> torch.Tensor:
    total, weight_sum = torch.zeros(()), 0.0
    end_ids = {int(tokenizer.eos_token_id)}
    for text, weight in [(t, 1.0) for t in HARMFUL] + [(t, BENIGN_WEIGHT) for t in BENIGN]:
        prompt = encode_prompt(tokenizer, text)
        opening = greedy_opening(model, prompt, OPENING, end_ids)
        openings_out[text] = opening
        x = torch.tensor([prompt + opening[:-1]])
        z = model(input_ids=x).logits[0].float()
        with torch.no_grad(), model.disable_adapter():
            r = model(input_ids=x).logits[0].float()
        for t in range(x.shape[1] - len(opening), x.shape[1]):
            total = total + weight * point_penalty(z[t], r[t], tokens.ids, tokens.weights, form)
            weight_sum += weight
    return total / weight_sum  # the weighted mean over the points


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("form", ["mse", "logprob", "kl"])
@pytest.mark.parametrize("placement", ["separate", "folded"])
def test_anchor_openings_forms_and_benign_weights_match_hand_written(
    arch: str, form: str, placement: str, tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    model = make_lora(make_model(arch))
    batch = make_batch(tokenizer, n=2, seed=5)
    cfg = anchor_cfg(tmp_path, form, placement)
    with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
        anchors = handle.anchors
        assert anchors is not None and anchors.n_benign == len(BENIGN)
        out = model(**handle.prepare_batch(batch))
        term = handle.loss()
        (out.loss + term).backward()
        ours = grads(model)
        ours_term = float(term.detach())
        ours_openings = {anchors.prompts[i]: anchors.openings[i] for i in range(len(anchors))}
        points = sum(anchors.points)

    plain = model(**batch)
    openings: dict[str, list[int]] = {}
    penalty = COEF * anchor_penalty_by_hand(model, tokenizer, tokens, form, openings)
    (ce_by_hand(plain.logits, batch["labels"]) + penalty).backward()
    theirs = grads(model)
    assert ours_openings == openings
    assert points == sum(len(o) for o in openings.values()) > len(HARMFUL) + len(BENIGN)
    assert float(penalty.detach()) > 1e-6  # the adapters moved the anchors: the check is not vacuous
    assert ours_term == pytest.approx(float(penalty.detach()), rel=1e-4)
    assert_grads_close(ours, theirs, rtol=5e-5)


def test_setup_passes_do_not_run_one_anchor_batch_at_a_time(
    tmp_path: Path, tokenizer: Any, tokens: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The openings and reference values are computed once, before training, in wide batches whatever the
    per-step `anchor_batch_size`, in as few forwards as one batch of all anchors; split into several setup
    batches (of 2) they come out the same, in the same order. The reference is read along the decoding: one
    forward over the first setup batch's full rows checks it, none over the others."""
    model = make_lora(make_model("llama"))
    forwards = 0

    def count(*_: Any) -> None:
        nonlocal forwards
        forwards += 1

    model.get_base_model().model.register_forward_hook(count)
    built = {}
    for setup_batch in (2, 32):
        monkeypatch.setattr(anchors_module, "SETUP_BATCH_SIZE", setup_batch)
        forwards = 0
        cfg = anchor_cfg(tmp_path, "mse", "separate", anchor_batch_size=1)
        with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
            anchors = handle.anchors
            assert anchors is not None and len(anchors) == 5
            built[setup_batch] = (forwards, list(anchors.openings), anchors.reference)
    (split_forwards, split_openings, split_reference), (wide_forwards, openings, reference) = built.values()
    assert split_openings == openings and all(len(o) > 1 for o in openings)
    torch.testing.assert_close(split_reference, reference)
    # All 5 anchors at once: the projection check, their shared prefix, one forward per opening token, the
    # full rows' check.
    assert wide_forwards == 1 + 1 + OPENING + 1
    assert split_forwards == 1 + 2 + 3 * OPENING + 1  # batches of 2, 2 (a prefix each) and 1 (none)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_openings_decoded_on_a_kv_cache_equal_full_forwards(
    arch: str, tmp_path: Path, tokenizer: Any, tokens: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left-padded prompts of different lengths decoded on the KV cache, their shared prefix run once (the
    default) or the whole prompts run (`share_anchor_prefix: no`), give the openings (and so the reference
    values) that one full forward per token gives, the path for models without a usable cache."""
    model = make_lora(make_model(arch))
    if arch == "gpt2":  # absolute positions: make them decide the argmax, so wrong positions would show
        with torch.no_grad():
            model.get_base_model().transformer.wpe.weight.mul_(100.0)
    widths: list[tuple[int, ...]] = []  # (rows, tokens) of every forward the attach runs

    def record(_: Any, args: Any, kwargs: Any) -> None:
        widths.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape))

    model.get_base_model().register_forward_pre_hook(record, with_kwargs=True)
    built = {}
    for path, share in (("shared prefix", "auto"), ("whole prompts", "no"), ("full forwards", "no")):
        if path == "full forwards":
            monkeypatch.setattr(openings_module, "greedy_with_cache", openings_module.greedy_full_forwards)
        widths.clear()
        cfg = anchor_cfg(tmp_path, "kl", "separate", anchor_tokens=5, share_anchor_prefix=share)
        with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
            anchors = handle.anchors
            assert anchors is not None
            assert handle.tap.can_decode_with_cache  # every test architecture has a cache to decode on
            built[path] = (list(anchors.openings), anchors.reference, list(widths))
    (openings, reference, shared_widths) = built["shared prefix"]
    assert len({len(p) for p in anchors.prompt_ids}) > 1 and anchors.prefix_length > 0
    # The shared path's decoding opened with the prefix alone, one row; the whole prompts' did not.
    assert (1, anchors.prefix_length) in shared_widths
    assert (1, anchors.prefix_length) not in built["whole prompts"][2]
    for path in ("whole prompts", "full forwards"):
        assert built[path][0] == openings, path
        torch.testing.assert_close(built[path][1], reference, rtol=1e-5, atol=1e-5)


def test_openings_fall_back_to_whole_prompts_where_the_prefix_cache_cannot_be_repeated(
    tmp_path: Path, tokenizer: Any, tokens: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache without `batch_repeat_interleave` cannot serve every prompt: each batch then runs its whole
    prompts, and the openings and reference are the ones sharing gives."""
    from transformers import DynamicCache

    model = make_lora(make_model("llama"))
    widths: list[tuple[int, ...]] = []

    def record(_: Any, args: Any, kwargs: Any) -> None:
        widths.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape))

    model.get_base_model().register_forward_pre_hook(record, with_kwargs=True)
    cfg = anchor_cfg(tmp_path, "kl", "separate", anchor_tokens=5)
    built = []
    for repeatable in (True, False):
        widths.clear()
        if not repeatable:
            owner = next(c for c in DynamicCache.__mro__ if "batch_repeat_interleave" in vars(c))
            monkeypatch.delattr(owner, "batch_repeat_interleave")
        with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
            anchors = handle.anchors
            assert anchors is not None and anchors.prefix_length > 0
            whole = (len(anchors), max(len(p) for p in anchors.prompt_ids))
            built.append((list(anchors.openings), anchors.reference, whole in widths))
    assert built[0][2] is False and built[1][2] is True  # whole prompts ran only without the repeat
    assert built[0][0] == built[1][0]
    torch.testing.assert_close(built[0][1], built[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("form", ["mse", "kl"])
def test_reference_read_along_the_decoding_equals_a_pass_over_the_full_rows(
    arch: str, form: str, tmp_path: Path, tokenizer: Any, tokens: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference values kept from the openings' decoding (safety logits for mse, the coarse buckets for
    kl) equal those of a separate no-grad pass over every anchor's full rows, in setup batches of 2 (so that
    most of them are not the batch the attach checks)."""
    monkeypatch.setattr(anchors_module, "SETUP_BATCH_SIZE", 2)
    full_passes: list[list[int]] = []
    policy_values = anchors_module.AnchorSet.policy_values

    def counted(self: Any, tap: Any, indices: Any, coarse: Any) -> torch.Tensor:
        full_passes.append(list(indices))
        return policy_values(self, tap, indices, coarse)

    monkeypatch.setattr(anchors_module.AnchorSet, "policy_values", counted)
    model = make_lora(make_model(arch))
    with register_str_hook(
        model, anchor_cfg(tmp_path, form, "separate", anchor_batch_size=1), tokens=tokens, tokenizer=tokenizer
    ) as handle:
        anchors = handle.anchors
        assert anchors is not None and len(anchors.setup_batches()) == 3
        along = anchors.reference
        assert along is not None and anchors._decoded is None  # used once, then dropped
        assert full_passes == [[0, 1]]  # the check of the first setup batch: the others were read along
        coarse = "kl" if form == "kl" else None
        full = anchors.compute_reference(handle.tap, model, coarse)  # nothing decoded now: the full rows
    assert all(len(o) > 1 for o in anchors.openings)
    torch.testing.assert_close(along, full, rtol=1e-5, atol=1e-5)


def test_a_decoding_that_disagrees_with_the_full_rows_is_not_the_reference(
    tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    """Where the first setup batch's full rows disagree with the values met along the decoding, every setup
    batch is passed again over its full rows."""
    model = make_lora(make_model("llama"))
    with register_str_hook(
        model, anchor_cfg(tmp_path, "mse", "separate"), tokens=tokens, tokenizer=tokenizer
    ) as handle:
        anchors = handle.anchors
        assert anchors is not None and anchors.reference is not None
        honest = anchors.reference.clone()
        ends = anchors_module.end_token_ids(tokenizer, model)
        anchors.build_openings(handle.tap, model, OPENING, ends)
        assert anchors._decoded is not None
        anchors._decoded[1][0].add_(1.0)  # the first anchor's values: the checked batch
        torch.testing.assert_close(anchors.compute_reference(handle.tap, model), honest)
        anchors.build_openings(handle.tap, model, OPENING, ends, coarse="kl")
        # Values of another form than the reference's are never used (kl buckets for an mse reference).
        torch.testing.assert_close(anchors.compute_reference(handle.tap, model), honest)


def test_coarse_logprobs_are_a_distribution_over_k_plus_one_buckets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 40) * 3
    ids = torch.tensor([3, 17, 29])
    coarse = coarse_logprobs(logits, ids)
    probs = torch.softmax(logits, dim=-1)
    expected_rest = probs.sum(-1) - probs[:, ids].sum(-1)
    torch.testing.assert_close(coarse[:, :3].exp(), probs[:, ids])
    torch.testing.assert_close(coarse[:, 3].exp(), expected_rest)
    torch.testing.assert_close(coarse.exp().sum(-1), torch.ones(5))
    # Safety tokens holding nearly all the mass: the rest bucket stays finite and accurate.
    peaked = torch.full((1, 40), -60.0)
    peaked[0, ids] = 0.0
    rest = coarse_logprobs(peaked, ids)[0, 3]
    assert torch.isfinite(rest) and float(rest) == pytest.approx(
        -60.0 + torch.log(torch.tensor(37 / 3)).item(), abs=1e-4
    )
    # The low-memory form (training positions) agrees where the rest mass is above fp32 resolution, and is
    # clamped to about 1e-7 below it.
    torch.testing.assert_close(coarse_logprobs(logits, ids, low_memory=True), coarse, rtol=1e-4, atol=1e-4)
    low = float(coarse_logprobs(peaked, ids, low_memory=True)[0, 3])
    assert -17.0 < low < -15.0


def test_unchanged_model_has_zero_kl_and_separate_equals_folded_term(
    tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    model = make_model("qwen2")  # full fine-tuning: the reference is the model at attach
    batch = make_batch(tokenizer, n=2)
    values = {}
    for placement in ("separate", "folded"):
        with register_str_hook(
            model, anchor_cfg(tmp_path, "kl", placement), tokens=tokens, tokenizer=tokenizer
        ) as h:
            model.train()
            model(**h.prepare_batch(batch))
            values[placement] = float(h.loss())
    assert values["separate"] == pytest.approx(0.0, abs=1e-6)
    assert values["folded"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"penalty": {"form": "kl"}, "reference": {"source": "cache", "cache_path": "x.safetensors"}},
            "cache",
        ),
        (
            {"reference": {"source": "anchors", "benign_anchors_path": "b.txt", "benign_weight": 0.0}},
            "benign_weight",
        ),
        ({"reference": {"source": "anchors", "anchor_tokens": 0}}, "anchor_tokens"),
        ({"reference": {"source": "adapter", "anchor_tokens": 2}}, "anchor_tokens"),
        ({"reference": {"source": "adapter", "benign_weight": 0.5}}, "benign_weight"),
        ({"reference": {"source": "anchors", "benign_weight": -1.0}}, "benign_weight"),
        ({"penalty": {"form": "kl", "margin": 0.5}}, "margin"),
    ],
)
def test_bad_combinations_are_refused_with_the_fix(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        STRConfig.model_validate(settings)


def test_kl_at_training_positions_without_logits_says_what_to_use(tokenizer: Any, tokens: Any) -> None:
    """A forward that builds no logits (a fused loss): `kl` at training positions cannot work and says so at
    attach; at anchors it works, because the softmax is taken from hidden states at the anchors only."""
    model = make_lora(make_model("llama"))
    drop_logits(model)
    with pytest.raises(STRAttachError, match="source 'anchors'"):
        register_str_hook(
            model, {"penalty": {"form": "kl"}, "reference": {"source": "adapter"}}, tokens=tokens
        )
    cfg = {"penalty": {"form": "kl"}, "reference": {"source": "anchors", "anchor_batch_size": 2}}
    with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
        model(**make_batch(tokenizer, n=2))
        assert float(handle.loss()) > 0


def test_default_benign_anchors_are_not_xstest_prompts() -> None:
    ours = {text.strip().lower() for text in default_texts("benign_anchors")}
    assert len(ours) >= 50
    path = SHARED / "xstest" / "xstest_prompts.csv"
    if not path.is_file():
        pytest.skip("../shared/data is not beside this checkout")
    with path.open(encoding="utf-8") as handle:
        xstest = {row["prompt"].strip().lower() for row in csv.DictReader(handle)}
    assert not ours & xstest


@pytest.mark.parametrize("screened", [False, True], ids=["every-row", "screened"])
def test_rows_beside_anchors_add_the_gated_training_position_kl(
    tmp_path: Path, tokenizer: Any, tokens: Any, screened: bool
) -> None:
    """`reference.rows: adapter`: the handle's term is the anchors' term (as alone) plus the coarse KL at the
    batch's supervised positions where the adapter-disabled reference's safety mass is >= the gate, over the
    supervised positions (the micro-batch mean without a normalizer); values and gradients against the hand
    computation, and each part against `loss_parts`. Screened (`reference.screen_mass`, no audit), only the
    rows where the trained model's own safety mass reaches the screen at some supervised position count."""
    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=3, seed=7)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    supervised = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    supervised[:, :-1] = batch["labels"][:, 1:] != -100
    with torch.no_grad(), model.disable_adapter():
        reference_logits = model(**inputs).logits.float()
    mass = torch.softmax(reference_logits, -1)[..., tokens.ids].sum(-1)
    # A tiny random model never "refuses": a gate between the two middle masses passes half the positions
    # (midway, so that rounding cannot move a position across it).
    ordered = mass[supervised].sort().values
    middle = len(ordered) // 2
    gate = float(ordered[middle - 1] + ordered[middle]) / 2
    gated = supervised & (mass >= gate)
    assert 0 < int(gated.sum()) < int(supervised.sum())
    screen: dict[str, float] = {}
    if screened:
        with torch.no_grad():
            policy_logits = model(**inputs).logits.float()
        row_mass = torch.where(supervised, torch.softmax(policy_logits, -1)[..., tokens.ids].sum(-1), 0).amax(
            1
        )
        # Between the rows' two highest masses: the screen keeps one or two rows, and one of them gated.
        ranked = row_mass.sort(descending=True).values
        screen = {"screen_mass": float(ranked[0] + ranked[1]) / 2, "audit_share": 1e-9}
        kept = gated & (row_mass >= screen["screen_mass"]).unsqueeze(1)
        if not 0 < int(kept.sum()) < int(gated.sum()):
            screen["screen_mass"] = float(ranked[1] + ranked[2]) / 2
            kept = gated & (row_mass >= screen["screen_mass"]).unsqueeze(1)
        assert 0 < int(kept.sum()) < int(gated.sum())  # the screen changes the term: the check is not vacuous
        gated = kept
        referenced = float((row_mass >= screen["screen_mass"]).float().mean())

    cfg = anchor_cfg(tmp_path, "kl", "separate", rows="adapter", **screen)
    cfg["penalty"]["min_reference_mass"] = gate
    with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
        out = model(**batch)
        parts = handle.loss_parts()
        assert parts.anchors is not None and parts.rows is not None
        (out.loss + parts.anchors + parts.rows).backward()
        ours = grads(model)
        metrics = handle.metrics()
    assert metrics["rows/positions"] == int(supervised.sum())
    assert {"penalty", "rows/penalty", "drift", "rows/drift"} <= set(metrics)
    if screened:
        assert metrics["rows/referenced"] == pytest.approx(referenced)  # the reference ran on those rows only

    plain = model(**batch)
    anchors = COEF * anchor_penalty_by_hand(model, tokenizer, tokens, "kl", {})
    policy_logits = model(**inputs).logits.float()
    rows = torch.zeros(())
    for r, t in gated.nonzero().tolist():
        rows = rows + point_penalty(
            policy_logits[r, t], reference_logits[r, t], tokens.ids, tokens.weights, "kl"
        )
    rows = COEF * rows / int(supervised.sum())
    (ce_by_hand(plain.logits, batch["labels"]) + anchors + rows).backward()
    theirs = grads(model)
    assert float(rows.detach()) > 1e-7  # the adapters moved the rows: the check is not vacuous
    assert float(parts.anchors.detach()) == pytest.approx(float(anchors.detach()), rel=1e-4)
    assert float(parts.rows.detach()) == pytest.approx(float(rows.detach()), rel=1e-4)
    assert_grads_close(ours, theirs, rtol=5e-5)


def test_rows_need_adapters() -> None:
    model = make_model("llama")
    with pytest.raises(STRAttachError, match=r"`reference.rows` is 'adapter' but .* no PEFT adapters"):
        register_str_hook(model, {"reference": {"rows": "adapter"}})


def test_a_micro_batch_with_both_terms_non_finite_counts_once(
    tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    """Anchors and rows both NaN in one micro-batch: one skipped micro-batch, not two."""
    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=2, seed=7)
    cfg = anchor_cfg(tmp_path, "kl", "separate", rows="adapter")
    cfg["penalty"]["on_nonfinite"] = "skip"
    with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
        # NaN only while training: the attach-time checks and the adapter-disabled reference stay finite.
        hook = model.base_model.model.model.norm.register_forward_hook(
            lambda module, args, output: output * float("nan") if torch.is_grad_enabled() else output
        )
        try:
            model(**batch)
            parts = handle.loss_parts()
        finally:
            hook.remove()
        assert float(parts.anchors.detach()) == 0.0 and float(parts.rows.detach()) == 0.0
        with pytest.warns(RuntimeWarning, match=r"1 micro-batch"):
            assert handle.check_step() == 1
        assert handle.metrics()["skipped"] == 1
