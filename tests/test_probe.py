"""The refusal probe: keyword judge and greedy generation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers.factory import make_lora, make_model

from str_hooks.probe import DEFAULT_REFUSAL_PHRASES, is_refusal, refusal_probe
from str_hooks.prompts import default_texts, encode_prompt


def test_keyword_rule() -> None:
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("Well. I cannot do this")
    assert not is_refusal("Sure! Here is a recipe.")
    assert not is_refusal("i'm sorry", DEFAULT_REFUSAL_PHRASES)  # case-sensitive, as the GCG rule
    assert is_refusal("nope", ["nope"])


def test_probe_matches_one_by_one_greedy_decoding(tokenizer: Any) -> None:
    """Batched left-padded generation gives the same replies as unbatched greedy decoding."""
    model = make_lora(make_model("llama"))
    model.train()
    prompts = default_texts("harmful_anchors")[:5]
    result = refusal_probe(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert model.training, "the probe restores training mode"
    assert len(result.responses) == 5
    # The rate is the keyword judge's verdicts on these replies, counted by hand.
    assert result.refused == [is_refusal(r) for r in result.responses]
    assert result.refusal_rate == sum(result.refused) / 5
    model.eval()
    for prompt, response in zip(prompts, result.responses, strict=True):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        with torch.no_grad():
            for _ in range(6):
                next_id = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        expected = tokenizer.decode(ids[0, -6:], skip_special_tokens=True)
        assert response == expected
    with pytest.raises(ValueError, match="at least one prompt"):
        refusal_probe(model, tokenizer, [])
