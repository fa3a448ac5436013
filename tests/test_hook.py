"""The hook: projection, reference sources, lifecycle, and attach-time errors."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.configs import decision_point_only, training_positions
from helpers.factory import ARCHITECTURES, drop_logits, make_batch, make_lora, make_model, make_tokenizer

from str_hooks import (
    STRAttachError,
    STRCacheError,
    STRError,
    STRNonFiniteError,
    build_reference_cache,
    mine_safety_tokens,
    register_str_hook,
)
from str_hooks.modules import find_decoder, find_head, unwrap_model
from str_hooks.projection import HeadRows, LogitTransform


def inputs_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("wrap", ["plain", "lora", "lora_head", "modules_to_save"])
def test_projection_equals_logits(arch: str, wrap: str, tokenizer: Any, tokens: Any) -> None:
    model: Any = make_model(arch)
    if wrap == "lora":
        model = make_lora(model)
    elif wrap == "lora_head" and arch != "gpt2":  # GPT-2 ties the head to the embedding
        model = make_lora(model, head="lora")
    elif wrap == "modules_to_save" and arch != "gpt2":
        model = make_lora(model, head="modules_to_save")
    batch = make_batch(tokenizer, n=2)
    causal_lm = unwrap_model(model)
    captured: dict[str, torch.Tensor] = {}
    decoder = find_decoder(causal_lm)
    hook = decoder.register_forward_hook(lambda m, a, o: captured.update(h=o.last_hidden_state))
    model.eval()
    with torch.no_grad():
        logits = model(**inputs_of(batch)).logits
    hook.remove()
    rows = HeadRows(find_head(causal_lm), tokens.ids, LogitTransform.from_config(causal_lm.config))
    projected = rows.project(captured["h"])
    torch.testing.assert_close(projected, logits[..., tokens.ids].float(), rtol=1e-5, atol=1e-5)
    if arch == "gemma2":
        assert rows.transform.softcap == 2.0
        assert logits.abs().max() < 2.0  # the softcap is active, so a missed transform would be caught


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_reference_equals_frozen_copy(arch: str, tokenizer: Any, tokens: Any) -> None:
    base = make_model(arch)
    frozen = copy.deepcopy(base).requires_grad_(False)
    model = make_lora(base)
    batch = make_batch(tokenizer, n=4)
    results = []
    for source, ref in (("adapter", None), ("model", frozen)):
        with register_str_hook(
            model, {"reference": {"source": source}}, tokens=tokens, reference_model=ref
        ) as h:
            model(**batch)
            loss = h.loss()
            loss.backward()
            results.append(
                (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
            )
            model.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_m, grads_m) = results
    assert loss_a > 0
    torch.testing.assert_close(loss_a, loss_m, rtol=1e-6, atol=0)
    for ga, gm in zip(grads_a, grads_m, strict=True):
        torch.testing.assert_close(ga, gm, rtol=1e-5, atol=1e-7)


def test_reference_model_on_another_dtype(tokenizer: Any, tokens: Any) -> None:
    base = make_model("llama")
    frozen = copy.deepcopy(base).to(torch.bfloat16).requires_grad_(False)
    model = make_lora(base)
    batch = make_batch(tokenizer, n=2)
    with register_str_hook(model, {"reference": {"source": "adapter"}}, tokens=tokens) as h:
        model(**batch)
        exact = h.loss()
    with register_str_hook(
        model, {"reference": {"source": "model"}}, tokens=tokens, reference_model=frozen
    ) as h:
        model(**batch)
        approx = h.loss()
    torch.testing.assert_close(approx, exact, rtol=5e-2, atol=1e-3)


def test_cache_reference_equals_live(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    base = make_model("llama")
    model = make_lora(base)
    batch = make_batch(tokenizer, n=6, seed=5)
    sequences = [
        {"input_ids": ids, "attention_mask": mask}
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    path = build_reference_cache(
        model, tokens, sequences, tmp_path / "ref.safetensors", batch_size=4, progress=False
    )
    with register_str_hook(model, {"reference": {"source": "adapter"}}, tokens=tokens) as h:
        model(**batch)
        live = h.loss()
    cfg = {"reference": {"source": "cache", "cache_path": str(path)}}
    with register_str_hook(model, cfg, tokens=tokens) as h:
        # Batch order and padding width differ from the build: examples are keyed by their ids.
        order = [5, 3, 1, 0, 2, 4]
        shuffled = {k: v[order] for k, v in batch.items()}
        model(**shuffled)
        cached = h.loss()
    torch.testing.assert_close(cached, live, rtol=2e-3, atol=1e-4)  # fp16 storage


def test_cache_errors(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=3)
    seqs = [
        ids[mask.bool()].tolist()
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    path = build_reference_cache(model, tokens, seqs[:2], tmp_path / "c.safetensors", progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_reference_cache(model, tokens, seqs, path, progress=False)
    # An example missing from the cache is an error at train time, never a silent zero: loss() looks up on
    # the device without a host read (the missing example's rows are left out), and the step raises.
    with register_str_hook(
        model, {"reference": {"source": "cache", "cache_path": str(path)}}, tokens=tokens
    ) as h:
        model(**batch)
        assert torch.isfinite(h.loss())
        with pytest.raises(
            STRCacheError, match="1 example\\(s\\) of this optimizer step are not in the reference cache"
        ):
            h.step()
        model(**{k: v[:2] for k, v in batch.items()})  # the two cached examples: found, a real term
        assert float(h.loss()) > 0.0
        h.step()
    # Another token set.
    other_tokens = mine_safety_tokens(tokenizer, k=8)
    with pytest.raises(STRCacheError, match="safety tokens"):
        register_str_hook(
            model, {"reference": {"source": "cache", "cache_path": str(path)}}, tokens=other_tokens
        )
    # Another model.
    other = make_lora(make_model("llama", seed=9))
    with pytest.raises(STRCacheError, match="another model"):
        register_str_hook(other, {"reference": {"source": "cache", "cache_path": str(path)}}, tokens=tokens)
    # Truncated and malformed files.
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(STRCacheError, match="truncated"):
        register_str_hook(
            model, {"reference": {"source": "cache", "cache_path": str(truncated)}}, tokens=tokens
        )
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not a cache")
    with pytest.raises(STRCacheError, match="cannot be read"):
        register_str_hook(
            model, {"reference": {"source": "cache", "cache_path": str(garbage)}}, tokens=tokens
        )
    with pytest.raises(STRCacheError, match="does not exist"):
        register_str_hook(
            model, {"reference": {"source": "cache", "cache_path": str(tmp_path / "nope")}}, tokens=tokens
        )
    # A safetensors file that is not a str-hooks cache.
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(STRCacheError, match="not a str-hooks reference cache"):
        register_str_hook(
            model, {"reference": {"source": "cache", "cache_path": str(foreign)}}, tokens=tokens
        )
    assert not hasattr(unwrap_model(model), "_str_hooks_handle")


def _hook_counts(model: torch.nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


@pytest.mark.parametrize("source", ["adapter", "anchors"])
def test_remove_restores_the_model(tmp_path: Path, source: str, tokenizer: Any, tokens: Any) -> None:
    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=2)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits.clone()
    keys_before = list(model.state_dict())
    hooks_before = _hook_counts(model)
    model.save_pretrained(tmp_path / "before")
    model.train()
    handle = register_str_hook(model, {"reference": {"source": source}}, tokens=tokens, tokenizer=tokenizer)
    assert _hook_counts(model) != hooks_before
    model(**batch)
    handle.loss().backward()
    model.zero_grad(set_to_none=True)
    handle.remove()
    handle.remove()  # idempotent
    model.eval()
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after)
    assert list(model.state_dict()) == keys_before
    assert _hook_counts(model) == hooks_before
    assert not hasattr(unwrap_model(model), "_str_hooks_handle")
    assert all(m.training is False for m in model.modules())
    model.save_pretrained(tmp_path / "after")
    assert sorted(p.name for p in (tmp_path / "before").iterdir()) == sorted(
        p.name for p in (tmp_path / "after").iterdir()
    )
    with pytest.raises(STRError, match="removed"):
        handle.loss()


def test_attach_twice_is_an_error_and_context_manager_detaches(tokens: Any) -> None:
    model = make_lora(make_model("llama"))
    with (
        register_str_hook(model, training_positions(), tokens=tokens),
        pytest.raises(STRAttachError, match="already has an STR hook"),
    ):
        register_str_hook(model, training_positions(), tokens=tokens)
    register_str_hook(model, training_positions(), tokens=tokens).remove()  # detached by the with block


def test_failed_attach_leaves_nothing_behind(tokens: Any) -> None:
    model = make_lora(make_model("llama"))
    hooks_before = _hook_counts(model)
    # The projection check runs after the hooks are registered; its failure must remove them.
    with pytest.raises(STRAttachError, match="differ"):
        register_str_hook(model, tokens=tokens, head=lambda m: m.model.embed_tokens)
    assert _hook_counts(model) == hooks_before
    assert not hasattr(unwrap_model(model), "_str_hooks_handle")


def test_penalty_only_in_training_mode(tokenizer: Any, tokens: Any) -> None:
    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=2)
    with register_str_hook(model, training_positions(), tokens=tokens) as h:
        model.eval()
        with torch.no_grad():  # an evaluation: no warning
            model(**batch)
        assert float(h.loss()) == 0.0
        model.train()
        model(**batch)
        assert float(h.loss()) > 0.0
        with pytest.raises(STRError, match="no forward pass"):
            h.loss()


def test_a_training_step_on_an_eval_mode_model_warns_once(tokenizer: Any, tokens: Any) -> None:
    # What a new user does: from_pretrained (eval mode), get_peft_model (a wrapper reporting training=True
    # over eval-mode modules), forward with gradients, backward. The penalty is 0 there; say so once.
    base = make_model("llama").eval()
    model = make_lora(base)
    assert model.training and not base.training
    batch = make_batch(tokenizer, n=2)
    with register_str_hook(model, training_positions(), tokens=tokens) as h:
        model(**batch)
        with pytest.warns(RuntimeWarning, match=r"eval mode.*model\.train\(\)"):
            assert float(h.loss()) == 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(**batch)
            assert float(h.loss()) == 0.0  # warned once, not every step
        model.train()
        model(**batch)
        assert float(h.loss()) > 0.0


def test_supervised_positions_need_labels(tokenizer: Any, tokens: Any) -> None:
    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=2)
    with register_str_hook(model, training_positions(), tokens=tokens) as h:
        model(**inputs_of(batch))
        with pytest.raises(STRError, match="needs labels"):
            h.loss()
        model(**inputs_of(batch))
        with_labels = h.loss(labels=batch["labels"])
        model(**batch)
        torch.testing.assert_close(with_labels, h.loss())


def test_attach_errors(tokenizer: Any, tokens: Any) -> None:
    plain = make_model("llama")
    with pytest.raises(STRAttachError, match="no PEFT adapters"):
        register_str_hook(plain, {"reference": {"source": "adapter"}}, tokens=tokens)
    with pytest.raises(STRAttachError, match="no reference model was given"):
        register_str_hook(plain, {"reference": {"source": "model"}}, tokens=tokens)
    with pytest.raises(STRAttachError, match="no tokenizer"):
        register_str_hook(make_lora(make_model("llama")))
    small = make_model("llama", vocab_size=64)
    with pytest.raises(STRAttachError, match="outside the head"):
        register_str_hook(small, {"reference": {"source": "anchors"}}, tokens=tokens, tokenizer=tokenizer)

    class Headless(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(4, 4)

    with pytest.raises(STRAttachError, match=r"could not find the decoder.*decoder="):
        register_str_hook(
            Headless(), {"reference": {"source": "anchors"}}, tokens=tokens, tokenizer=tokenizer
        )
    with pytest.raises(STRAttachError, match=r"could not find the LM head.*head="):
        register_str_hook(
            Headless(),
            {"reference": {"source": "anchors"}},
            tokens=tokens,
            tokenizer=tokenizer,
            decoder="body",
        )
    with pytest.raises(STRAttachError, match="no attribute path 'nope'"):
        register_str_hook(make_lora(make_model("llama")), tokens=tokens, decoder="nope")
    # A projection that does not match the logits (here: the head named wrongly) is caught at attach.
    with pytest.raises(STRAttachError, match="differ"):
        register_str_hook(make_lora(make_model("llama")), tokens=tokens, head=lambda m: m.model.embed_tokens)


def test_logprob_where_logits_are_never_built(tokens: Any) -> None:
    model = make_lora(make_model("llama"))
    drop_logits(model)
    with pytest.raises(STRAttachError, match="builds no logits"):
        register_str_hook(model, training_positions({"penalty": {"form": "logprob"}}), tokens=tokens)


@pytest.mark.parametrize("action", ["raise", "skip"])
def test_nonfinite_logits(action: str, tokenizer: Any, tokens: Any) -> None:
    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=2)
    with register_str_hook(
        model, training_positions({"penalty": {"on_nonfinite": action}}), tokens=tokens
    ) as h:
        with torch.no_grad():
            unwrap_model(model).lm_head.weight[tokens.ids[0], 0] = float("nan")
        model(**batch)
        # loss() never reads a device value (no host sync): the micro-batch's term is 0, and the decision is
        # taken by the one read per optimizer step (check_step(), which step() runs if nobody did).
        assert float(h.loss()) == 0.0
        if action == "raise":
            with pytest.raises(STRNonFiniteError, match="on_nonfinite: skip"):
                h.step()
        else:
            with pytest.warns(RuntimeWarning, match="skip this optimizer step"):
                h.step()
            metrics = h.metrics()
            assert metrics["skipped"] == 1.0 and "penalty" not in metrics
            assert h.metrics()["skipped"] == 1.0  # counted once


def test_skip_drops_the_steps_gradients(tokenizer: Any, tokens: Any) -> None:
    """`on_nonfinite: skip` through the driver: a non-finite forward can put NaN into every gradient, so the
    step's gradients are dropped before the optimizer step (which then changes nothing); a finite step keeps
    them."""
    from str_hooks.driver import HostNormalization, StepDriver

    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with register_str_hook(
        model, training_positions({"penalty": {"on_nonfinite": "skip"}}), tokens=tokens
    ) as h:
        driver = StepDriver(h)
        out = model(**batch)
        (out.loss + driver.penalty(HostNormalization())).backward()
        driver.before_optimizer_step(optimizer)
        assert all(p.grad is not None for p in optimizer.param_groups[0]["params"])
        driver.end_step()
        with torch.no_grad():
            unwrap_model(model).lm_head.weight[tokens.ids[0], 0] = float("nan")
        out = model(**batch)
        (out.loss + driver.penalty(HostNormalization())).backward()
        with pytest.warns(RuntimeWarning, match="skip this optimizer step"):
            driver.before_optimizer_step(optimizer)
        assert all(p.grad is None for p in optimizer.param_groups[0]["params"])
        driver.end_step()
        assert driver.log_metrics()["str/skipped"] == 1.0


def test_anchors_reference_and_schedule(tokenizer: Any, tokens: Any) -> None:
    model = make_model("llama")  # full fine-tuning: the reference is the model at attach
    # The hand-written expectation below is mse at the decision point, coef 1.
    cfg = decision_point_only({"coef": 1.0, "reference": {"anchor_batch_size": 4, "anchor_every": 2}})
    with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as h:
        assert h.anchors is not None and h.anchors.reference is not None
        assert h.anchors.reference.shape == (len(h.anchors), tokens.k) and len(h.anchors) >= 100
        model.train()
        model(input_ids=torch.tensor([[5, 6, 7]]))
        assert float(h.loss()) == pytest.approx(0.0, abs=1e-10)  # unchanged model: no drift
        assert float(h.loss()) == 0.0  # once per optimizer step
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        h.step()
        assert float(h.loss()) == 0.0  # step 1: not due (every 2)
        h.step()
        loss = h.loss()
        assert float(loss) > 0 and loss.requires_grad
        # Independent check: decision-point logits of the same anchors, by hand.
        indices = h.anchors.batch_indices(4)
        ids = [h.anchors.encoded[i] for i in indices]
        logits = torch.stack([model(input_ids=torch.tensor([x])).logits[0, -1, tokens.ids] for x in ids])
        d = logits - h.anchors.reference[indices]
        expected = (d.square() * torch.tensor(tokens.weights)).sum() / 4
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_warmup_and_state_dict_resume(tokenizer: Any, tokens: Any) -> None:
    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=2)
    cfg = training_positions({"coef": 2.0, "warmup_steps": 4})
    with register_str_hook(model, cfg, tokens=tokens) as h:
        values = []
        for _ in range(6):
            model(**batch)
            values.append(float(h.loss()))
            h.step()
        state = h.state_dict()
    assert values[0] == 0.0
    ratios = [v / values[5] for v in values]
    assert ratios == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0], rel=1e-5)
    with register_str_hook(model, cfg, tokens=tokens) as resumed:
        resumed.load_state_dict(state)
        assert resumed.step_count == 6 and resumed.current_coef() == 2.0
    other = mine_safety_tokens(tokenizer, k=5)
    with register_str_hook(model, cfg, tokens=other) as h2, pytest.raises(STRError, match="same tokens"):
        h2.load_state_dict(state)


def test_metrics_are_plain_floats(tokenizer: Any, tokens: Any) -> None:
    model = make_lora(make_model("llama"))
    with register_str_hook(model, training_positions({"logging": {"top_tokens": 2}}), tokens=tokens) as h:
        assert set(h.metrics()) == {"coef", "skipped", "step"}
        model(**make_batch(tokenizer, n=2))
        h.loss()
        m = h.metrics()
    assert all(type(v) is float for v in m.values())
    assert {"penalty", "drift", "abs_drift", "pen_mean", "positions"} <= set(m)
    assert len([k for k in m if k.startswith("drift/")]) == 2


def test_penalty_reduces_drift_in_training(tokenizer: Any, tokens: Any) -> None:
    """Fine-tuning with a large coef keeps the safety logits far closer to the reference than coef=0."""
    drifts = {}
    for coef in (0.0, 20.0):
        model = make_lora(make_model("llama"), seed=1)
        with torch.no_grad():  # start at the reference
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        batch = make_batch(tokenizer, n=4, seed=11)
        with register_str_hook(model, training_positions({"coef": coef}), tokens=tokens) as h:
            for _ in range(25):
                out = model(**batch)
                (out.loss + h.loss()).backward()
                opt.step()
                opt.zero_grad()
                h.step()
            model(**batch)
            h.loss()
            drifts[coef] = h.metrics()["abs_drift"]
    print("abs drift after 25 steps:", drifts)
    assert drifts[0.0] > 0.5, drifts
    assert drifts[20.0] < 0.25 * drifts[0.0], drifts


def test_from_pretrained_local_paths(tmp_path: Path, tokenizer: Any) -> None:
    """The real loading code on local paths: a saved model and tokenizer, mined tokens file, and
    `reference.model_path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_model("qwen2").save_pretrained(tmp_path / "aligned")
    tokenizer.save_pretrained(tmp_path / "aligned")
    tok = AutoTokenizer.from_pretrained(tmp_path / "aligned")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned")
    tokens = mine_safety_tokens(tok, k=6)
    tokens.save(tmp_path / "tokens.json")
    cfg = {
        "tokens": {"path": str(tmp_path / "tokens.json")},
        "reference": {"source": "model", "model_path": str(tmp_path / "aligned")},
    }
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with register_str_hook(model, cfg, tokenizer=tok) as h:
        assert h.tokens.ids == tokens.ids
        model.train()
        model(**make_batch(tok, n=2))
        assert float(h.loss()) > 0
    other_tok = make_tokenizer(vocab_size=400)
    with pytest.raises(Exception, match="another tokenizer"):
        register_str_hook(model, cfg, tokenizer=other_tok)


def test_bf16_model(tokenizer: Any, tokens: Any) -> None:
    """A bf16 model attaches (the projection check allows bf16 rounding) and gives a finite penalty."""
    model = make_lora(make_model("qwen2").to(torch.bfloat16))
    batch = make_batch(tokenizer, n=2)
    with register_str_hook(model, training_positions(), tokens=tokens) as h:
        assert h.projection_verified is True
        out = model(**batch)
        loss = h.loss()
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and float(loss) > 0
        (out.loss + loss).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_wrapper_calling_forward_directly_is_never_a_silent_zero(tokenizer: Any, tokens: Any) -> None:
    """PEFT <= 0.20 (task_type CAUSAL_LM) calls `causal_lm.forward(...)` directly, so the causal LM's hooks
    do not fire. The decoder's pre-hook starts a fresh capture: the penalty needs the labels passed to
    loss(), and then equals the normal path's; without them it is an error, never a silent zero."""
    model = make_lora(make_model("llama"))
    causal_lm = unwrap_model(model)
    batch = make_batch(tokenizer, n=3)
    with register_str_hook(model, training_positions(), tokens=tokens) as h:
        model(**batch)
        expected = h.loss()
        causal_lm.forward(**batch)  # as PEFT <= 0.20 does: no module __call__, no causal-LM hooks
        with pytest.raises(STRError, match="needs labels"):
            h.loss()
        causal_lm.forward(**batch)
        torch.testing.assert_close(h.loss(labels=batch["labels"]), expected)
