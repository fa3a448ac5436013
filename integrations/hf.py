"""Hugging Face Trainer and TRL SFTTrainer integration: `STRCallback` and `attach(trainer, cfg)`.

A `TrainerCallback` cannot change the loss, and TRL's default (fused LM head) loss path ignores
`outputs.loss`, so the penalty reaches the loss by wrapping `trainer.compute_loss` on the instance;
the callback drives the rest (attach after model wrapping, optimizer steps, metrics, probe, resume).
`attach()` does both; `STRCallback` alone finds its trainer at train begin and attaches itself, or
raises, never training without the penalty.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from str_hooks.attach import register_str_hook
from str_hooks.driver import HostNormalization, StepDriver, build_probe
from str_hooks.errors import STRError
from str_hooks.handle import STRHandle
from str_hooks.optional import require
from str_hooks.probe import ProbeRunner
from str_hooks.projection import ModuleSpec
from str_hooks.schemas.config import STRConfig
from str_hooks.schemas.load import load_config
from str_hooks.tokens import SafetyTokens

transformers: Any = require("transformers", "hf")

# Key of the STR state inside TrainerState.stateful_callbacks (saved in every checkpoint's
# trainer_state.json). Not a callback class name, so the Trainer's own callback restoring leaves it alone.
STATE_KEY = "str_hooks"
_WRAPPED_ATTR = "_str_hooks_callback"


class STRCallback(transformers.TrainerCallback):
    """Safety Token Regularization for the Hugging Face `Trainer` and TRL's `SFTTrainer`.

    Args:
        config: an `STRConfig`, a dict, a YAML/JSON path, or None for the defaults. Validated here.
        tokenizer: the model's tokenizer (default: the trainer's `processing_class`).
        tokens: safety tokens; None mines them at train begin as `config.tokens` says.
        reference_model: the frozen aligned model for `reference.source: model`.
        decoder: override for the decoder module (module, attribute path, or callable).
        head: override for the LM head.

    Metrics (prefix `logging.prefix`, default `str/`), means over the optimizer steps since the last log:
    `penalty` (the STR term in a step's loss), `coef`, `drift` / `abs_drift` (mean z - r and |z - r| of the
    safety logits), `drift/<token>` for the `logging.top_tokens` highest-weighted tokens, `skipped`, and
    `refusal_rate` when the probe ran (`probe.every`).

    Raises:
        STRConfigError: the config is invalid (at construction), or the probe is on without a tokenizer
            (at train begin).
        STRError: at train begin, when the callback cannot reach the trainer's loss (then call
            `attach(trainer, cfg)`), or with `DataParallel` (use DDP).

    Example:
        >>> from str_hooks.integrations.hf import STRCallback  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,  # doctest: +SKIP
        ...                   callbacks=[STRCallback({"coef": 0.1}, tokenizer=tok)])
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: STRConfig | dict[str, Any] | str | Path | None = None,
        *,
        tokenizer: Any = None,
        tokens: SafetyTokens | None = None,
        reference_model: nn.Module | None = None,
        decoder: ModuleSpec = None,
        head: ModuleSpec = None,
    ) -> None:
        self.config = load_config(config if config is not None else STRConfig())
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.reference_model = reference_model
        self.decoder = decoder
        self.head = head
        self.handle: STRHandle | None = None
        self.driver: StepDriver | None = None
        self.trainer: Any = None

    @property
    def probe(self) -> ProbeRunner | None:
        """The refusal probe (`probe.every`), once training has begun."""
        return self.driver.probe if self.driver is not None else None

    # -- the loss ------------------------------------------------------------------------------------
    def penalty(
        self, trainer: Any, num_items_in_batch: Any, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The penalty term for the micro-batch just forwarded, normalized exactly like the trainer's CE.

        The trainer's scaling, read from its own flags at run time (docs/design.md section 3): when its loss is
        already normalized over the accumulated batch (by `num_items_in_batch`: the model accepts loss
        kwargs, or a `compute_loss_func` is set) it does not divide by the accumulation steps, and under
        `average_tokens_across_devices` it multiplied its CE by `num_processes // tp_size` (undoing DDP's
        gradient averaging); otherwise it divides the loss by the accumulation steps. `labels` are the
        batch's labels as the trainer received them (the Trainer pops them for `compute_loss_func`).
        """
        if self.driver is None:
            raise STRError(
                "the STR hook is not attached: training must go through trainer.train(), which attaches it at "
                "train begin."
            )
        ga_steps = int(
            getattr(trainer, "current_gradient_accumulation_steps", None)
            or trainer.args.gradient_accumulation_steps
        )
        if not _loss_is_scaled_for_ga(trainer, num_items_in_batch):
            normalization = HostNormalization(accumulation_steps=ga_steps, host_divides_by=ga_steps)
        elif num_items_in_batch is not None:
            scale = _device_loss_scale(trainer) if trainer.args.average_tokens_across_devices else 1
            normalization = HostNormalization(num_items_in_batch, ga_steps, token_scale=scale)
        else:
            normalization = HostNormalization(accumulation_steps=ga_steps)
        return self.driver.penalty(normalization, labels)

    # -- lifecycle -----------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        trainer = self.trainer or _find_calling_trainer(self)
        if trainer is None:
            raise STRError(
                "STRCallback cannot reach this trainer's loss (a callback can only change `control`): attach "
                "it with `str_hooks.integrations.hf.attach(trainer, cfg)` before trainer.train()."
            )
        if self.trainer is None:
            _wrap_compute_loss(trainer, self)
        if getattr(args, "n_gpu", 0) > 1:
            raise STRError(
                f"STR does not support torch.nn.DataParallel (n_gpu={args.n_gpu}): launch one process per GPU "
                "(torchrun / accelerate launch) for DDP."
            )
        _move_to_front(trainer, self)
        tokenizer = self.tokenizer if self.tokenizer is not None else kwargs.get("processing_class")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        probe = build_probe(self.config, tokenizer, "STRCallback")
        saved: dict[str, Any] = (getattr(state, "stateful_callbacks", None) or {}).get(STATE_KEY) or {}
        resuming = bool(saved) and state.global_step > 0
        tokens = self.tokens
        if resuming and tokens is None:
            # The checkpoint holds the tokens the run was trained with: never re-mine on resume.
            tokens = SafetyTokens.from_dict(saved["tokens"], source="the checkpoint's STR state")
        if self.handle is not None:
            self.handle.remove()
        self.handle = register_str_hook(
            trainer.model,
            self.config,
            tokens=tokens,
            tokenizer=tokenizer,
            reference_model=self.reference_model,
            decoder=self.decoder,
            head=self.head,
        )
        self.driver = StepDriver(self.handle, probe)
        if resuming:
            self.driver.load_state_dict(saved)

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if self.driver is not None:
            self.driver.before_optimizer_step(optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.driver is None:
            return
        self.driver.end_step(model)
        # Saved in trainer_state.json by every checkpoint that follows this step.
        state.stateful_callbacks[STATE_KEY] = self.driver.state_dict()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if logs is None or "loss" not in logs or self.driver is None:
            return  # evaluation logs and the end-of-training summary carry no STR metrics
        extra = {k: v for k, v in self.driver.log_metrics().items() if math.isfinite(v)}
        logs.update(extra)
        # The Trainer appended this step's entry to log_history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            self.driver = None


def attach(
    trainer: Any,
    config: STRConfig | dict[str, Any] | str | Path | STRCallback | None = None,
    *,
    tokenizer: Any = None,
    tokens: SafetyTokens | None = None,
    reference_model: nn.Module | None = None,
    decoder: ModuleSpec = None,
    head: ModuleSpec = None,
) -> STRCallback:
    """Add STR to a `Trainer` / `SFTTrainer`: wraps `trainer.compute_loss` on the instance and adds the
    callback (first in the list, so metrics reach the reporting callbacks). Works on every loss path,
    TRL's fused LM head included. Call before `trainer.train()`.

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
    existing = getattr(trainer, _WRAPPED_ATTR, None)
    if isinstance(config, STRCallback):
        callback = config
    else:
        present = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, STRCallback)]
        if (
            present
            and config is None
            and all(v is None for v in (tokenizer, tokens, reference_model, decoder, head))
        ):
            callback = present[0]
        elif present:
            raise STRError(
                "this trainer already has an STRCallback; call attach(trainer) without a config to use it, or "
                "remove it first."
            )
        else:
            callback = STRCallback(
                config,
                tokenizer=tokenizer,
                tokens=tokens,
                reference_model=reference_model,
                decoder=decoder,
                head=head,
            )
    if existing is not None and existing is not callback:
        raise STRError("STR is already attached to this trainer; attach it once.")
    if existing is None:
        _wrap_compute_loss(trainer, callback)
    if callback not in trainer.callback_handler.callbacks:
        trainer.callback_handler.callbacks.insert(0, callback)
    _move_to_front(trainer, callback)
    return callback


