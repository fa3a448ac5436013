from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

# The shared helpers (tests/helpers/) import as `helpers` (importlib import mode adds no path).
sys.path.insert(0, str(Path(__file__).parent))

from helpers.factory import make_tokenizer

warnings.filterwarnings("ignore", message=".*fan_in_fan_out is set to False.*")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@pytest.fixture(scope="session")
def tokenizer():  # type: ignore[no-untyped-def]
    return make_tokenizer()


@pytest.fixture(scope="session")
def tokens(tokenizer):  # type: ignore[no-untyped-def]
    from str_hooks import mine_safety_tokens

    return mine_safety_tokens(tokenizer, k=12)
