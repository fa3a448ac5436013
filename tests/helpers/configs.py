"""The explicit STR settings the mechanics tests run with. The package's defaults are the decision study's
choice (kl at anchors with 4-token openings and benign anchors) at coef 30 (the harmful-mixing study's;
tests/test_config.py checks them);
the tests of training-position mechanics and of the decision point alone name their settings here instead of
relying on defaults that may change again."""

from __future__ import annotations

import copy
from typing import Any

# Training positions with the adapter reference, mse, coef 1 (the defaults before issue 12's study).
TRAINING_POSITIONS: dict[str, Any] = {
    "coef": 1.0,
    "penalty": {"form": "mse"},
    "reference": {"source": "adapter"},
}
# Anchors at the decision point alone: mse, one position per anchor, no benign anchors.
DECISION_POINT_ONLY: dict[str, Any] = {
    "penalty": {"form": "mse"},
    "reference": {"source": "anchors", "anchor_tokens": 1, "benign_weight": 0.0},
}


def merged(base: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of `base` with `extra` merged in, section by section (`extra` wins)."""
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def training_positions(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """TRAINING_POSITIONS with `extra` merged in."""
    return merged(TRAINING_POSITIONS, extra)


def decision_point_only(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """DECISION_POINT_ONLY with `extra` merged in."""
    return merged(DECISION_POINT_ONLY, extra)
