"""Exceptions raised by str-hooks.

Every error says what was wrong (the field or the object), the bad value, and how to fix it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ValidationError
from pydantic_core import InitErrorDetails


class STRError(Exception):
    """Base class of every error str-hooks raises on purpose."""


class STRConfigError(STRError, ValueError):
    """A configuration value, or a combination of values, that cannot work."""


class STRConfigValidationError(STRConfigError, ValidationError):
    """An invalid `STRConfig` (or one of its sections) built, validated or assigned to directly.

    It is pydantic's `ValidationError` too, with the same errors and message, so code written when direct
    construction raised pydantic's type (`except ValidationError`, `exc.errors()`) keeps working.
    """

    @classmethod
    def from_validation_error(
        cls, exc: ValidationError, input_type: Literal["python", "json"] = "python"
    ) -> STRConfigValidationError:
        """The same errors as `exc`, as this type (pydantic's error type cannot be changed in place).

        Args:
            exc: the error pydantic raised.
            input_type: 'json' for `model_validate_json`: some of pydantic's messages depend on it, and a
                `ValidationError` does not expose it.
        """
        details: list[InitErrorDetails] = []
        for error in exc.errors():
            detail = InitErrorDetails(type=error["type"], loc=error["loc"], input=error["input"])
            if "ctx" in error:
                detail["ctx"] = error["ctx"]
            details.append(detail)
        return cls.from_exception_data(exc.title, details, input_type=input_type)


class STRTokensError(STRError, ValueError):
    """Bad mining input (templates, k, ids) or a safety-token file that does not fit."""


class STRAttachError(STRError, RuntimeError):
    """The hook cannot be attached to this model (no decoder, no head, no adapters, ...)."""


class STRCacheError(STRError, ValueError):
    """A reference cache that is missing, malformed, or built for another model or token set."""


class STRNonFiniteError(STRError, FloatingPointError):
    """NaN or inf appeared in the projected safety logits or in the penalty."""
