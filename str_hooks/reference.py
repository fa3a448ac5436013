"""Reference safety logits: what the aligned model says at the penalized positions.

Each source answers `logits(sink, coarse)` with a float32 tensor for every position of the captured training
batch: [B, T, k] safety logits, or with `coarse` (the form `logprob` or `kl`) what that form compares
(`penalty.form_values`). The penalized positions are a mask applied afterwards (no selection, so no host
synchronization). Anchors are different (the penalty is evaluated on the anchor
prompts, not on the training batch) and live in `anchors.py`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from str_hooks.cache import ReferenceCache
from str_hooks.errors import STRAttachError, STRCacheError
from str_hooks.optional import require
from str_hooks.penalty import form_values
from str_hooks.screen import select_rows
from str_hooks.tap import ModelTap, Sink, eval_mode


class ReferenceSource(Protocol):
    name: str

    def logits(self, sink: Sink, coarse: str | None, rows: torch.Tensor | None = None) -> torch.Tensor: ...

    def missing(self) -> int: ...

    def describe(self) -> str: ...

    def detach(self) -> None: ...


def _move(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


class _ForwardReference:
    """Shared by `adapter` and `model`: re-run the captured inputs through a reference forward, no grad."""

    name = "forward"

    def __init__(self, tap: ModelTap) -> None:
        self.tap = tap

    def _context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def logits(self, sink: Sink, coarse: str | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Every row's values [B, T, C], or with `rows` ([n] indices) those rows' only, [n, T, C]."""
        args, kwargs = self.tap.forward_inputs(sink, full_logits=coarse is not None)
        assert sink.safety_logits is not None  # the site checked it
        if rows is not None:
            args, kwargs = select_rows(args, kwargs, rows, sink.safety_logits.shape[0])
        device = self.tap.device()
        args = tuple(_move(a, device) for a in args)
        kwargs = {k: _move(v, device) for k, v in kwargs.items()}
        width = sink.safety_logits.shape[1]
        with self._context(), torch.no_grad(), eval_mode(self.tap.causal_lm):
            ref = self.tap.run(*args, **kwargs)
            if coarse:
                if ref.logits is None or ref.logits.shape[1] != width:
                    raise STRAttachError(
                        "`penalty.form` 'logprob' or 'kl' needs full logits from the reference forward, but it "
                        "returned none: use form 'mse' or 'hinge'."
                    )
                out = form_values(
                    ref.logits, self.tap.rows.ids_on(ref.logits.device), coarse, low_memory=True
                )
            else:
                assert ref.safety_logits is not None  # tap.run guarantees it
                out = ref.safety_logits
        return out.to(sink.safety_logits.device)

    def missing(self) -> int:
        return 0

    def describe(self) -> str:
        return self.name

    def detach(self) -> None:
        return None


class AdapterReference(_ForwardReference):
    """The same PEFT model with its adapters disabled (exact: PEFT also restores modules_to_save heads)."""

    name = "adapter"

    def __init__(self, tap: ModelTap, peft_model: nn.Module) -> None:
        super().__init__(tap)
        self.peft_model = peft_model

    def _context(self) -> contextlib.AbstractContextManager[Any]:
        peft: Any = self.peft_model
        context: contextlib.AbstractContextManager[Any] = peft.disable_adapter()
        return context


class ModelReference(_ForwardReference):
    """A separate frozen reference model with its own hooks (any dtype, any device)."""

    name = "model"

    def __init__(self, reference_tap: ModelTap) -> None:
        super().__init__(reference_tap)
        reference_tap.attach()

    def detach(self) -> None:
        self.tap.detach()


class CacheReference:
    """Precomputed reference logits looked up by example key: no extra forward. With the cache's device keys
    the lookup runs on the batch's device (no host synchronization; the cache is copied to each device once,
    `P x k` fp16 values); a cache written without them is looked up on the host, with a one-time warning."""

    name = "cache"

    def __init__(self, cache: ReferenceCache, device: torch.device | None = None) -> None:
        self.cache = cache
        self._warned_host = False
        # [B] rows of the last lookup that are in the cache (None: all); the others are not penalized.
        self.found: torch.Tensor | None = None
        if device is not None:
            cache.device_index(device)  # copied to the training device at attach, not at the first step

    def logits(self, sink: Sink, coarse: str | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is not None:
            # The config refuses `screen_mass` with source cache: a lookup costs nothing to screen.
            raise STRCacheError(
                "the reference cache looks up whole batches; `reference.screen_mass` does not apply."
            )
        input_ids = sink.input_ids()
        if input_ids is None:
            raise STRCacheError(
                "`reference.source` 'cache' keys examples by their token ids, but the forward got no input_ids "
                "(inputs_embeds?): pass input_ids, or use source 'adapter'."
            )
        mask = sink.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) else None
        # Per device (a model moved after attach, e.g. by Lightning's strategy, gets its own copy).
        index = self.cache.device_index(input_ids.device)
        if index is not None:
            table, self.found = index.lookup(input_ids, mask)
            return table
        if not self._warned_host:
            self._warned_host = True
            warnings.warn(
                f"reference cache {str(self.cache.path)!r} has no device keys (written by an older str-hooks): "
                "each lookup copies the batch to the host and waits for the device. Rebuild it with "
                "`str-hooks cache` to look up on the device.",
                RuntimeWarning,
                stacklevel=2,
            )
        return self.cache.lookup(input_ids, mask)

    def missing(self) -> int:
        """Examples looked up since the last call that are not in the cache (a host read, once per optimizer
        step; their rows were not penalized)."""
        return self.cache.read_missing()

    def describe(self) -> str:
        return f"{str(self.cache.path)!r}, {len(self.cache)} examples"

    def detach(self) -> None:
        return None


def load_reference_model(
    path: str | Path,
    what: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    local_only: bool = True,
) -> nn.Module:
    """The frozen aligned model for `reference.source: model`, from a local `save_pretrained` folder, with
    gradients off and in eval mode (the one loader every entry point uses).

    Args:
        path: the model folder.
        what: how the caller names `path` in an error (e.g. "`reference.model_path`").
        dtype: load in this dtype (default: transformers' own choice).
        device: move it there (default: where transformers loads it, the CPU).
        trust_remote_code: passed to transformers.
        local_only: refuse a path that does not exist here (False lets transformers resolve a hub id, as
            Axolotl's `base_model` may be).

    Raises:
        STRAttachError: nothing at `path` (with `local_only`).
        ImportError: transformers is not installed (the message names the install).
    """
    transformers: Any = require("transformers", "hf")
    if local_only and not Path(path).exists():
        raise STRAttachError(f"{what} {str(path)!r} does not exist: give a local model directory.")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.requires_grad_(False)
    loaded: nn.Module = model.eval()
    return loaded if device is None else loaded.to(device)
