"""The shared tiny-model factory (kept in the package so the demo and examples use the same one)."""

from str_hooks.testing import ARCHITECTURES, make_batch, make_config, make_lora, make_model, make_tokenizer

__all__ = ["ARCHITECTURES", "make_batch", "make_config", "make_lora", "make_model", "make_tokenizer"]
