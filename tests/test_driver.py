"""The normalization contract of `STRHandle.loss()` in a plain loop, and `StepDriver`, the per-step
contract every trainer adapter uses (scaling, metrics, schedule), checked against hand computations."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers.factory import make_batch, make_lora, make_model

from str_hooks import STRConfigError, register_str_hook
from str_hooks.driver import STEP_KEYS, HostNormalization, StepDriver

SOURCES = ["adapter", "anchors"]


def _config(source: str) -> dict[str, Any]:
    reference: dict[str, Any] = {"source": source}
    if source == "anchors":
        reference["anchor_batch_size"] = 4
    return {"coef": 5.0, "reference": reference}


def _drifted(seed: int = 0) -> Any:
    """A LoRA model whose adapters are not zero, so that the penalty and its gradient are not zero."""
    model = make_lora(make_model("llama"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.train()


def _grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("source", SOURCES)
def test_plain_loop_with_accumulation_equals_one_batch(source: str, tokenizer: Any, tokens: Any) -> None:
    # Two micro-batches holding the same rows: the one batch's token mean is then the mean of the two
    # micro-batch means, so one step over both must equal one step over the batch they make up.
    half = make_batch(tokenizer, n=2)
    full = {k: torch.cat([v, v]) for k, v in half.items()}
    model = _drifted()

    def one_step(micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        accumulation = len(micro_batches)
        with register_str_hook(model, _config(source), tokens=tokens, tokenizer=tokenizer) as handle:
            for batch in micro_batches:  # the README's loop
                out = model(**batch)
                loss = out.loss / accumulation + handle.loss(accumulation_steps=accumulation)
                loss.backward()
        return _grads(model)

    expected, accumulated = one_step([full]), one_step([half, half])
    assert expected.keys() == accumulated.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-5, atol=1e-7)


def test_accumulation_steps_must_be_positive(tokenizer: Any, tokens: Any) -> None:
    model = _drifted()
    with register_str_hook(model, _config("adapter"), tokens=tokens) as handle:
        model(**make_batch(tokenizer, n=2))
        with pytest.raises(STRConfigError, match="`accumulation_steps` must be >= 1, got 0"):
            handle.loss(accumulation_steps=0)


@pytest.mark.parametrize("source", SOURCES)
def test_driver_scales_like_the_host(source: str, tokenizer: Any, tokens: Any) -> None:
    """Each host scaling against the handle's own term for the same forward, on a fresh handle each."""
    batch = make_batch(tokenizer, n=2)
    model = _drifted()
    token_factor = {"anchors": 1.0, "adapter": 2.0}[source]  # `token_scale` is for token terms only
    cases = [
        # (the host's scaling, the handle's term it must equal)
        (HostNormalization(accumulation_steps=4, host_divides_by=4), {}, 4.0 if source == "anchors" else 1.0),
        (HostNormalization(accumulation_steps=4), {}, 1.0 if source == "anchors" else 0.25),
        (HostNormalization(7, accumulation_steps=4, token_scale=2), {"num_items_in_batch": 7}, token_factor),
    ]
    for normalization, loss_kwargs, factor in cases:
        with register_str_hook(model, _config(source), tokens=tokens, tokenizer=tokenizer) as handle:
            driver = StepDriver(handle)
            model(**batch)
            got = driver.penalty(normalization)
            assert driver.term_computed
        with register_str_hook(model, _config(source), tokens=tokens, tokenizer=tokenizer) as handle:
            model(**batch)
            reference = handle.loss(**loss_kwargs) * factor
        assert float(reference) > 0
        torch.testing.assert_close(got, reference)


@pytest.mark.parametrize("source", SOURCES)
def test_driver_metrics_one_key_set_per_optimizer_step(source: str, tokenizer: Any, tokens: Any) -> None:
    batch = make_batch(tokenizer, n=2)
    model = _drifted()
    cfg = {**_config(source), "logging": {"prefix": "s/", "top_tokens": 3}}
    with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
        driver = StepDriver(handle)
        normalization = HostNormalization(accumulation_steps=2, host_divides_by=2)
        terms = []
        for _ in range(2):  # one optimizer step of two micro-batches
            model(**batch)
            terms.append(float(driver.penalty(normalization)))
        driver.end_step()
        assert handle.step_count == 1
        step = driver.log_metrics()
        # `penalty` is the term in the step's loss: what the host keeps after dividing by 2.
        assert step["s/penalty"] == pytest.approx(sum(terms) / 2, rel=1e-6)
        assert {f"s/{k}" for k in STEP_KEYS} <= step.keys()
        assert sum(k.startswith("s/drift/") for k in step) == 3
        # Anchors compute one term per step (the first micro-batch), token sources one per micro-batch.
        assert terms[1] == 0.0 if source == "anchors" else terms[1] > 0.0
        assert driver.log_metrics() == {}  # the window closed
        # Over a window of several steps: means, except `skipped`, a running count, which is its latest.
        for _ in range(3):
            model(**batch)
            driver.penalty(normalization)
            driver.end_step()
        window = driver.log_metrics()
        assert window["s/skipped"] == handle.metrics()["skipped"] == 0.0
        assert window["s/coef"] == pytest.approx(5.0)
