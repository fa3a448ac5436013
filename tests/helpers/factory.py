"""The shared tiny-model factory (kept in the package so the demo and examples use the same one), plus the
test-only patch that makes a model behave like one under a fused loss (no logits returned)."""

from typing import Any

from str_hooks.modules import unwrap_model
from str_hooks.testing import ARCHITECTURES, make_batch, make_config, make_lora, make_model, make_tokenizer

__all__ = [
    "ARCHITECTURES",
    "drop_logits",
    "make_batch",
    "make_config",
    "make_lora",
    "make_model",
    "make_tokenizer",
]


def drop_logits(model: Any) -> None:
    """Patch the causal LM under `model` (PEFT wrapper or not) so its forward returns no logits, as a fused
    linear-cross-entropy head does; hidden states still flow through the decoder as usual."""
    causal_lm = unwrap_model(model)
    original = causal_lm.forward

    def forward_without_logits(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        out.logits = None
        return out

    causal_lm.forward = forward_without_logits
