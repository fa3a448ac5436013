"""Finding a causal LM, its decoder and its head inside whatever wraps it (PEFT, DDP, FSDP, DeepSpeed,
Lightning), and reading the final hidden state from a decoder's output. This is the only module that knows
about wrapper classes; it uses duck typing and imports none of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

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
