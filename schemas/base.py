"""`Section`: the base of every config section (unknown keys are errors, with a did-you-mean hint)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, with a did-you-mean hint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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


__all__ = ["Section"]
