"""Hugging Face Trainer and TRL SFTTrainer: `STRCallback` maps the Trainer's events onto the `StepDriver` and
adds the term in `trainer.compute_loss`, wrapped on the instance (a callback cannot change the loss)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from str_hooks.adapter import (
    AdapterBase,
    AttachOptions,
    ConfigLike,
    check_options,
    find_caller,
    patch_method,
    patched_by,
)
from str_hooks.driver import HostNormalization, build_probe
from str_hooks.errors import STRError
from str_hooks.optional import require

transformers: Any = require("transformers", "hf")

# The STR state's key in TrainerState.stateful_callbacks (every checkpoint's trainer_state.json); not a class name,
# so the Trainer's own callback restoring leaves it alone.
STATE_KEY = "str_hooks"


class STRCallback(AdapterBase, transformers.TrainerCallback):
    """Safety Token Regularization for the Hugging Face `Trainer` and TRL's `SFTTrainer`.

    Args:
        config: an `STRConfig`, a dict, a YAML/JSON path, or None for the defaults. Validated here.
        tokenizer: the model's tokenizer (default: the trainer's `processing_class`).
        tokens: safety tokens; None mines them at train begin as `config.tokens` says.
        reference_model: the frozen aligned model for `reference.source: model`.
        decoder, head: overrides for the decoder and the LM head (module, attribute path, or callable).

    Metrics: `str_hooks.driver.STEP_KEYS`, prefixed (`logging.prefix`), in `log_history` and `report_to`.
    Raises:
        STRConfigError: an invalid config (at construction); the probe on without a tokenizer (train begin).
        STRError: at train begin, when the callback cannot reach the trainer's loss (then call
            `attach(trainer, cfg)`), or with `DataParallel` (use DDP).

    Example:
        >>> from str_hooks.integrations.hf import STRCallback  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,  # doctest: +SKIP
        ...                   callbacks=[STRCallback({"coef": 0.1}, tokenizer=tok)])
        >>> trainer.train()  # doctest: +SKIP
    """

    trainer: Any = None  # the Trainer whose compute_loss this callback wrapped

    def penalty(self, trainer: Any, num_items_in_batch: Any, labels: Tensor | None = None) -> Tensor:
        """The term for the micro-batch just forwarded, normalized like the trainer's CE (docs/design.md
        section 3); `labels` as the trainer received them (it pops them for `compute_loss_func`)."""
        if self.driver is None:
            raise STRError(
                "the STR hook is not attached: training must go through trainer.train(), which attaches it at "
                "train begin."
            )
        # Mirrors Trainer.training_step / compute_loss: divided by the accumulation steps unless normalized
        # over the step; a token-normalized CE times num_processes // tp_size (average_tokens_across_devices).
        n = num_items_in_batch
        steps = trainer.args.gradient_accumulation_steps
        steps = getattr(trainer, "current_gradient_accumulation_steps", None) or steps
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            accepts = getattr(trainer, "model_accepts_loss_kwargs", False) and n is not None
            scaled = accepts or getattr(trainer, "compute_loss_func", None) is not None
        scale = 1
        if scaled and n is not None and trainer.args.average_tokens_across_devices:
            tp = trainer.get_tp_size() if callable(getattr(trainer, "get_tp_size", None)) else 1
            scale = int(trainer.accelerator.num_processes) // max(int(tp), 1)
        normalization = HostNormalization.of_host(
            int(steps), divides_by_accumulation=not scaled, num_items_in_batch=n, token_scale=scale
        )
        return self.driver.penalty(normalization, labels)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        trainer = self.trainer
        trainer = trainer or find_caller(transformers.Trainer, lambda t: self in t.callback_handler.callbacks)
        if trainer is None:
            raise STRError(
                "STRCallback cannot reach this trainer's loss (a callback can only change `control`): attach "
                "it with `str_hooks.integrations.hf.attach(trainer, cfg)` before trainer.train()."
            )
        self._install(trainer)
        if getattr(args, "n_gpu", 0) > 1:
            raise STRError(
                f"STR does not support torch.nn.DataParallel (n_gpu={args.n_gpu}): launch one process per GPU "
                "(torchrun / accelerate launch) for DDP."
            )
        tokenizer = self.tokenizer if self.tokenizer is not None else kwargs.get("processing_class")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        self.probe = build_probe(self.config, tokenizer, "STRCallback")
        self.detach_driver()
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(STATE_KEY) or {}
        self.pending_state = saved if saved and state.global_step > 0 else None  # resuming a checkpoint
        self.attach_driver(trainer.model, tokenizer, tokens_from_state=True)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.driver is not None:
            self.driver.before_optimizer_step(kwargs.get("optimizer"))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.driver is not None:
            self.driver.end_step(model)
            # Saved in trainer_state.json by every checkpoint that follows this step.
            state.stateful_callbacks[STATE_KEY] = self.driver.state_dict()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or self.driver is None:
            return  # evaluation logs and the end-of-training summary carry no STR metrics
        extra = {k: v for k, v in self.driver.log_metrics().items() if math.isfinite(v)}
        logs.update(extra)
        # The Trainer appended this step's entry to log_history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.detach_driver()

    def _install(self, trainer: Any) -> None:
        # First in the list: user callbacks' on_log run after the built-in reporting callbacks otherwise.
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [self, *(cb for cb in callbacks if cb is not self)]
        if patched_by(trainer, "compute_loss") is self:
            return
        original = trainer.compute_loss
        # TRL's trainers score every input position (their fused LM head), not the `logits_to_keep` logits:
        # folded anchors extend the labels with -100 there.
        extend_labels = any(cls.__module__.split(".")[0] == "trl" for cls in type(trainer).__mro__)

        def compute_loss(
            model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            # Read first: the Trainer pops labels out of `inputs` for label smoothing / compute_loss_func.
            labels = inputs.get("labels") if isinstance(inputs, dict) else None
            if trainer.model.training and self.driver is not None:
                inputs = self.driver.prepare_batch(inputs, extend_labels=extend_labels)
            result = original(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            if not trainer.model.training:
                return result  # evaluation: the reported eval loss excludes the penalty
            loss, outputs = result if return_outputs else (result, None)
            loss = loss + self.penalty(trainer, num_items_in_batch, labels).to(loss.dtype)
            return (loss, outputs) if return_outputs else loss

        patch_method(trainer, "compute_loss", compute_loss, self)  # never undone: the callback stays
        self.trainer = trainer


def attach(
    trainer: Any,
    config: ConfigLike | STRCallback = None,
    **options: Unpack[AttachOptions],
) -> STRCallback:
    """Add STR to a `Trainer` / `SFTTrainer` before `trainer.train()`: wraps its `compute_loss` on the
    instance (every loss path, TRL's fused LM head included) and puts the callback first in its list.

    Args:
        trainer: the Trainer.
        config: the STR config, or an `STRCallback` already built (reused as is).
        tokenizer, tokens, reference_model, decoder, head: as for `STRCallback`.

    Returns:
        The `STRCallback` (its `.handle` is set once training begins).

    Raises:
        STRError: STR is already attached to this trainer with another callback.

    Example:
        >>> from str_hooks.integrations.hf import attach  # doctest: +SKIP
        >>> attach(trainer, {"coef": 0.1}, tokenizer=tok)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """
    check_options(options, "attach")
    present = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, STRCallback)]
    if isinstance(config, STRCallback):
        callback = config
    elif present and (config is not None or any(v is not None for v in options.values())):
        raise STRError(
            "this trainer already has an STRCallback; call attach(trainer) without a config to use it, or "
            "remove it first."
        )
    else:
        callback = present[0] if present else STRCallback(config, **options)
    existing = patched_by(trainer, "compute_loss")
    if existing is not None and existing is not callback:
        raise STRError("STR is already attached to this trainer; attach it once.")
    callback._install(trainer)
    return callback


__all__ = ["STATE_KEY", "STRCallback", "attach"]
