"""str-hooks: Safety Token Regularization (STR) as callback middleware for the trainers people already use.

Fine-tuning an aligned chat model on benign data erodes its refusals. STR mines the tokens the aligned
model uses when it refuses and keeps their logits from drifting during fine-tuning.

`import str_hooks` imports only torch and pydantic; framework adapters live in `str_hooks.integrations`.
"""

from __future__ import annotations

from pathlib import Path as _Path

# pyproject maps the top-level `schemas/` and `integrations/` folders to `str_hooks.schemas` and
# `str_hooks.integrations`. Installed, they sit inside this package; when a source checkout itself is on
# sys.path (a script run from the repository root), they sit beside it, so look there too.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "schemas").exists() and (_checkout / "schemas" / "__init__.py").is_file():
    __path__.append(str(_checkout))

from str_hooks.attach import register_str_hook
from str_hooks.cache import ReferenceCache, build_reference_cache
from str_hooks.errors import (
    STRAttachError,
    STRCacheError,
    STRConfigError,
    STRError,
    STRNonFiniteError,
    STRTokensError,
)
from str_hooks.handle import STRHandle
from str_hooks.mining import mine_safety_tokens
from str_hooks.schemas.config import STRConfig
from str_hooks.schemas.load import load_config
from str_hooks.tokens import SafetyTokens, tokenizer_fingerprint

__version__ = "0.1.0"

__all__ = [
    "ReferenceCache",
    "STRAttachError",
    "STRCacheError",
    "STRConfig",
    "STRConfigError",
    "STRError",
    "STRHandle",
    "STRNonFiniteError",
    "STRTokensError",
    "SafetyTokens",
    "__version__",
    "build_reference_cache",
    "load_config",
    "mine_safety_tokens",
    "register_str_hook",
    "tokenizer_fingerprint",
]
