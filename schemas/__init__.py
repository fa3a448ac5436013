"""Pydantic configuration of str-hooks: the one source of truth for Python, YAML, JSON and Axolotl."""

from __future__ import annotations

from str_hooks.schemas.config import (
    LoggingConfig,
    PenaltyConfig,
    ProbeConfig,
    ReferenceConfig,
    STRConfig,
    TokensConfig,
)
from str_hooks.schemas.load import load_config

__all__ = [
    "LoggingConfig",
    "PenaltyConfig",
    "ProbeConfig",
    "ReferenceConfig",
    "STRConfig",
    "TokensConfig",
    "load_config",
]
