"""Finding a causal LM's decoder and head, and projecting only the safety rows of the head.

`z_S = T(h @ W[S].T + b[S])` costs O(tokens * d * k) and never builds a [B, T, V] tensor, so it works
where full logits are never built (fused cross-entropy kernels, `logits_to_keep`). This is the only
module that knows about wrapper classes (PEFT, DDP, FSDP); it uses duck typing and imports neither.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from str_hooks.device_index import DeviceCopies
from str_hooks.errors import STRAttachError

DECODER_ATTRIBUTES = ("model", "transformer", "gpt_neox", "backbone", "decoder")
HEAD_ATTRIBUTES = ("lm_head", "embed_out", "output")

ModuleSpec = nn.Module | str | Callable[[nn.Module], nn.Module] | None


def zero3_partitioned(tensor: torch.Tensor) -> bool:
    """A parameter DeepSpeed ZeRO-3 partitions across ranks: its data is gathered only inside its module's
    forward (and backward), and `ds_shape` is its full shape."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_shape")


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The tensor's shape, or a ZeRO-3 partitioned parameter's full shape (its local data is a shard)."""
    return tuple(tensor.ds_shape) if zero3_partitioned(tensor) else tuple(tensor.shape)  # type: ignore[attr-defined]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The innermost causal LM: through DDP/FSDP1 `.module` and PEFT's `get_base_model()`."""
    current: Any = model
    for _ in range(8):
        if hasattr(current, "get_base_model") and callable(current.get_base_model):
            inner = current.get_base_model()
        elif isinstance(getattr(current, "module", None), nn.Module) and type(current).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
            "FullyShardedDataParallel",
        ):
            inner = current.module
        else:
            break
        if inner is current:
            break
        current = inner
    found: nn.Module = current
    return found


def peft_model_of(model: nn.Module) -> nn.Module | None:
    """The PEFT model (the object with `disable_adapter()`) inside `model`, or None."""
    current: Any = model
    for _ in range(4):
        if hasattr(current, "disable_adapter") and hasattr(current, "get_base_model"):
            found: nn.Module = current
            return found
        if isinstance(getattr(current, "module", None), nn.Module):
            current = current.module
        else:
            return None
    return None


def _resolve(base: nn.Module, spec: ModuleSpec, what: str) -> nn.Module | None:
    if spec is None:
        return None
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        try:
            found = functools.reduce(getattr, spec.split("."), base)
        except AttributeError as exc:
            raise STRAttachError(
                f"`{what}={spec!r}`: {type(base).__name__} has no attribute path {spec!r} ({exc}); name the "
                f"{what} module by its attribute path from the causal LM, e.g. 'model' or 'lm_head'."
            ) from exc
        if not isinstance(found, nn.Module):
            raise STRAttachError(
                f"`{what}={spec!r}` resolves to a {type(found).__name__}, not a torch module."
            )
        return found
    if callable(spec):
        found = spec(base)
        if not isinstance(found, nn.Module):
            raise STRAttachError(
                f"the `{what}` callable returned a {type(found).__name__}, not a torch module."
            )
        return found
    raise STRAttachError(
        f"`{what}` must be a module, an attribute path or a callable, got {type(spec).__name__}."
    )


CausalLMSpec = nn.Module | str | Callable[[Any], nn.Module] | None


def find_causal_lm(root: nn.Module, spec: CausalLMSpec = None, owner: str = "the module") -> nn.Module:
    """The causal LM inside a training module (a LightningModule, a user's wrapper).

    Args:
        root: the module that holds the causal LM.
        spec: the module itself, an attribute path from `root` (`"model"`, `"net.lm"`), or a callable
            taking `root`. None searches: `root` itself when it has `get_output_embeddings()`, else its
            shallowest submodule that is a PEFT model or has `get_output_embeddings()` (any transformers
            `PreTrainedModel`).
        owner: how errors name `root`'s role (e.g. "the LightningModule").

    Raises:
        STRAttachError: nothing found, an attribute path that does not exist, a callable that raises or
            gives something other than a module.
    """
    found: Any
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        found = root
        walked: list[str] = []
        for part in spec.split("."):
            if not hasattr(found, part):
                where = ".".join(walked) or type(root).__name__
                raise STRAttachError(
                    f"`model={spec!r}`: {type(root).__name__} has no attribute path {spec!r} ({where} has no "
                    f"attribute {part!r}); name the causal LM by its attribute path from {owner}, e.g. 'model' "
                    f"or 'net.lm', or pass a callable taking {owner}."
                )
            walked.append(part)
            found = getattr(found, part)
        what = f"`model={spec!r}`"
    elif spec is not None:
        what = "the `model` callable"
        try:
            found = spec(root)
        except Exception as exc:  # a failed lookup is a model that cannot be found (maybe not yet built)
            raise STRAttachError(f"{what} raised {type(exc).__name__}: {exc}") from exc
    else:
        return _search_causal_lm(root, owner)
    if not isinstance(found, nn.Module):
        raise STRAttachError(f"{what} gives a {type(found).__name__}, not a torch module.")
    return found


def _is_causal_lm(module: nn.Module) -> bool:
    if hasattr(module, "disable_adapter") and hasattr(module, "get_base_model"):
        return True  # a PEFT model
    return callable(getattr(module, "get_output_embeddings", None))


