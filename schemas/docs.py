"""The configuration reference (`docs/config.md`), generated from the schema's own field descriptions, so
that the two cannot disagree (a test regenerates it and compares).

    python -m str_hooks.schemas.docs > docs/config.md
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from str_hooks.schemas.config import STRConfig

HEADER = """# Configuration reference

Generated from the field descriptions of `STRConfig` and its sections (`schemas/`) by
`python -m str_hooks.schemas.docs > docs/config.md`; `tests/test_config.py` keeps it in sync.

`STRConfig` (pydantic v2) loads from a dict, a YAML or JSON file (`load_config(path)`; a file with a
top-level `str:` block, like an Axolotl config, works too) and round-trips through JSON. Unknown keys
are errors with a did-you-mean hint; values and combinations that cannot work are errors that name the
field, the value and the fix, raised before any training step. The type is `STRConfigError` however the
config is built: `load_config`, every entry point that takes a config, and `STRConfig(...)` (or a section,
or an assignment) itself, whose error is also pydantic's `ValidationError` with pydantic's `errors()`.
"""


def _default(value: Any) -> str:
    return f"`{json.dumps(value)}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows: list[str] = []
    instance = model()
    for name, field in model.model_fields.items():
        value = getattr(instance, name)
        if isinstance(value, BaseModel):
            rows += _rows(type(value), f"{prefix}{name}.")
            continue
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_default(value)} | {description} |")
    return rows


def render() -> str:
    """The whole of docs/config.md."""
    lines = [HEADER, "| key | default | meaning |", "|---|---|---|", *_rows(STRConfig, "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
