"""Axolotl integration: `STRPlugin`, enabled by a `str:` block in the YAML.

```yaml
plugins:
  - str_hooks.integrations.axolotl.STRPlugin
str:
  coef: 0.1
```

`STRPlugin` is imported on first access (it needs Axolotl; a missing Axolotl raises an ImportError
with the install command). `STRArgs` (the schema) and `check_config` (the checks, also run by
`python -m str_hooks.integrations.axolotl.check CONFIG.yml`) need only pydantic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from str_hooks.integrations.axolotl.args import STRArgs
from str_hooks.integrations.axolotl.validation import PLUGIN_PATH, check_config

if TYPE_CHECKING:
    from str_hooks.integrations.axolotl.plugin import STRPlugin


def __getattr__(name: str) -> Any:
    # Axolotl loads the plugin as getattr(import_module("str_hooks.integrations.axolotl"), "STRPlugin").
    if name == "STRPlugin":
        from str_hooks.integrations.axolotl.plugin import STRPlugin

        return STRPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PLUGIN_PATH", "STRArgs", "STRPlugin", "check_config"]
