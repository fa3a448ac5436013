"""The `tokens` section: which safety tokens are regularized and how they are found."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from str_hooks.schemas.base import Section, unset_by_default, unused_error

TokenMethod = Literal["frequency", "contrastive", "list"]


class TokensConfig(Section):
    """Which safety tokens are regularized and how they are found."""

    method: TokenMethod = Field(
        default="frequency",
        description=(
            "How safety tokens are mined. `frequency`: position-weighted token frequency over refusal "
            "templates (needs only the tokenizer). `contrastive`: tokens whose first-response log-prob "
            "the aligned model raises on harmful versus benign prompts (needs the model). `list`: the "
            "tokens named in `strings`."
        ),
    )
    k: int = Field(default=32, description="Number of safety tokens to keep. Must be >= 1.")
    templates: str | None = unset_by_default(
        "Path to a file of refusal templates (one per line, or a JSON list of strings). None uses the "
        "package's own default templates."
    )
    strings: list[str | int] | None = unset_by_default(
        "For method `list`: token strings (each must be one token) or token ids."
    )
    path: str | None = unset_by_default(
        "Path to a saved SafetyTokens JSON (from `str-hooks mine` or `SafetyTokens.save`). When set, "
        "the tokens are loaded from it instead of mined, and checked against the tokenizer."
    )

    @model_validator(mode="after")
    def _check(self) -> TokensConfig:
        if self.k < 1:
            raise ValueError(
                f"`tokens.k` must be >= 1, got {self.k}: set a positive number of tokens, e.g. 32."
            )
        if self.method == "list" and not self.strings and self.path is None:
            raise ValueError(
                "`tokens.method` is 'list' but `tokens.strings` is empty: name the tokens, e.g. "
                "strings: ['Sorry', 'cannot'], or use method 'frequency'."
            )
        if self.strings and self.method != "list":
            why = "strings are only used by method 'list'; "
            raise unused_error(
                "tokens.strings", f"set ({self.strings!r})", "tokens.method", self.method, "list", why
            )
        return self


__all__ = ["TokenMethod", "TokensConfig"]
