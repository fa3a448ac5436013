"""`STRPlugin`: Safety Token Regularization for `axolotl train`, through the Hugging Face integration.

The plugin validates the `str:` block when Axolotl registers it (before anything is loaded), and
attaches STR to the trainer in `post_trainer_create` with `str_hooks.integrations.hf.attach`, which wraps
the trainer's `compute_loss` on the instance: it composes with any trainer class Axolotl builds, and
with `cut_cross_entropy` / `liger_fused_linear_cross_entropy`, which never build logits (the safety
logits are projected from the final hidden state).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from str_hooks.adapter import patch_method
from str_hooks.errors import STRConfigError, STRError
from str_hooks.integrations.axolotl.validation import check_config
from str_hooks.optional import require
from str_hooks.reference import load_reference_model
from str_hooks.schemas.config import STRConfig

require("axolotl", "axolotl")

from axolotl.integrations.base import BasePlugin  # noqa: E402

try:
    from str_hooks.integrations import hf
except ImportError as exc:  # pragma: no cover - depends on the environment
    # Axolotl 0.19 swallows an ImportError from a plugin and trains without it: fail loudly instead.
    raise STRError(
        f"the str-hooks Axolotl plugin cannot import its Hugging Face integration ({exc}); without it Axolotl "
        "would train without STR. Install the missing package in this environment."
    ) from exc

# Axolotl's log filter shows INFO only for loggers named axolotl.*; the plugin reports there.
LOG = logging.getLogger("axolotl.integrations.str_hooks")


class STRPlugin(BasePlugin):
    """Axolotl plugin: Safety Token Regularization configured by a `str:` block in the YAML.

    Enable it with `plugins: [str_hooks.integrations.axolotl.STRPlugin]` and a `str:` block (the same
    options as `STRConfig`). Without a `str:` block it does nothing.

    Hooks:
        register: validates the `str:` block and the option combinations on the raw config (fail fast).
        post_trainer_create: attaches STR to the trainer through `str_hooks.integrations.hf.attach`;
            for `reference.source: model` it loads the reference (`reference.model_path`, default
            `base_model`) in the training dtype on the training device.
        post_train: detaches the hook (idempotent: Axolotl calls it twice).

    Raises:
        STRConfigError: in `register`, an invalid `str:` block or options that cannot work together.
        STRAttachError: in `post_trainer_create`, under DeepSpeed ZeRO-3 with a trainable LM head.

    Example:
        ```yaml
        plugins:
          - str_hooks.integrations.axolotl.STRPlugin
        str:
          coef: 0.1
          reference: {source: adapter}
        ```
    """

    def __init__(self) -> None:
        super().__init__()
        self.config: STRConfig | None = None
        self.callback: hf.STRCallback | None = None
        self._undo: Callable[[], None] | None = None

    def get_input_args(self) -> str:
        return "str_hooks.integrations.axolotl.args.STRArgs"

    def register(self, cfg: Any) -> None:
        # The manager is a process-wide singleton: forget any earlier config's state.
        self.callback = None
        self.config = check_config(cfg, plugin_required=False)
        if self.config is None:
            LOG.warning("the STR plugin is listed but the config has no `str:` block: STR is off.")

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        config = check_config(cfg, plugin_required=False)
        self.config = config
        if config is None:
            return
        reference_model = None
        if config.reference.source == "model":
            reference_model = _load_reference_model(config, cfg, trainer)
        tokenizer = getattr(trainer, "processing_class", None)
        self._undo = _route_tuner_forward_through_call(trainer.model)
        try:
            self.callback = hf.attach(trainer, config, tokenizer=tokenizer, reference_model=reference_model)
        except BaseException:
            self.post_train(cfg, trainer.model)
            raise
        where = config.where_penalized()
        LOG.info(
            "STR attached: coef %s, reference %s, penalty %s at %s, %d safety tokens (%s).",
            config.coef,
            config.reference.source,
            config.penalty.form,
            where,
            config.tokens.k,
            config.tokens.method,
        )

    def post_train(self, cfg: Any, model: Any) -> None:
        callback, self.callback = self.callback, None
        if callback is not None:
            # The callback detaches at train end; this covers a training loop that never fired it.
            callback.detach_driver()
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


def _route_tuner_forward_through_call(model: Any) -> Callable[[], None] | None:
    """Make PEFT < 0.21 call the causal LM as a module, on this model instance only; returns the undo.

    str-hooks captures the training forward's inputs and outputs with forward hooks on the causal LM.
    Under PEFT 0.20 (the version Axolotl 0.19 pins) a `PeftModelForCausalLM` (task_type CAUSAL_LM, as
    Axolotl builds it) reaches the causal LM as `tuner.model.forward(...)`, which skips module hooks: the
    penalty would silently be zero. PEFT 0.21 calls `tuner.model(...)`; do the same here.
    """
    tuner = getattr(model, "base_model", None)
    inner = getattr(tuner, "model", None)
    if not isinstance(tuner, nn.Module) or not isinstance(inner, nn.Module) or "forward" in vars(tuner):
        return None
    try:
        import peft
        from packaging.version import Version
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover - Axolotl depends on both
        return None
    if Version(peft.__version__) >= Version("0.21") or type(tuner).forward is not BaseTuner.forward:
        return None

    def forward(*args: Any, **kwargs: Any) -> Any:
        causal_lm: Any = tuner.model
        return causal_lm(*args, **kwargs)

    return patch_method(tuner, "forward", forward, owner=_route_tuner_forward_through_call)


def _load_reference_model(config: STRConfig, cfg: Any, trainer: Any) -> torch.nn.Module:
    """The frozen reference for `reference.source: model`, in the training dtype on the training device."""
    path = config.reference.model_path or cfg.get("base_model")
    if not path:
        raise STRConfigError(
            "`str.reference.source` is 'model' but neither `str.reference.model_path` nor `base_model` is set."
        )
    dtype = cfg.get("torch_dtype")
    LOG.info("STR: loading the reference model from %s", path)
    return load_reference_model(
        path,
        "`str.reference.model_path`" if config.reference.model_path else "`base_model`",
        dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
        device=trainer.args.device,
        trust_remote_code=bool(cfg.get("trust_remote_code")),
        local_only=False,  # `base_model` may be a hub id, which Axolotl itself resolves
    )


__all__ = ["STRPlugin"]
