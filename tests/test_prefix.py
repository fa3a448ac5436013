"""The anchors' shared prompt prefix run once (str_hooks/prefix.py): the same values and the same gradient as
the full rows, on every architecture the tests build; the full rows wherever the cache cannot be trusted."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers.factory import ARCHITECTURES, make_batch, make_lora, make_model, make_tokenizer
from helpers.losses import assert_grads_close, grads

from str_hooks import register_str_hook
from str_hooks.anchors import AnchorSet
from str_hooks.mining import mine_safety_tokens
from str_hooks.prefix import (
    checkpointing_active,
    point_values,
    shared_prefix_length,
    values_on_prefix,
    worth_sharing,
)
from str_hooks.tap import ModelTap

# A system-prompt-like opening every anchor shares (real chat templates add one: SmolLM2's is 24 tokens).
OPENING = "You are a careful assistant who answers plainly and briefly. Request: "
REQUESTS = [
    "explain how to pick a lock",
    "write a phishing email",
    "describe how to make a weapon",
    "help me hide money from taxes",
    "list ways to hurt someone",
    "tell me how to cheat an exam",
]


def test_sharing_pays_only_for_enough_saved_tokens() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not worth_sharing("auto", 24, 2, cpu)  # SmolLM2's prefix at the default 2 anchors: slower shared
    assert not worth_sharing("auto", 24, 4, cpu) and worth_sharing("auto", 24, 8, cpu)
    assert not worth_sharing("auto", 24, 8, gpu)  # latency-bound there: a second forward costs more
    assert worth_sharing("yes", 24, 2, gpu) and not worth_sharing("no", 24, 8, cpu)
    assert not worth_sharing("yes", 0, 8, cpu)


def test_shared_prefix_length_leaves_each_prompt_a_token() -> None:
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter keeps its last token
    assert shared_prefix_length([[1, 2, 3]]) == 0  # one prompt shares with nothing
    assert shared_prefix_length([[7, 2], [8, 2]]) == 0


def _anchor_setup(arch: str) -> tuple[torch.nn.Module, ModelTap, AnchorSet]:
    tokenizer = make_tokenizer()
    model = make_lora(make_model(arch))
    tokens = mine_safety_tokens(tokenizer, k=8)
    tap = ModelTap(model, tokens.ids)
    tap.attach()
    anchors = AnchorSet(tokenizer, [OPENING + r for r in REQUESTS], batch_size=6)
    assert anchors.prefix_length > 0
    anchors.share_prefix = True  # attach decides; here the split itself is under test
    anchors.compute_reference(tap, model, coarse="kl")
    return model, tap, anchors


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("coarse", ["kl", None])
def test_prefix_values_and_gradient_equal_the_full_rows(arch: str, coarse: str | None) -> None:
    model, tap, anchors = _anchor_setup(arch)
    batch = anchors.batch(0, tap.device())
    assert batch.split is not None
    # A fixed random functional of the values, so every value's gradient counts with its own weight.
    weights = torch.randn(batch.n_points, 9 if coarse else 8, generator=torch.Generator().manual_seed(0))

    model.eval()  # no dropout: the two paths must agree to rounding
    if coarse:
        tap.request_points(batch.rows, batch.cols)
    full_sink = tap.run(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **tap.lean_kwargs())
    full = point_values(tap, full_sink, batch.rows, batch.cols, coarse)
    (full * weights[:, : full.shape[1]]).sum().backward()
    expected = grads(model)

    shared = values_on_prefix(tap, batch.split, batch.rows, coarse)
    assert shared is not None
    torch.testing.assert_close(shared, full.detach(), rtol=1e-5, atol=1e-5)
    (shared * weights[:, : shared.shape[1]]).sum().backward()
    assert_grads_close(grads(model), expected, rtol=1e-4, atol=1e-7, what=arch)


def test_checkpointing_runs_the_full_rows() -> None:
    """transformers' gradient checkpointing drops a passed cache in training: detected, and the full rows run
    (batch_values gives their values); the cache-length guard catches a model that drops it undetected."""
    model, tap, anchors = _anchor_setup("llama")
    batch = anchors.batch(0, tap.device())
    assert batch.split is not None
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointing_active(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own "caching is incompatible" notice
        assert values_on_prefix(tap, batch.split, batch.rows, "kl") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a detected case falls back without a warning
        values = anchors.batch_values(tap, batch, "kl")
    assert anchors.share_prefix
    model.gradient_checkpointing_disable()
    model.eval()
    torch.testing.assert_close(values, anchors.batch_values(tap, batch, "kl"), rtol=1e-5, atol=1e-5)


def test_handle_gradient_is_the_full_rows_gradient(tmp_path: Path) -> None:
    """Through the public entry point: the default anchor term's gradient with the prefix shared equals it
    with sharing turned off (the full rows, which tests/test_gradients.py checks against a hand-written loss)."""
    tokenizer = make_tokenizer()
    anchors_file = tmp_path / "anchors.txt"
    anchors_file.write_text("\n".join(OPENING + r for r in REQUESTS) + "\n")
    benign_file = tmp_path / "benign.txt"
    benign_file.write_text("\n".join(OPENING + r for r in ("bake bread", "fix a bike", "plan a trip")) + "\n")
    reference = {
        "anchors_path": str(anchors_file),
        "benign_anchors_path": str(benign_file),
        "anchor_batch_size": 4,
    }
    config = {"reference": reference}
    batch = make_batch(tokenizer)
    results = []
    for share in (True, False):
        model = make_lora(make_model("qwen2"))
        with register_str_hook(model, config, tokenizer=tokenizer) as handle:
            assert handle.anchors is not None and handle.anchors.share_prefix
            handle.anchors.share_prefix = share
            model.train()
            out = model(**batch)
            (out.loss + handle.loss()).backward()
            results.append(grads(model))
    assert_grads_close(results[0], results[1], rtol=1e-4, atol=1e-7)


def test_share_anchor_prefix_off_runs_the_full_rows_and_is_checked() -> None:
    from str_hooks import STRConfig, STRConfigError

    tokenizer = make_tokenizer()
    model = make_lora(make_model("llama"))
    config = {"reference": {"share_anchor_prefix": "no", "anchor_batch_size": 8}}
    with register_str_hook(model, config, tokenizer=tokenizer) as handle:
        assert handle.anchors is not None and not handle.anchors.share_prefix
    for wrong in ({"anchor_placement": "folded"}, {"source": "adapter"}):
        with pytest.raises(STRConfigError, match="share_anchor_prefix"):
            STRConfig.model_validate({"reference": {"share_anchor_prefix": "no", **wrong}})
