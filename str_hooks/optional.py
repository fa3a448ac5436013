"""Optional frameworks, imported on demand with an ImportError that says what to install.

In the core (not in `integrations`), so that the core never imports the integrations layer.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import an optional framework, or raise an ImportError that says what to install."""
    try:
        return import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this part of str-hooks needs `{module}`, which is not installed: from a clone of the repository, "
            f'pip install -e ".[{extra}]"'
        ) from exc
