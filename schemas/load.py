"""`load_config`: an `STRConfig` from a config, a dict, or a YAML / JSON file, with every error an
`STRConfigError` that keeps pydantic's message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from str_hooks.errors import STRConfigError
from str_hooks.schemas.config import STRConfig


def load_config(source: STRConfig | dict[str, Any] | str | Path) -> STRConfig:
    """Build an `STRConfig` from a config, a dict, or a YAML / JSON file path.

    A file may hold the config itself or an Axolotl-style document with the config under `str:`.

    Raises:
        FileNotFoundError: the path does not exist.
        STRConfigError: a key or value is invalid (pydantic's message, which names it), or the file is not
            valid YAML/JSON or not a mapping. Every entry point (register_str_hook, the HF and Lightning
            callbacks, the Axolotl plugin) builds its config here, so the type is the same in each.
    """
    if isinstance(source, STRConfig):
        return source
    if isinstance(source, dict):
        return _validate(source, "the STR config")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"STR config file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    data: Any
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as exc:
        raise STRConfigError(f"STR config file {str(path)!r} is not valid JSON/YAML: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError does not derive from ValueError
        raise STRConfigError(f"STR config file {str(path)!r} is not valid YAML: {exc}") from exc
    if isinstance(data, dict) and "str" in data:
        # An Axolotl-style document: the STR options sit under `str:` beside the trainer's own keys.
        data = data["str"]
    if not isinstance(data, dict):
        raise STRConfigError(
            f"STR config file {str(path)!r} must hold a mapping of options, got {type(data).__name__}."
        )
    return _validate(data, f"STR config file {str(path)!r}")


def _validate(data: dict[str, Any], where: str) -> STRConfig:
    try:
        return STRConfig.model_validate(data)
    except ValidationError as exc:
        raise STRConfigError(f"{where} is invalid: {exc}") from exc
