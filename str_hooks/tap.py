"""`ModelTap`: forward hooks that capture a causal LM's inputs, final hidden state and logits.

One tap per model (the policy, and a separate reference model when there is one). The hooks write into
the tap's current *sink*; `redirect()` swaps in a fresh sink so a nested forward (a reference or anchor
forward inside `handle.loss()`) never overwrites the training forward's capture.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from str_hooks.errors import STRAttachError
from str_hooks.modules import (
    ModuleSpec,
    find_decoder,
    find_head,
    full_shape,
    hidden_from_output,
    unwrap_model,
)
from str_hooks.projection import HeadRows, LogitTransform

# Forward kwargs that belong to the loss or the generation cache, not to the inputs of a reference forward.
NON_INPUT_KWARGS = frozenset(
    {
        "labels",
        "num_items_in_batch",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "use_cache",
        "past_key_values",
        "logits_to_keep",
        "return_token_type_ids",
        "shift_labels",
        "fused_lm_head",  # TRL's fused LM head: the reference forward needs hidden states only
        "output_router_logits",
    }
)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode (no dropout), then restore each flag exactly."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def logits_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, rtol: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(max |actual - expected|, max |expected| floored at 1, whether the error is within tolerance). The
    tolerance follows the model's precision: bf16/fp16 logits carry ~3 significant digits."""
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs().max()
    tolerance = 2e-2 if dtype in (torch.bfloat16, torch.float16) else rtol
    return err, scale, bool(err <= tolerance * scale)