def _wrap_compute_loss(trainer: Any, callback: STRCallback) -> None:
    original = trainer.compute_loss

    def compute_loss(
        model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        # Read before the call: the Trainer pops labels out of `inputs` for label smoothing / compute_loss_func.
        labels = inputs.get("labels") if isinstance(inputs, dict) else None
        if trainer.model.training and callback.driver is not None:
            # `reference.anchor_placement: folded`: this step's anchors ride in this forward (else a no-op).
            inputs = callback.driver.prepare_batch(inputs, extend_labels=_scores_all_hidden_states(trainer))
        result = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not trainer.model.training:
            return result  # evaluation: the reported eval loss excludes the penalty
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + callback.penalty(trainer, num_items_in_batch, labels).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    trainer.compute_loss = compute_loss
    setattr(trainer, _WRAPPED_ATTR, callback)
    callback.trainer = trainer


def _loss_is_scaled_for_ga(trainer: Any, num_items_in_batch: Any) -> bool:
    """Mirror of Trainer.training_step: whether the loss is already normalized over the accumulated batch
    (then the Trainer does not divide it by the accumulation steps)."""
    explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
    if explicit is not None:
        return bool(explicit)
    accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
    return (accepts and num_items_in_batch is not None) or getattr(
        trainer, "compute_loss_func", None
    ) is not None


def _scores_all_hidden_states(trainer: Any) -> bool:
    """Whether the trainer's loss reads labels aligned with every input position rather than the model's
    `logits_to_keep` logits: TRL's trainers (their fused LM head runs the backbone and scores every
    labelled position), so folded anchors extend the labels with -100 there."""
    return any(cls.__module__.split(".")[0] == "trl" for cls in type(trainer).__mro__)


def _device_loss_scale(trainer: Any) -> int:
    get_tp = getattr(trainer, "get_tp_size", None)
    tp_size = int(get_tp()) if callable(get_tp) else 1
    return int(trainer.accelerator.num_processes) // max(tp_size, 1)


def _move_to_front(trainer: Any, callback: STRCallback) -> None:
    # User callbacks' on_log run after the built-in reporting callbacks unless first in the list.
    callbacks = trainer.callback_handler.callbacks
    if callbacks and callbacks[0] is not callback:
        callbacks.remove(callback)
        callbacks.insert(0, callback)


def _find_calling_trainer(callback: STRCallback) -> Any:
    """The Trainer whose train() is firing on_train_begin: the first `self` up the stack that is a
    `transformers.Trainer` holding this callback."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if (
                isinstance(candidate, transformers.Trainer)
                and callback in candidate.callback_handler.callbacks
            ):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


__all__ = ["STATE_KEY", "STRCallback", "attach"]
