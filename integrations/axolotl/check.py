"""`python -m str_hooks.integrations.axolotl.check CONFIG.yml ...`: check the STR part of Axolotl configs.

Needs neither Axolotl nor a model. Catches what Axolotl 0.19 cannot: a `str:` block in a config that does
not list the plugin (Axolotl drops the block silently and trains without STR).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from str_hooks.errors import STRConfigError
from str_hooks.integrations.axolotl.validation import check_config


def main(argv: Sequence[str] | None = None) -> int:
    """Check Axolotl config files for STR problems; exit status 1 if any has one.

    Example:
        python -m str_hooks.integrations.axolotl.check config.yml
    """
    parser = argparse.ArgumentParser(
        prog="python -m str_hooks.integrations.axolotl.check",
        description="Check the STR part of Axolotl config files (the `str:` block, the plugin, and option "
        "combinations) without loading a model.",
    )
    parser.add_argument("configs", nargs="+", type=Path, help="Axolotl YAML config files")
    args = parser.parse_args(argv)
    import yaml

    status = 0
    for path in args.configs:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            if not isinstance(data, Mapping):
                raise STRConfigError(f"{path} does not hold a YAML mapping.")
            config = check_config(data)
        except (OSError, yaml.YAMLError, STRConfigError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            status = 1
            continue
        if config is None:
            print(f"{path}: no `str:` block, STR is off.")
        else:
            where = config.where_penalized()
            print(
                f"{path}: OK (coef {config.coef}, reference {config.reference.source}, penalty "
                f"{config.penalty.form} at {where}, {config.tokens.k} tokens by {config.tokens.method})."
            )
    return status


__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