class Sink:
    """What one forward left behind."""

    def __init__(self) -> None:
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        # [B, T, k] float32, projected inside the forward (where sharded heads are materialized).
        self.safety_logits: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        # [N, V] float32 full-vocabulary logits at the positions requested with `ModelTap.request_points`.
        self.point_logits: torch.Tensor | None = None
        self.training: bool = False
        self.grad_enabled: bool = False
        # Set by the causal-LM pre-hook, cleared by the decoder pre-hook of the same forward.
        self.awaiting_decoder: bool = False
        # True when only the decoder's inputs were seen (a wrapper called `causal_lm.forward` directly).
        self.from_decoder: bool = False
        # The forward's KV cache, kept only for `ModelTap.run(..., use_cache=True)` (greedy openings).
        self.past_key_values: Any = None

    @classmethod
    def of_forward(cls, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Sink:
        """A fresh capture of the forward `module` is about to run."""
        sink = cls()
        sink.args, sink.kwargs = args, dict(kwargs)
        sink.training = module.training
        sink.grad_enabled = torch.is_grad_enabled()
        return sink

    def input_ids(self) -> torch.Tensor | None:
        ids = self.kwargs.get("input_ids")
        if ids is None and self.args and isinstance(self.args[0], torch.Tensor):
            ids = self.args[0]
        return ids if isinstance(ids, torch.Tensor) else None

    def get(self, name: str) -> Any:
        return self.kwargs.get(name)


class ModelTap:
    """Hooks on one causal LM: inputs (pre-hook on the causal LM), hidden state (decoder output) and
    logits (causal LM output), plus the projection onto the safety rows of its head.

    Args:
        model: the model as the user holds it (plain, PEFT-wrapped, or DDP/FSDP-wrapped).
        token_ids: safety token ids.
        decoder, head: optional overrides (module, attribute path from the causal LM, or callable).
        head_gradient: whether the safety values it computes carry a gradient to a trainable head's weights.

    Raises:
        STRAttachError: the decoder or head cannot be found, or the head is not a Linear-like module.
    """

    def __init__(
        self,
        model: nn.Module,
        token_ids: list[int],
        decoder: ModuleSpec = None,
        head: ModuleSpec = None,
        head_gradient: bool = True,
    ) -> None:
        self.model = model
        self.causal_lm = unwrap_model(model)
        self.decoder = find_decoder(self.causal_lm, decoder)
        self.head = find_head(self.causal_lm, head)
        head_weight: Any = self.head.weight
        vocab = full_shape(head_weight)[0]
        bad = [i for i in token_ids if not 0 <= i < vocab]
        if bad:
            raise STRAttachError(
                f"safety token ids {bad} are outside the head of {type(self.causal_lm).__name__} (vocab {vocab}): "
                "the tokens were mined for another tokenizer; mine them with this model's tokenizer."
            )
        self.transform = LogitTransform.from_config(getattr(self.causal_lm, "config", None))
        self.rows = HeadRows(self.head, token_ids, self.transform, head_gradient)
        self.sink = Sink()
        # (rows, cols) whose full logits the next forward computes; consumed by that forward.
        self._point_request: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            params = inspect.signature(self.causal_lm.forward).parameters
            self.accepts_logits_to_keep = "logits_to_keep" in params
            self.accepts_use_cache = "use_cache" in params
            # The KV cache's argument (and output field): `cache` since transformers 5.2x, `past_key_values`
            # before. With it and `position_ids`, greedy openings decode one token per forward.
            self.cache_argument = next((n for n in ("cache", "past_key_values") if n in params), None)
            self.can_decode_with_cache = (
                self.accepts_use_cache and self.cache_argument is not None and "position_ids" in params
            )
        except (TypeError, ValueError):
            self.accepts_logits_to_keep = False
            self.accepts_use_cache = False
            self.cache_argument = None
            self.can_decode_with_cache = False

    # -- hooks ---------------------------------------------------------------------------------------
    def attach(self) -> None:
        self._handles.append(self.causal_lm.register_forward_pre_hook(self._on_inputs, with_kwargs=True))
        self._handles.append(
            self.decoder.register_forward_pre_hook(self._on_decoder_inputs, with_kwargs=True)
        )
        self._handles.append(self.decoder.register_forward_hook(self._on_hidden))
        self._handles.append(self.causal_lm.register_forward_hook(self._on_output))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.sink = Sink()
        self._point_request = None

    def _on_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.sink = Sink.of_forward(module, args, kwargs)
        self.sink.awaiting_decoder = True

    def _on_decoder_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.sink.awaiting_decoder:
            self.sink.awaiting_decoder = False
            return
        # The causal LM's hooks did not fire for this forward: a wrapper called `causal_lm.forward(...)`
        # directly (PEFT <= 0.20 does for task_type CAUSAL_LM). Start a fresh capture from the decoder's
        # inputs, so the hidden state is never attributed to a stale capture; labels then come from
        # `handle.loss(labels=...)` (the trainer integrations pass them) or their absence is an error.
        self.sink = Sink.of_forward(module, args, kwargs)
        self.sink.from_decoder = True

    def _on_hidden(self, module: nn.Module, args: Any, output: Any) -> None:
        # Project here, inside the causal LM's forward: under FSDP2 the root's parameters (the head among
        # them) are unsharded only while its forward runs.
        hidden = hidden_from_output(output)
        self.sink.safety_logits = None if hidden is None else self.rows.project(hidden)
        request, self._point_request = self._point_request, None
        if request is not None and hidden is not None:
            rows, cols = request
            self.sink.point_logits = self.point_logits(hidden[rows.to(hidden.device), cols.to(hidden.device)])

    def request_points(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Have the next forward compute full-vocabulary logits at (rows[i], cols[i]) into
        `sink.point_logits`: a few rows of the vocabulary, never the [B, T, V] tensor (the training forward may
        keep no logits at all, e.g. `logits_to_keep` over the training positions when anchors are folded)."""
        self._point_request = (rows, cols)

    def point_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [N, V] in float32 from hidden states [N, d], through the head module as the
        forward calls it (adapters on the head included) and the logit transform; no gradient to the head's
        weights under `penalty.head_gradient: false`."""
        return self.transform(self.rows.full_logits(hidden).float())

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        logits = getattr(output, "logits", None)
        self.sink.logits = logits if isinstance(logits, torch.Tensor) else None

    @contextlib.contextmanager
    def redirect(self) -> Iterator[None]:
        """Let a nested forward capture into its own sink; the previous capture is restored afterwards."""
        saved = self.sink
        try:
            yield
        finally:
            self.sink = saved

    def take(self) -> Sink:
        """Hand over the current capture and forget it (frees it once the loss is built)."""
        sink, self.sink = self.sink, Sink()
        return sink

    # -- forwards ------------------------------------------------------------------------------------
    def device(self) -> torch.device:
        return self.rows.weight.device

    def forward_inputs(self, sink: Sink, full_logits: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Args for re-running the captured forward as a reference: no labels, and when only hidden states
        are needed, `logits_to_keep=1` so no [B, T, V] logits are built."""
        kwargs = {k: v for k, v in sink.kwargs.items() if k not in NON_INPUT_KWARGS}
        kwargs.update(self.lean_kwargs(full_logits=full_logits))
        return sink.args, kwargs

    def lean_kwargs(self, full_logits: bool = False) -> dict[str, Any]:
        """Forward kwargs for our own forwards: no KV cache (the config default would build one under
        no_grad), and `logits_to_keep=1` when only the hidden states are needed."""
        kwargs: dict[str, Any] = {}
        if self.accepts_use_cache:
            kwargs["use_cache"] = False
        if not full_logits and self.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return kwargs

    def run(self, *args: Any, **kwargs: Any) -> Sink:
        """Run the causal LM and return what it left in a fresh sink (with the forward's KV cache when it
        was asked to build one)."""
        with self.redirect():
            output = self.causal_lm(*args, **kwargs)
            sink = self.sink
            if kwargs.get("use_cache") and self.cache_argument is not None:
                sink.past_key_values = getattr(output, self.cache_argument, None)
        if sink.safety_logits is None:
            raise STRAttachError(
                f"the decoder {type(self.decoder).__name__} of {type(self.causal_lm).__name__} did not yield a "
                "hidden-state tensor; pass `decoder=` naming the module whose output is the final normed "
                "hidden state."
            )
        return sink

    def verify_projection(self, probe_ids: list[int], rtol: float = 1e-3) -> bool | None:
        """Check once that projected safety logits equal the model's own logits at those ids.

        Returns True when they match, None when the model builds no logits (fused kernels).

        Raises:
            STRAttachError: they differ (an unknown logit transform or a wrong head), or are not finite.
        """
        ids = torch.tensor([probe_ids], dtype=torch.long, device=self.device())
        with torch.no_grad(), eval_mode(self.causal_lm):
            sink = self.run(
                input_ids=ids, attention_mask=torch.ones_like(ids), **self.lean_kwargs(full_logits=True)
            )
            projected = sink.safety_logits
            assert projected is not None  # run() guarantees it
        if not torch.isfinite(projected).all():
            raise STRAttachError(
                "the projected safety logits are NaN/inf on a probe input: the model's weights are not finite."
            )
        if sink.logits is None:
            return None
        real = sink.logits[..., self.rows.ids_on(sink.logits.device)].float()
        if real.shape != projected.shape:
            return None
        err, scale, close = logits_close(projected.to(real.device), real, sink.logits.dtype, rtol)
        if not close:
            raise STRAttachError(
                f"safety logits projected from hidden states differ from {type(self.causal_lm).__name__}'s own "
                f"logits by {float(err):.4g} (max |logit| {float(scale):.4g}): the model applies a logit "
                f"transform str-hooks does not know (known: softcap={self.transform.softcap}, "
                f"scale={self.transform.scale}), or `head=`/`decoder=` name the wrong modules. Set "
                "`verify_projection: false` only if you have checked the projection yourself."
            )
        return True