def _search_causal_lm(root: nn.Module, owner: str) -> nn.Module:
    """`root` itself, or its shallowest submodule that looks like a causal LM (breadth-first)."""
    if _is_causal_lm(root):
        return root
    level: list[nn.Module] = [root]
    seen: set[int] = {id(root)}
    while level:
        below: list[nn.Module] = []
        for module in level:
            for child in module.children():
                if id(child) in seen:
                    continue
                seen.add(id(child))
                if _is_causal_lm(child):
                    return child
                below.append(child)
        level = below
    raise STRAttachError(
        f"could not find the causal LM inside {type(root).__name__}: looked for {owner} itself and its "
        "submodules being a PEFT model or having get_output_embeddings() (a transformers PreTrainedModel). "
        f"Pass `model=`: an attribute path such as 'model' or 'net.lm', or a callable taking {owner} (and "
        "`decoder=` / `head=` if those cannot be found inside it)."
    )


def _from_getter(base: nn.Module, getter_name: str) -> Any:
    """What `base.<getter_name>()` returns, or None where the model lacks or does not implement it."""
    getter = getattr(base, getter_name, None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (AttributeError, NotImplementedError, TypeError):
        return None


def find_decoder(base: nn.Module, spec: ModuleSpec = None) -> nn.Module:
    """The decoder backbone whose output is the final normed hidden state."""
    explicit = _resolve(base, spec, "decoder")
    if explicit is not None:
        return explicit
    found = _from_getter(base, "get_decoder")
    if isinstance(found, nn.Module) and found is not base:
        return found
    for name in DECODER_ATTRIBUTES:
        found = getattr(base, name, None)
        if isinstance(found, nn.Module):
            return found
    raise STRAttachError(
        f"could not find the decoder of {type(base).__name__}: looked for get_decoder() and the attributes "
        f"{', '.join(DECODER_ATTRIBUTES)}. Pass `decoder=` (a module, an attribute path such as 'model', or a "
        "callable taking the model) to register_str_hook."
    )


def find_head(base: nn.Module, spec: ModuleSpec = None) -> nn.Module:
    """The LM head (output embeddings)."""
    explicit = _resolve(base, spec, "head")
    found: Any = explicit if explicit is not None else _from_getter(base, "get_output_embeddings")
    if found is None:
        for name in HEAD_ATTRIBUTES:
            candidate = getattr(base, name, None)
            if isinstance(candidate, nn.Module):
                found = candidate
                break
    if found is None:
        raise STRAttachError(
            f"could not find the LM head of {type(base).__name__}: looked for get_output_embeddings() and the "
            f"attributes {', '.join(HEAD_ATTRIBUTES)}. Pass `head=` (a module, an attribute path such as "
            "'lm_head', or a callable taking the model) to register_str_hook."
        )
    weight = getattr(found, "weight", None)
    if not isinstance(weight, torch.Tensor) or len(full_shape(weight)) != 2:
        raise STRAttachError(
            f"the LM head {type(found).__name__} has no 2-D `weight` [vocab, hidden]; str-hooks projects head "
            "rows and supports Linear heads (plain, PEFT LoRA, PEFT modules_to_save). Pass `head=` to name one."
        )
    head: nn.Module = found
    return head


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


def hidden_from_output(output: Any) -> torch.Tensor | None:
    """The final hidden state from a decoder's output (ModelOutput, tuple or tensor)."""
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class HeadRows:
    """Projects hidden states onto the k safety rows of an LM head, through the logit transform.

    Frozen weights are read once (gathered from DTensor shards when sharded) and reused; a trainable
    weight, or LoRA on the head, is read live each call so gradients reach it. The head is re-read on
    every call, so PEFT's `disable_adapter()` (which swaps modules_to_save copies and turns LoRA off)
    is honoured.
    """

    def __init__(self, head: nn.Module, token_ids: list[int], transform: LogitTransform) -> None:
        self.head = head
        self.transform = transform
        self._ids = DeviceCopies(torch.tensor(token_ids, dtype=torch.long))
        self._frozen_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        lora_layer: Any = head if hasattr(head, "lora_A") and hasattr(head, "lora_B") else None
        if lora_layer is not None and any(getattr(lora_layer, "use_dora", {}).values()):
            raise STRAttachError(
                "DoRA on the LM head is not supported by str-hooks; use plain LoRA on the head."
            )
        self.lora_layer = lora_layer
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
        if weight.requires_grad or (bias is not None and bias.requires_grad):
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
            out = out + self._lora_delta(hidden).float()
        return self.transform(out)

    def _lora_delta(self, hidden: torch.Tensor) -> torch.Tensor:
        # PEFT's LoRA Linear exposes only the base weight; add scaling * B[S] (A dropout(h)) ourselves.
        layer: Any = self.lora_layer
        delta = torch.zeros(
            (*hidden.shape[:-1], self._ids.host.numel()), device=hidden.device, dtype=torch.float32
        )
        if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
            return delta
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            dropout = layer.lora_dropout[name]
            x = dropout(hidden.to(lora_a.weight.dtype))
            ids = self.ids_on(lora_b.weight.device)
            b_rows = lora_b.weight.index_select(0, ids)
            part = lora_a(x) @ b_rows.T
            if getattr(lora_b, "bias", None) is not None:
                part = part + lora_b.bias.index_select(0, ids)
            delta = delta + part.float() * float(layer.scaling[name])
        return delta
