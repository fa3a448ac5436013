"""Lightning integration: `STRCallback` adds the Safety Token Regularization penalty to the loss that a
LightningModule's `training_step` returns, and logs its metrics with `pl_module.log`."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from str_hooks.optional import require

require("lightning", "lightning")  # an ImportError that names the install

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.utilities.model_helpers import is_overridden  # noqa: E402
from typing_extensions import override  # noqa: E402

from str_hooks.attach import register_str_hook  # noqa: E402
from str_hooks.driver import HostNormalization, StepDriver, build_probe  # noqa: E402
from str_hooks.errors import STRAttachError, STRConfigError, STRError  # noqa: E402
from str_hooks.handle import STRHandle  # noqa: E402
from str_hooks.projection import ModuleSpec, find_causal_lm  # noqa: E402
from str_hooks.schemas.config import STRConfig  # noqa: E402
from str_hooks.schemas.load import load_config  # noqa: E402
from str_hooks.tokens import SafetyTokens  # noqa: E402

ModelSpec = nn.Module | str | Callable[[pl.LightningModule], nn.Module] | None

# Marker on the wrapper we put on `pl_module.training_step`, so a second callback cannot wrap it twice.
_WRAPPED_ATTR = "_str_hooks_wrapped"


class STRCallback(pl.Callback):
    r"""Safety Token Regularization for a LightningModule that fine-tunes a causal LM.

    In `setup("fit")` the callback finds the causal LM inside the LightningModule, attaches the STR hook
    to it (`register_str_hook`) and wraps `pl_module.training_step` on the instance, so the loss it
    returns gains the penalty as a per-micro-batch mean (like an HF causal LM's cross-entropy): Lightning's
    division by `accumulate_grad_batches`, its AMP scaling and DDP's gradient averaging then treat the
    penalty exactly like the loss. When the LightningModule builds its model in its own `setup` or in
    `configure_model` (both run after callbacks' `setup`), the callback attaches in `on_fit_start`.

    Once per optimizer step it advances the coef warm-up and the anchor schedule and logs, with
    `pl_module.log` (prefix `logging.prefix`, default `str/`): `penalty` (the term in that step's loss),
    `drift` and `abs_drift` (mean z - r and |z - r| of the safety logits), `drift/<token>` for the
    `logging.top_tokens` highest-weight tokens, `coef`, `skipped` and, every `probe.every` steps,
    `refusal_rate` (the same keys as every integration: `str_hooks.driver.StepDriver`). `teardown` and `on_exception` detach the hook and restore
    `training_step`; `state_dict` / `load_state_dict` carry the step count through checkpoints.

    Args:
        config: an `STRConfig`, a dict, or a YAML/JSON path; None uses the defaults (default: None).
        tokenizer: the model's tokenizer; needed to mine safety tokens, for `reference.source: anchors`
            and for the refusal probe (default: None).
        tokens: safety tokens (`mine_safety_tokens` / `SafetyTokens.load`); None mines them with
            `tokenizer` or loads `tokens.path` (default: None).
        reference_model: the frozen aligned model, for `reference.source: model` (default: None).
        model: the causal LM inside the LightningModule: an attribute path from it (`"model"`,
            `"net.lm"`), a callable taking the LightningModule, or the module itself. None finds it: the
            LightningModule itself when it has `get_output_embeddings()`, else its shallowest submodule that
            is a PEFT model or has `get_output_embeddings()` (any transformers `PreTrainedModel`)
            (default: None).
        decoder: the decoder backbone, when it cannot be found inside the causal LM (a module, an
            attribute path from the causal LM, or a callable) (default: None).
        head: the LM head, likewise (default: None).

    Raises:
        STRConfigError: the config is invalid, the probe is on without a tokenizer, or there are neither tokens nor a tokenizer
            (at construction).
        STRAttachError: no causal LM is found, `model=` names a missing attribute path, the LightningModule
            uses manual optimization, or the hook cannot attach (at `setup` / `on_fit_start`).
        STRError: `training_step` returned something other than the loss (at the first step).

    Example: `examples/lightning_module.py` (a runnable LightningModule with a tiny model).
    """

    def __init__(
        self,
        config: STRConfig | dict[str, Any] | str | Path | None = None,
        *,
        tokenizer: Any = None,
        tokens: SafetyTokens | None = None,
        reference_model: nn.Module | None = None,
        model: ModelSpec = None,
        decoder: ModuleSpec = None,
        head: ModuleSpec = None,
    ) -> None:
        super().__init__()
        self.config = load_config(config if config is not None else STRConfig())
        if model is not None and not isinstance(model, nn.Module | str) and not callable(model):
            raise TypeError(
                f"`model` must be an attribute path, a callable taking the LightningModule, or a module; got "
                f"{type(model).__name__}."
            )
        if isinstance(model, str) and not model.strip("."):
            raise STRConfigError(
                f"`model` is the empty attribute path {model!r}: name it, e.g. 'model' or 'net.lm'."
            )
        if reference_model is not None and not isinstance(reference_model, nn.Module):
            raise TypeError(
                f"`reference_model` must be a torch module, got {type(reference_model).__name__}."
            )
        if tokens is None and tokenizer is None and self.config.tokens.path is None:
            raise STRConfigError(
                "STRCallback has no safety tokens and no tokenizer to mine them with: pass tokenizer=..., "
                "tokens=... (from mine_safety_tokens or SafetyTokens.load), or set `tokens.path`."
            )
        self.probe = build_probe(self.config, tokenizer, "STRCallback")
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.reference_model = reference_model
        self.model_spec = model
        self.decoder = decoder
        self.head = head
        self._handle: STRHandle | None = None
        self._driver: StepDriver | None = None
        self._pl_module: pl.LightningModule | None = None
        self._causal_lm: nn.Module | None = None
        self._original_step: Any = None  # the instance attribute `training_step` we shadowed, if any
        self._deferred = False
        # State to apply at the next attach: from `load_state_dict` (Lightning restores callbacks after
        # `setup`, or after `on_fit_start` for strategies that restore late) or from a previous fit.
        self._pending_state: dict[str, Any] | None = None
        self._accumulate = 1
        self._stepped = False

    # -- public state --------------------------------------------------------------------------------
    @property
    def handle(self) -> STRHandle | None:
        """The attached `STRHandle` during `fit`, None outside it."""
        return self._handle

    @property
    def step_count(self) -> int:
        """Optimizer steps seen (drives the coef warm-up and the anchor schedule); kept across fits."""
        if self._handle is not None:
            return self._handle.step_count
        return int((self._pending_state or {}).get("step", 0))

    # -- lifecycle -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise STRAttachError(
                f"{type(pl_module).__name__} uses manual optimization (automatic_optimization=False), where the "
                "loss training_step returns is never used, so STRCallback cannot add the penalty: attach "
                "str_hooks.register_str_hook to the model yourself and add handle.loss() to the loss you "
                "pass to manual_backward."
            )
        try:
            causal_lm = self._find_causal_lm(pl_module)
        except STRAttachError:
            # Lightning runs callbacks' `setup` before the LightningModule's own `setup` and
            # `configure_model`, where models are often built or PEFT-wrapped: retry in `on_fit_start`.
            if not (is_overridden("configure_model", pl_module) or is_overridden("setup", pl_module)):
                raise
            self._deferred = True
            return
        self._attach(trainer, pl_module, causal_lm)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._deferred:
            return
        self._deferred = False
        self._attach(trainer, pl_module, self._find_causal_lm(pl_module))
        handle = self._handle
        assert handle is not None
        if handle.uses_anchors and handle.peft_model is None and trainer.ckpt_path is not None:
            self._detach()
            raise STRAttachError(
                "`reference.source` is 'anchors' with full fine-tuning, and the causal LM is built in "
                f"{type(pl_module).__name__}.setup/configure_model, so STRCallback attaches after the "
                "checkpoint's weights are loaded: the anchors' reference would be the fine-tuned model. Build "
                "the model in __init__, or use PEFT adapters."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning calls `on_exception`, not `teardown`, when fit raises: nothing may be left behind.
        self._detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._handle is not None:
            return {"handle": self._handle.state_dict()}
        return {"handle": self._pending_state} if self._pending_state is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("handle")
        if state is None:
            return
        if self._handle is not None:
            self._handle.load_state_dict(state)
        else:
            self._pending_state = dict(state)

    # -- per step ------------------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning calls this exactly once per optimizer step, after the last micro-batch's backward, also
        # for the shorter accumulation window at the end of an epoch (which a `batch_idx % accumulate`
        # rule misses); the step itself is counted in `on_train_batch_end`, after the weights changed.
        self._stepped = True
        if self._driver is not None:
            self._driver.before_optimizer_step(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        driver = self._driver
        if driver is None or not self._stepped:
            return
        self._stepped = False
        # Every rank runs a due probe (identical weights, identical greedy replies): a sharded model needs
        # all ranks in its forward, so the probe must not run on rank 0 alone.
        driver.end_step(self._causal_lm)
        # The metrics are device tensors until read: read them on Lightning's logging steps only (the means
        # over the steps since the last read), not every optimizer step.
        every = int(getattr(trainer, "log_every_n_steps", 1) or 1)
        if trainer.global_step % every == 0 or trainer.is_last_batch:
            for key, value in driver.log_metrics().items():
                pl_module.log(key, value, on_step=True, on_epoch=False, sync_dist=True)

    # -- internals -----------------------------------------------------------------------------------
    def _find_causal_lm(self, pl_module: pl.LightningModule) -> nn.Module:
        return find_causal_lm(pl_module, self.model_spec, "the LightningModule")

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, causal_lm: nn.Module) -> None:
        self._detach()  # a previous fit that ended without teardown (should not happen, but be safe)
        current = getattr(pl_module, "training_step", None)
        if getattr(current, _WRAPPED_ATTR, False):
            raise STRAttachError(
                f"{type(pl_module).__name__}.training_step is already wrapped by another STRCallback: use one."
            )
        handle = register_str_hook(
            causal_lm,
            self.config,
            tokens=self.tokens,
            tokenizer=self.tokenizer,
            reference_model=self.reference_model,
            decoder=self.decoder,
            head=self.head,
        )
        try:
            if self._pending_state is not None:
                handle.load_state_dict(self._pending_state)
        except BaseException:
            handle.remove()
            raise
        self._pending_state = None
        self._handle = handle
        self._driver = StepDriver(handle, self.probe)
        self._pl_module = pl_module
        self._causal_lm = causal_lm
        self._accumulate = int(trainer.accumulate_grad_batches)
        self._stepped = False
        self._original_step = pl_module.__dict__.get("training_step")
        original = pl_module.training_step

        # Lightning looks `training_step` up on the instance, also under DDP/FSDP (its forward redirection
        # calls `getattr(module, "training_step")` inside the wrapper's forward), so this wrapper runs
        # inside the strategy's forward and the penalty's gradient is reduced like the loss's.
        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = self._fold_anchors(args, kwargs)
            return self._add_penalty(pl_module, original(*args, **kwargs))

        setattr(training_step, _WRAPPED_ATTR, True)
        pl_module.training_step = training_step  # type: ignore[method-assign]

    def _detach(self) -> None:
        pl_module, self._pl_module = self._pl_module, None
        if pl_module is not None:
            current = pl_module.__dict__.get("training_step")
            if getattr(current, _WRAPPED_ATTR, False):
                if self._original_step is not None:
                    pl_module.training_step = self._original_step  # type: ignore[method-assign]
                else:
                    del pl_module.training_step
        self._original_step = None
        self._causal_lm = None
        self._deferred = False
        handle, self._handle = self._handle, None
        self._driver = None
        if handle is not None:
            # Kept so that `state_dict()` after fit and a second fit continue from this step.
            self._pending_state = handle.state_dict()
            handle.remove()

    def _fold_anchors(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """`reference.anchor_placement: folded`: hand training_step the batch with this step's anchors
        packed in (the step must forward the batch's keys as given, `model(**batch)`)."""
        driver = self._driver
        if driver is None or self.config.reference.anchor_placement != "folded":
            return args, kwargs
        if args:
            return (driver.prepare_batch(args[0]), *args[1:]), kwargs
        if "batch" in kwargs:
            return args, {**kwargs, "batch": driver.prepare_batch(kwargs["batch"])}
        raise STRError(
            "`reference.anchor_placement` is 'folded' but training_step was called without a batch to fold; "
            "set `reference.anchor_placement: separate`."
        )

    def _add_penalty(self, pl_module: pl.LightningModule, output: Any) -> Any:
        driver = self._driver
        if driver is None:  # detached while a step was running (cannot happen in a normal fit)
            return output
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, torch.Tensor):
            shape = (
                f"a {type(output).__name__} without a 'loss' tensor" if isinstance(output, Mapping) else None
            )
            raise STRError(
                f"{type(pl_module).__name__}.training_step returned {shape or type(output).__name__}: with "
                "STRCallback, training_step must return the loss (a tensor, or a dict with a 'loss' tensor) so "
                "the penalty can be added to it; returning None to skip a batch is not supported."
            )
        # Lightning divides every micro-batch's loss by `accumulate_grad_batches` (and scales it for AMP).
        normalization = HostNormalization(
            accumulation_steps=self._accumulate, host_divides_by=self._accumulate
        )
        new_loss = loss + driver.penalty(normalization).to(loss.device)
        if isinstance(output, Mapping):
            if isinstance(output, dict):
                updated = copy.copy(output)
                updated["loss"] = new_loss
                return updated
            return {**output, "loss": new_loss}
        return new_loss


__all__ = ["STRCallback"]
