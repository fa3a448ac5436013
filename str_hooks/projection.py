"""Projecting only the safety rows of the LM head.

`z_S = T(h @ W[S].T + b[S])` costs O(tokens * d * k) and never builds a [B, T, V] tensor, so it works
where full logits are never built (fused cross-entropy kernels, `logits_to_keep`). Finding the head:
`str_hooks.modules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from str_hooks.device_index import DeviceCopies
from str_hooks.errors import STRAttachError
from str_hooks.modules import zero3_partitioned


@dataclass(frozen=True)
class LogitTransform:
    """The model's map from `h @ W.T + b` to its logits: `softcap * tanh(x / softcap)`, then `* scale`."""

    softcap: float | None = None
    scale: float = 1.0

    @classmethod
    def from_config(cls, config: Any) -> LogitTransform:
        if config is None:
            return cls()
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        softcap = getattr(config, "final_logit_softcapping", None)
        scale = 1.0
        # Cohere multiplies by logit_scale; some models call it output_multiplier or lm_head_multiplier.
        for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
            value = getattr(config, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scale *= float(value)
                break
        logits_scaling = getattr(config, "logits_scaling", None)
        if isinstance(logits_scaling, (int, float)) and logits_scaling:
            # Granite and MiniCPM3 divide by it, HyperCLOVA X multiplies.
            is_hyperclovax = getattr(config, "model_type", None) == "hyperclovax"
            scale = scale * float(logits_scaling) if is_hyperclovax else scale / float(logits_scaling)
        return cls(softcap=float(softcap) if softcap else None, scale=scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        if self.scale != 1.0:
            x = x * self.scale
        return x


class HeadRows:
    """Projects hidden states onto the k safety rows of an LM head, through the logit transform.

    Frozen weights are read once (gathered from DTensor shards when sharded) and reused; a trainable
    weight, or LoRA on the head, is read live each call so gradients reach it. The head is re-read on
    every call, so PEFT's `disable_adapter()` (which swaps modules_to_save copies and turns LoRA off)
    is honoured.
    """

    def __init__(
        self, head: nn.Module, token_ids: list[int], transform: LogitTransform, head_gradient: bool = True
    ) -> None:
        self.head = head
        self.transform = transform
        # False: the penalty's values use the head's current weights without a gradient to them, so the
        # penalty moves the model only through its hidden states (`penalty.head_gradient`).
        self.head_gradient = head_gradient
        self._ids = DeviceCopies(torch.tensor(token_ids, dtype=torch.long))
        self._frozen_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        lora_layer: Any = head if hasattr(head, "lora_A") and hasattr(head, "lora_B") else None
        if lora_layer is not None and any(getattr(lora_layer, "use_dora", {}).values()):
            raise STRAttachError(
                "DoRA on the LM head is not supported by str-hooks; use plain LoRA on the head."
            )
        self.lora_layer = lora_layer
        if (
            not head_gradient
            and self.is_trainable()
            and lora_layer is None
            and not isinstance(head, nn.Linear)
        ):
            raise STRAttachError(
                f"`penalty.head_gradient` is false but the trainable LM head is a {type(head).__name__}, which "
                "str-hooks can evaluate without a gradient only as an nn.Linear or a PEFT LoRA Linear: set "
                "`penalty.head_gradient: true`, or freeze the head."
            )
        head_params = [p for p in head.parameters() if isinstance(p, torch.Tensor)]
        if any(zero3_partitioned(p) for p in head_params) and self.is_trainable():
            # Under ZeRO-3 a partitioned weight has data only inside its module's forward and backward; the
            # safety rows are read outside both, and their gradient could not reach the partitions.
            raise STRAttachError(
                "the LM head is partitioned by DeepSpeed ZeRO-3 and trainable (full fine-tuning, LoRA or "
                "modules_to_save on the head): str-hooks reads its safety rows outside the head's forward, "
                "where ZeRO-3 does not gather them. Freeze the head (LoRA on the decoder only), or use ZeRO-2 "
                "or FSDP2 (`fully_shard`), which str-hooks supports with a trainable head."
            )

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight  # type: ignore[return-value]

    def ids_on(self, device: torch.device) -> torch.Tensor:
        """The safety ids on `device`, copied there once."""
        return self._ids.on(device)

    def is_trainable(self) -> bool:
        if self.weight.requires_grad:
            return True
        return self.lora_layer is not None and any(
            p.requires_grad for p in self.lora_layer.lora_B.parameters()
        )

    def _frozen_rows(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Keyed by the tensor's identity and version counter: an in-place update invalidates the copy.
        key = (id(weight), weight._version)
        cached = self._frozen_cache.get(key)
        if cached is None and zero3_partitioned(weight):
            cached = self._gathered_rows(weight, bias)
            self._frozen_cache = {key: cached}
        if cached is None:
            with torch.no_grad():
                full = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
                ids = self._ids.on(full.device)
                rows = full.index_select(0, ids).detach().clone()
                bias_rows = None
                if bias is not None:
                    full_bias = bias.full_tensor() if hasattr(bias, "full_tensor") else bias
                    bias_rows = full_bias.index_select(0, ids).detach().clone()
            cached = (rows, bias_rows)
            self._frozen_cache = {key: cached}
        return cached

    def _gathered_rows(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen rows of a ZeRO-3 partitioned head, gathered once. A collective: every rank reads them at
        the same point (the first projection, the same on every rank)."""
        import deepspeed  # present whenever a parameter carries `ds_id`

        params = [weight] if bias is None else [weight, bias]
        with torch.no_grad(), deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            ids = self._ids.on(weight.device)
            rows = weight.index_select(0, ids).detach().clone()
            bias_rows = None if bias is None else bias.index_select(0, ids).detach().clone()
        return rows, bias_rows

    def rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W[S], b[S]) as the current forward would use them (adapters on or off)."""
        weight = self.weight
        bias = getattr(self.head, "bias", None)
        bias = bias if isinstance(bias, torch.Tensor) else None
        if self.head_gradient and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            ids = self.ids_on(weight.device)
            return weight.index_select(0, ids), None if bias is None else bias.index_select(0, ids)
        return self._frozen_rows(weight, bias)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Safety logits [..., k] in float32 from hidden states [..., d]."""
        weight_rows, bias_rows = self.rows()
        out = hidden.to(weight_rows.dtype) @ weight_rows.to(hidden.device).T
        if bias_rows is not None:
            out = out + bias_rows.to(out.device)
        out = out.float()
        if self.lora_layer is not None:
            delta = self._lora_delta(hidden, self.ids_on(hidden.device))
            if delta is not None:
                out = out + delta
        return self.transform(out)

    def _param(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.head_gradient else tensor.detach()

    def _linear(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        """`layer(x)` for a Linear layer, its weights detached unless `head_gradient`."""
        if self.head_gradient:
            return layer(x)
        bias = getattr(layer, "bias", None)
        return nn.functional.linear(x, layer.weight.detach(), None if bias is None else bias.detach())

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's full-vocabulary output for `hidden` [N, d] (before the logit transform), as its forward
        computes it (adapters included), with no gradient to its weights unless `head_gradient`."""
        if self.head_gradient or not self.is_trainable():
            return self.head(hidden)
        if self.lora_layer is None:
            return self._linear(self.head, hidden)
        out = self._linear(self.lora_layer.get_base_layer(), hidden)
        delta = self._lora_delta(hidden, ids=None)
        return out if delta is None else out + delta.to(out.dtype)

    def _lora_delta(self, hidden: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor | None:
        """`scaling * B (A dropout(h))` in float32 summed over the active adapters, on B's rows `ids` (every row
        when None); None when the adapters are off. PEFT's LoRA Linear exposes only the base weight, and the
        safety rows need B[S] without the full B."""
        layer: Any = self.lora_layer
        if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
            return None
        total: torch.Tensor | None = None
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            x = layer.lora_dropout[name](hidden.to(lora_a.weight.dtype))
            b_weight = self._param(lora_b.weight)
            b_bias = getattr(lora_b, "bias", None)
            b_bias = None if b_bias is None else self._param(b_bias)
            if ids is not None:
                rows = ids.to(b_weight.device)
                b_weight = b_weight.index_select(0, rows)
                b_bias = None if b_bias is None else b_bias.index_select(0, rows)
            part = nn.functional.linear(self._linear(lora_a, x), b_weight, b_bias).float() * float(
                layer.scaling[name]
            )
            total = part if total is None else total + part
        return total
