"""The Axolotl input schema of the STR plugin: one top-level field, `str:`, typed with `STRConfig`.

Axolotl merges this model into its own config model when the plugin is listed under `plugins:`, so the
`str:` block is validated by the same pydantic schema as every other way of configuring STR: a misspelt
key fails at config validation with a message naming it. Imports only pydantic and the schema.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from str_hooks.schemas.config import STRConfig


class STRArgs(BaseModel):
    """Axolotl input arguments of `str_hooks.integrations.axolotl.STRPlugin`.

    Args:
        str: the STR options (`STRConfig`); None (the key absent) turns STR off.

    Example:
        >>> STRArgs.model_validate({"str": {"coef": 0.1}}).str.coef
        0.1
    """

    # The field's name shadows the builtin inside this class body only; keep it the only field here.
    str: STRConfig | None = Field(
        default=None,
        description="Safety Token Regularization options (see the str-hooks README); absent turns STR off.",
    )


__all__ = ["STRArgs"]
