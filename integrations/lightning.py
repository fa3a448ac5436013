"""Lightning integration: `STRCallback` maps Lightning's events onto the `StepDriver`, adds the penalty to the
loss a LightningModule's `training_step` returns, and logs its metrics with `pl_module.log`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from str_hooks.optional import require

require("lightning", "lightning")  # an ImportError that names the install

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.utilities.model_helpers import is_overridden  # noqa: E402
from typing_extensions import Unpack, override  # noqa: E402

from str_hooks.adapter import AdapterBase, AttachOptions, ConfigLike, check_options, patched_by  # noqa: E402
from str_hooks.driver import HostNormalization, build_probe  # noqa: E402
from str_hooks.errors import STRAttachError, STRConfigError  # noqa: E402
from str_hooks.modules import find_causal_lm  # noqa: E402

ModelSpec = nn.Module | str | Callable[[pl.LightningModule], nn.Module] | None


class STRCallback(AdapterBase, pl.Callback):
    r"""Safety Token Regularization for a LightningModule that fine-tunes a causal LM.

    In `setup("fit")` (`on_fit_start` when the LightningModule builds its model in `setup`/`configure_model`)
    it attaches STR to the causal LM inside and wraps `pl_module.training_step` on the instance: the loss it
    returns gains the penalty as a per-micro-batch mean, which accumulation, AMP and DDP treat like the loss.
    Logs `str_hooks.driver.STEP_KEYS` once per optimizer step; `teardown` / `on_exception` undo everything.

    Args:
        config: an `STRConfig`, a dict, or a YAML/JSON path; None uses the defaults (default: None).
        tokenizer: the model's tokenizer, to mine tokens, for anchors and for the probe (default: None).
        tokens: safety tokens; None mines them with `tokenizer` or loads `tokens.path` (default: None).
        reference_model: the frozen aligned model, for `reference.source: model` (default: None).
        model: the causal LM inside the LightningModule: an attribute path from it (`"net.lm"`), a callable
            taking it, or the module; None finds it (`str_hooks.modules.find_causal_lm`) (default: None).
        decoder, head: the decoder and LM head when not found inside the causal LM (default: None).

    Raises:
        STRConfigError: an invalid config, the probe without a tokenizer, no tokens nor tokenizer (at init).
        STRAttachError: no causal LM found, a missing `model=` path, manual optimization, or a hook that
            cannot attach (at `setup` / `on_fit_start`).
        STRError: `training_step` returned something other than the loss (at the first step).

    Example: `examples/lightning_module.py` (a runnable LightningModule with a tiny model).
    """

    def __init__(
        self, config: ConfigLike = None, *, model: ModelSpec = None, **options: Unpack[AttachOptions]
    ) -> None:
        check_options(options, "STRCallback.__init__")
        super().__init__(config, **options)
        tokenizer, tokens, reference_model = self.tokenizer, self.tokens, self.reference_model
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
        self.model_spec = model
        self._causal_lm: nn.Module | None = None
        self._normalization = HostNormalization()
        self._deferred = False
        self._stepped = False

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
            causal_lm = find_causal_lm(pl_module, self.model_spec, "the LightningModule")
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
        self._attach(trainer, pl_module, find_causal_lm(pl_module, self.model_spec, "the LightningModule"))
        assert self.handle is not None
        if self.handle.uses_anchors and self.handle.peft_model is None and trainer.ckpt_path is not None:
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
        self._detach()  # Lightning calls this, not `teardown`, when fit raises: nothing may be left behind

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Once per optimizer step, also for an epoch's shorter last accumulation window (which a
        # `batch_idx % accumulate` rule misses); the step is counted in `on_train_batch_end`, once taken.
        self._stepped = True
        if self.driver is not None:
            self.driver.before_optimizer_step(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        driver = self.driver
        if driver is None or not self._stepped:
            return
        self._stepped = False
        # Every rank runs a due probe: a sharded model needs all ranks in its forward.
        driver.end_step(self._causal_lm)
        # The metrics are device tensors until read: read them on Lightning's logging steps only.
        every = int(getattr(trainer, "log_every_n_steps", 1) or 1)
        if trainer.global_step % every == 0 or trainer.is_last_batch:
            for key, value in driver.log_metrics().items():
                pl_module.log(key, value, on_step=True, on_epoch=False, sync_dist=True)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, causal_lm: nn.Module) -> None:
        self._detach()  # a previous fit that ended without teardown (should not happen, but be safe)
        if patched_by(pl_module, "training_step") is not None:
            raise STRAttachError(
                f"{type(pl_module).__name__}.training_step is already wrapped by another STRCallback: use one."
            )
        self.attach_driver(causal_lm, self.tokenizer)
        self._causal_lm, self._stepped = causal_lm, False
        # Lightning divides every micro-batch's loss by `accumulate_grad_batches` (and scales it for AMP).
        accumulate = int(trainer.accumulate_grad_batches)
        self._normalization = HostNormalization.of_host(accumulate, divides_by_accumulation=True)
        original, owner = pl_module.training_step, f"{type(pl_module).__name__}.training_step"

        # Lightning looks `training_step` up on the instance, also under DDP/FSDP (its forward redirection
        # calls `getattr(module, "training_step")` inside the wrapper's forward), so this wrapper runs
        # inside the strategy's forward and the penalty's gradient is reduced like the loss's.
        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            driver = self.driver
            if driver is None:  # detached while a step was running (cannot happen in a normal fit)
                return original(*args, **kwargs)
            args, kwargs = driver.prepare_call(args, kwargs, "training_step")
            return driver.add_to_output(original(*args, **kwargs), self._normalization, owner)

        self.patch(pl_module, "training_step", training_step)

    def _detach(self) -> None:
        self._causal_lm = None
        self._deferred = False
        self.detach_driver()


__all__ = ["STRCallback"]
