"""Exceptions raised by str-hooks.

Every error says what was wrong (the field or the object), the bad value, and how to fix it.
"""

from __future__ import annotations


class STRError(Exception):
    """Base class of every error str-hooks raises on purpose."""


class STRConfigError(STRError, ValueError):
    """A configuration value, or a combination of values, that cannot work."""


class STRTokensError(STRError, ValueError):
    """Bad mining input (templates, k, ids) or a safety-token file that does not fit."""


class STRAttachError(STRError, RuntimeError):
    """The hook cannot be attached to this model (no decoder, no head, no adapters, ...)."""


class STRCacheError(STRError, ValueError):
    """A reference cache that is missing, malformed, or built for another model or token set."""


class STRNonFiniteError(STRError, FloatingPointError):
    """NaN or inf appeared in the projected safety logits or in the penalty."""
