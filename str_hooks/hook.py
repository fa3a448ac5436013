"""The plain-PyTorch entry point, kept at its first import path: `register_str_hook` lives in
`str_hooks.attach` and `STRHandle` in `str_hooks.handle`."""

from __future__ import annotations

from str_hooks.attach import register_str_hook
from str_hooks.handle import STATE_VERSION, STRHandle

__all__ = ["STATE_VERSION", "STRHandle", "register_str_hook"]
