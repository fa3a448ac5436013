"""What a handle is built from (`Attachment`, filled by `register_str_hook`) and what its `loss_parts()`
returns (`LossParts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from str_hooks.anchors import AnchorSet
from str_hooks.reference import ReferenceSource
from str_hooks.schemas.config import STRConfig
from str_hooks.tap import ModelTap
from str_hooks.tokens import SafetyTokens


@dataclass
class Attachment:
    """What `register_str_hook` built for a handle: the hooks (`tap`), the tokens, the reference."""

    config: STRConfig
    tokens: SafetyTokens
    tap: ModelTap
    peft_model: nn.Module | None
    reference: ReferenceSource | None = None
    anchors: AnchorSet | None = None
    cache_identity: dict[str, Any] | None = None
    projection_verified: bool | None = None


class LossParts(NamedTuple):
    """`STRHandle.loss_parts()`: the anchors' per-step term and the training rows' term (None where the
    handle has no such part)."""

    anchors: torch.Tensor | None
    rows: torch.Tensor | None


__all__ = ["Attachment", "LossParts"]
