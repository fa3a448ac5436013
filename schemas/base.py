"""`Section`: the base of every config section. Unknown keys are errors, with a did-you-mean hint, and an
invalid value raises `STRConfigError` however the section is built."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from typing_extensions import Self

from str_hooks.errors import STRConfigValidationError


@contextmanager
def _config_errors(input_type: Literal["python", "json"] = "python") -> Iterator[None]:
    """Re-raise pydantic's `ValidationError` as `STRConfigValidationError` (also a `ValidationError`)."""
    try:
        yield
    except ValidationError as exc:
        # `from None`: the new error carries exactly the same errors; chaining would print them twice.
        raise STRConfigValidationError.from_validation_error(exc, input_type) from None


def unused_error(field: str, shown: str, other: str, value: Any, wanted: str, why: str = "") -> ValueError:
    """The error for an option that is set while the option it depends on does not select it: "`field` is
    <shown> but `other` is <value!r>: <why>set <other>: <wanted> or remove <field>." (`field` and `other` as
    dotted paths, `penalty.margin`; the fix names them without their section)."""
    return ValueError(
        f"`{field}` is {shown} but `{other}` is {value!r}: {why}set {other.rpartition('.')[2]}: {wanted} or "
        f"remove {field.rpartition('.')[2]}."
    )


def unset_by_default(description: str) -> Any:
    """A field that is None until the user sets it (a path, a column, an opt-in), with its documentation."""
    return Field(default=None, description=description)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, with a did-you-mean hint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Direct construction, validation and assignment raise `STRConfigError`, like every entry point
    # (`load_config`, `register_str_hook`, the integrations). The conversion wraps pydantic's public entry
    # points rather than sitting in a validator: pydantic re-wraps whatever a validator raises into its own
    # `ValidationError`. A section nested in another model (in `STRConfig`, or Axolotl's `STRArgs`) is
    # validated inside pydantic-core without these methods, so its errors still reach the outer model as
    # ordinary field errors (`reference.source`, ...), converted once at the top. `**kwargs` passes
    # pydantic's own keyword options through unchanged, whichever pydantic version is installed.

    def __init__(self, /, **data: Any) -> None:
        with _config_errors():
            super().__init__(**data)

    # Tells pydantic this `__init__` is its own. Otherwise pydantic validates a nested section by calling it
    # ("custom init"), which drops the caller's context and strictness; pydantic's RootModel sets it too.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        with _config_errors():
            return super().model_validate(obj, **kwargs)

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> Self:
        with _config_errors("json"):
            return super().model_validate_json(json_data, **kwargs)

    @classmethod
    def model_validate_strings(cls, obj: Any, **kwargs: Any) -> Self:
        # pydantic validates strings in its JSON mode, and words some messages for it ("a valid array").
        with _config_errors("json"):
            return super().model_validate_strings(obj, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        # `validate_assignment=True`: an assigned value is validated like a built one.
        with _config_errors():
            super().__setattr__(name, value)

    def _set_off_default(self, names: set[str]) -> list[str]:
        """The fields among `names` given explicitly with a value other than their default, sorted.

        A dump (`model_dump_json`) writes every field, defaults included; a field that only carries its
        default must not count as "set", or a config would not round-trip through JSON.
        """
        fields = type(self).model_fields
        return sorted(
            name
            for name in names & self.model_fields_set
            if getattr(self, name) != fields[name].get_default(call_default_factory=True)
        )

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        unknown = [key for key in data if key not in known]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ValueError(
                f"unknown key `{key}` (value {data[key]!r}) in {cls.__name__}.{hint} "
                f"Known keys: {', '.join(sorted(known))}."
            )
        return data


__all__ = ["Section", "unused_error"]
