"""Framework adapters for str-hooks, one thin module per framework, each imported on demand.

The plain-PyTorch entry point is `str_hooks.register_str_hook`; trainer adapters (Hugging Face Trainer /
TRL, Lightning, Axolotl) map their lifecycle events onto the same `STRHandle` and hold no penalty math.
"""

from __future__ import annotations

from str_hooks.optional import require

__all__ = ["require"]
