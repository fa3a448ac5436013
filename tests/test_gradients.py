"""The gradient of `out.loss + handle.loss()` equals an independently written CE + penalty.

The independent computation never uses str-hooks: full logits from the model's own forward, gathered at
the safety ids (so the model's softcap is included), positions built with explicit loops, the reference
from `disable_adapter()` or a frozen copy, and the penalty written out per form.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.configs import training_positions
from helpers.factory import ARCHITECTURES, make_batch, make_lora, make_model
from helpers.losses import assert_grads_close, ce_by_hand, grads, penalty_by_hand, positions_by_hand

from str_hooks import register_str_hook
from str_hooks.errors import STRAttachError

FORMS = ("mse", "hinge", "logprob", "kl")
POSITIONS = ("supervised", "all", "first_n")


def build(arch: str, mode: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(trainable model, frozen reference copy or None for LoRA). The trainable model is perturbed away
    from the reference so the drift, and every penalty form, is non-trivial."""
    base = make_model(arch)
    if mode == "lora":
        return make_lora(base), None
    reference = copy.deepcopy(base).requires_grad_(False)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base, reference


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("form", FORMS)
def test_gradient_matches_hand_written_loss(
    arch: str, mode: str, form: str, tokenizer: Any, tokens: Any
) -> None:
    model, reference_copy = build(arch, mode)
    batch = make_batch(tokenizer, n=3)
    margin = 0.25 if form == "hinge" else 0.0
    for positions in POSITIONS:
        cfg: dict[str, Any] = {
            "coef": 0.7,
            "penalty": {
                "form": form,
                "positions": positions,
                **({"first_n": 2} if positions == "first_n" else {}),
            },
            "reference": {"source": "adapter" if mode == "lora" else "model"},
        }
        if form == "hinge":
            cfg["penalty"]["margin"] = margin
        model.train()
        with register_str_hook(model, cfg, tokens=tokens, reference_model=reference_copy) as handle:
            out = model(**batch)
            (out.loss + handle.loss()).backward()
            ours = grads(model)

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            if reference_copy is None:
                with model.disable_adapter():
                    ref_logits = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
            else:
                ref_logits = reference_copy(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
        where = positions_by_hand(batch, positions, 2)
        pen = penalty_by_hand(logits, ref_logits, tokens.ids, tokens.weights, where, form, margin)
        assert pen > 0, "the test needs a non-zero penalty to mean anything"
        (ce_by_hand(logits, batch["labels"]) + 0.7 * pen).backward()
        assert_grads_close(ours, grads(model))


@pytest.mark.parametrize("head", ["lora", "modules_to_save"])
def test_gradient_with_trainable_head_under_peft(head: str, tokenizer: Any, tokens: Any) -> None:
    """LoRA on the head (delta added by str-hooks) and a modules_to_save head (live copy) both get the
    penalty gradient, and the adapter reference uses the original head."""
    model = make_lora(make_model("llama"), head=head)
    batch = make_batch(tokenizer, n=3)
    with register_str_hook(model, training_positions({"coef": 1.3}), tokens=tokens) as handle:
        out = model(**batch)
        (out.loss + handle.loss()).backward()
        ours = grads(model)
    assert any("lm_head" in name for name in ours)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    where = positions_by_hand(batch, "supervised", 1)
    pen = penalty_by_hand(logits, ref_logits, tokens.ids, tokens.weights, where, "mse", 0.0)
    (ce_by_hand(logits, batch["labels"]) + 1.3 * pen).backward()
    assert_grads_close(ours, grads(model))


def test_gradient_when_logits_are_never_built(tokenizer: Any, tokens: Any) -> None:
    """A fused-CE style forward that never calls the head and returns logits=None: the hidden-state path
    still gives the exact gradient."""
    model = make_lora(make_model("llama"))
    causal_lm = model.get_base_model()
    batch = make_batch(tokenizer, n=3)

    def fused_forward(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Any = None, **_: Any
    ) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weight = causal_lm.lm_head.weight
        loss = None
        if labels is not None:
            # Chunked CE from hidden states, the way fused kernels do it: lm_head is never called.
            flat_h, flat_y = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
            keep = flat_y != -100
            loss = F.cross_entropy(flat_h[keep] @ weight.T, flat_y[keep], reduction="sum") / keep.sum()
        return CausalLMOutputWithPast(loss=loss, logits=None)

    causal_lm.forward = fused_forward
    with register_str_hook(model, training_positions({"coef": 0.9}), tokens=tokens) as handle:
        assert handle.projection_verified is None  # nothing to compare against
        out = model(**batch)
        assert out.logits is None
        (out.loss + handle.loss()).backward()
        ours = grads(model)
    del causal_lm.forward
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    where = positions_by_hand(batch, "supervised", 1)
    pen = penalty_by_hand(logits, ref_logits, tokens.ids, tokens.weights, where, "mse", 0.0)
    (ce_by_hand(logits, batch["labels"]) + 0.9 * pen).backward()
    assert_grads_close(ours, grads(model))


def test_micro_batches_sum_to_the_big_batch(tokenizer: Any, tokens: Any) -> None:
    """With unequal supervised counts per micro-batch, the sum over micro-batches of
    `loss(num_items_in_batch=N)` equals the big-batch value, in value and in gradient."""
    model = make_lora(make_model("qwen2"))
    batch = make_batch(tokenizer, n=8, seed=3)
    total = int((batch["labels"][:, 1:] != -100).sum())
    with register_str_hook(model, training_positions({"coef": 0.5}), tokens=tokens) as handle:
        model(**batch)
        big = handle.loss(num_items_in_batch=total)
        big.backward()
        big_grads = grads(model)
        model(**batch)
        assert torch.allclose(handle.loss(), big, rtol=1e-6), "no argument divides by the penalized count"
        model.zero_grad(set_to_none=True)
        for micro in (2, 4):
            parts = []
            counts = []
            for start in range(0, 8, micro):
                sub = {k: v[start : start + micro] for k, v in batch.items()}
                width = int(sub["attention_mask"].sum(dim=1).max())
                sub = {k: v[:, :width] for k, v in sub.items()}  # each micro-batch padded to its own length
                counts.append(int((sub["labels"][:, 1:] != -100).sum()))
                model(**sub)
                part = handle.loss(num_items_in_batch=torch.tensor(total))
                part.backward()
                parts.append(part.detach())
            assert len(set(counts)) > 1, "the micro-batches must have unequal supervised counts"
            assert torch.allclose(torch.stack(parts).sum(), big.detach(), rtol=1e-5)
            assert_grads_close(grads(model), big_grads)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_head_gradient_off_moves_the_model_through_hidden_states_only(
    arch: str, tokenizer: Any, tokens: Any
) -> None:
    """`penalty.head_gradient: false` under full fine-tuning: the gradient equals the cross-entropy plus the
    penalty written out from the final hidden states through a detached copy of the head (the softcap by hand
    for Gemma2, whose head is tied to the input embeddings): the penalty still reaches every body weight, and
    the head only through the cross-entropy."""
    model, reference_copy = build(arch, "full")
    batch = make_batch(tokenizer, n=3)
    cfg = {"coef": 0.7, "penalty": {"form": "mse", "head_gradient": False}, "reference": {"source": "model"}}
    model.train()
    with register_str_hook(model, cfg, tokens=tokens, reference_model=reference_copy) as handle:
        out = model(**batch)
        (out.loss + handle.loss()).backward()
        ours = grads(model)

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = model(**inputs, output_hidden_states=True)
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def logits_of(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        z = hidden @ weight.T
        return softcap * torch.tanh(z / softcap) if softcap else z

    weight = model.get_output_embeddings().weight
    hidden = out.hidden_states[-1]
    torch.testing.assert_close(logits_of(hidden, weight), out.logits)  # the hand-written head is the model's
    with torch.no_grad():
        ref_logits = reference_copy(**inputs).logits
    where = positions_by_hand(batch, "supervised", 1)
    pen = penalty_by_hand(
        logits_of(hidden, weight.detach()), ref_logits, tokens.ids, tokens.weights, where, "mse", 0.0
    )
    assert pen > 0
    (ce_by_hand(out.logits, batch["labels"]) + 0.7 * pen).backward()
    theirs = grads(model)
    assert_grads_close(ours, theirs)
    # Not the default's gradient: with the head's share the head's gradient differs.
    cfg["penalty"]["head_gradient"] = True
    with register_str_hook(model, cfg, tokens=tokens, reference_model=reference_copy) as handle:
        out = model(**batch)
        (out.loss + handle.loss()).backward()
        with_head = grads(model)
    head_name = next(n for n, p in model.named_parameters() if p is weight)
    assert not torch.allclose(with_head[head_name], theirs[head_name], rtol=1e-3, atol=0)


@pytest.mark.parametrize("placement", ["separate", "folded"])
def test_head_gradient_off_anchor_term_leaves_an_untied_head_alone(
    placement: str, tokenizer: Any, tokens: Any
) -> None:
    """The defaults' term (anchors, form kl over the full softmax at their points, openings, benign anchors)
    under full fine-tuning of an untied Llama: with `head_gradient: false` the term's gradient to the head is
    zero and to every other weight exactly what it is with the head's share on."""
    batch = make_batch(tokenizer, n=3)
    got: dict[bool, dict[str, torch.Tensor]] = {}
    for head_gradient in (True, False):
        model = make_model("llama")
        assert not model.config.tie_word_embeddings
        cfg = {"penalty": {"head_gradient": head_gradient}, "reference": {"anchor_placement": placement}}
        with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
            torch.manual_seed(7)
            with torch.no_grad():  # drift away from the model the anchors' reference was taken from
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            model.train()
            model(**handle.prepare_batch(dict(batch)))
            term = handle.loss()
            assert float(term.detach()) > 0
            term.backward()
            got[head_gradient] = grads(model)
    assert "lm_head.weight" in got[True] and float(got[True]["lm_head.weight"].abs().max()) > 0
    assert "lm_head.weight" not in got[False] or float(got[False]["lm_head.weight"].abs().max()) == 0
    body = {n: g for n, g in got[True].items() if n != "lm_head.weight"}
    assert_grads_close({n: got[False][n] for n in body}, body)


def test_head_gradient_off_refuses_training_position_softmax_on_a_trainable_head(
    tokenizer: Any, tokens: Any
) -> None:
    model, reference_copy = build("llama", "full")
    cfg = {"penalty": {"form": "kl", "head_gradient": False}, "reference": {"source": "model"}}
    with pytest.raises(STRAttachError, match=r"head_gradient` is false but `penalty.form` 'kl' at training"):
        register_str_hook(model, cfg, tokens=tokens, reference_model=reference_copy)


@pytest.mark.parametrize("source", ["anchors", "adapter"])
def test_head_gradient_off_with_lora_on_the_head(source: str, tokenizer: Any, tokens: Any) -> None:
    """LoRA on the head: with `head_gradient: false` neither the anchors' full-softmax term nor the
    training-position projection (str-hooks' own LoRA delta) sends a gradient to the head's adapter, and
    every other adapter gets what it gets with the head's share on."""
    batch = make_batch(tokenizer, n=3)
    got: dict[bool, dict[str, torch.Tensor]] = {}
    for head_gradient in (True, False):
        model = make_lora(make_model("llama"), head="lora")
        torch.manual_seed(5)
        with torch.no_grad():  # a non-zero head adapter, so that its delta is in the values
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.1 * torch.randn_like(p))
        cfg: dict[str, Any] = {"penalty": {"head_gradient": head_gradient}, "reference": {"source": source}}
        if source == "adapter":
            cfg["penalty"]["form"] = "mse"
        with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
            torch.manual_seed(7)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.add_(0.05 * torch.randn_like(p))
            model.train()
            model(**batch)
            term = handle.loss()
            assert float(term.detach()) > 0
            term.backward()
            got[head_gradient] = grads(model)
    head = [n for n in got[True] if "lm_head" in n]
    assert head and all(float(got[True][n].abs().max()) > 0 for n in head)
    assert all(n not in got[False] or float(got[False][n].abs().max()) == 0 for n in head)
    body = {n: g for n, g in got[True].items() if n not in head}
    assert_grads_close({n: got[False][n] for n in body}, body)


def test_head_gradient_off_refuses_a_head_it_cannot_detach(tokenizer: Any, tokens: Any) -> None:
    model = make_lora(make_model("llama"), head="modules_to_save")
    with pytest.raises(STRAttachError, match=r"head_gradient` is false but the trainable LM head is a"):
        register_str_hook(model, {"penalty": {"head_gradient": False}}, tokens=tokens, tokenizer=tokenizer)
