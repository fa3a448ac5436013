"""Framework adapters for str-hooks, one thin module per framework, each imported on demand.

The plain-PyTorch entry point is `str_hooks.register_str_hook`; trainer adapters (Hugging Face Trainer /
TRL, Lightning, Axolotl) map their lifecycle events onto the same `STRHandle` and hold no penalty math.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import an optional framework, or raise an ImportError that says what to install."""
    try:
        return import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this str-hooks integration needs `{module}`, which is not installed: pip install 'str-hooks[{extra}]'"
        ) from exc


__all__ = ["require"]
