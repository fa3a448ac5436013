"""Packaging contracts: what `import str_hooks` pulls in, the public surface, the layout mapping, the demo."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import str_hooks


def test_import_pulls_in_only_torch_and_pydantic() -> None:
    code = (
        "import sys, str_hooks, str_hooks.schemas, str_hooks.integrations\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'transformers', 'peft', 'trl', 'accelerate', 'lightning', 'axolotl', 'tokenizers', 'safetensors', 'yaml'})\n"
        "print(','.join(bad))"
    )
    # Run from a neutral directory so the installed package, not the checkout, is imported.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == ""


def test_public_surface() -> None:
    assert str_hooks.__all__ == sorted(str_hooks.__all__)
    for name in ("STRConfig", "SafetyTokens", "mine_safety_tokens", "register_str_hook", "STRHandle"):
        assert name in str_hooks.__all__ and hasattr(str_hooks, name)
    from str_hooks.schemas import STRConfig

    assert STRConfig is str_hooks.STRConfig


def test_schemas_and_integrations_map_into_the_package() -> None:
    import str_hooks.integrations
    import str_hooks.schemas

    # Installed or from a checkout, they come from the top-level folders of the user's layout.
    assert Path(str_hooks.schemas.__file__).resolve().parent.name == "schemas"
    assert Path(str_hooks.integrations.__file__).resolve().parent.name == "integrations"


def test_missing_framework_gives_an_install_hint() -> None:
    from str_hooks.integrations import require as integrations_require
    from str_hooks.optional import require

    # The hint names an install that works: the package is installed from a clone, not from PyPI.
    with pytest.raises(ImportError, match=r'pip install -e "\.\[lightning\]"'):
        require("surely_not_an_installed_module_xyz", "lightning")
    assert integrations_require is require  # the old import path keeps working


def test_default_texts_ship_with_the_package() -> None:
    from str_hooks.prompts import default_texts

    assert len(default_texts("refusal_templates")) >= 40
    assert len(default_texts("harmful_anchors")) >= 100
    assert len(set(default_texts("harmful_anchors"))) == len(default_texts("harmful_anchors"))


def test_readme_is_short_and_links_only_to_files_that_exist() -> None:
    # The configuration reference is docs/config.md (generated; tests/test_config.py keeps it in sync).
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 12 * 1024
    links = re.findall(r"\]\(([^)#]+)\)", readme) + re.findall(
        r"`((?:docs|results|bench|examples|integrations)/[^`\s]*)`", readme
    )
    local = [link for link in links if not link.startswith("http")]
    assert "docs/config.md" in local and "results/README.md" in local
    missing = [link for link in local if not (root / link).exists()]
    assert not missing, f"README links to files the repository does not contain: {missing}"
