"""`STRConfig`: every option of Safety Token Regularization, validated before any training step.

Validation has two phases. Shape, ranges and cross-field rules are checked here, when the config is
built (from a dict, a YAML or JSON file, or an Axolotl `str:` block). Checks that need the model (does it
have adapters, does its forward build logits) run when the hook attaches, still before the first step.

Each section has a module of its own (`tokens`, `penalty`, `reference`, `monitoring`); this one holds
the top-level `STRConfig`, the cross-section rules, and keeps every config name importable from here.
"""

from __future__ import annotations

import warnings
from typing import Any

from pydantic import Field, model_validator

from str_hooks.schemas.base import Section
from str_hooks.schemas.monitoring import LoggingConfig, ProbeConfig
from str_hooks.schemas.penalty import NonFiniteAction, PenaltyConfig, PenaltyForm, PositionMode
from str_hooks.schemas.reference import AnchorPlacement, FoldPadding, ReferenceConfig, ReferenceSource
from str_hooks.schemas.tokens import TokenMethod, TokensConfig


class STRConfig(Section):
    """Configuration of Safety Token Regularization.

    Build it from a dict (`STRConfig.model_validate({...})`), a YAML or JSON file (`load_config(path)`),
    or an Axolotl `str:` block. Unknown keys are errors. Round-trips through JSON
    (`STRConfig.model_validate_json(cfg.model_dump_json())`).

    Raises:
        STRConfigError: an unknown key, or a value or combination that cannot work, built directly or
            assigned (the message names the field, the bad value and the fix). It is also pydantic's
            `ValidationError`, with pydantic's `errors()`; each section (`TokensConfig`, ...) does the same.

    Example:
        >>> cfg = STRConfig.model_validate({"coef": 3.0})
        >>> cfg.reference.source, cfg.penalty.form, cfg.reference.anchor_tokens
        ('anchors', 'kl', 4)
        >>> STRConfig.model_validate({"reference": {"source": "adapter"}}).penalty.form
        'mse'
    """

    coef: float = Field(
        default=30.0,
        description=(
            "Strength of the penalty: the loss gains `coef * pen_sum / N`, N normalized like the host's "
            "cross-entropy. >= 0; 0 keeps the hook (metrics) but adds nothing. Coefficients compare within "
            "one form and source, not across them. 30 for the default (`kl` at anchors with 4-token openings "
            "and benign anchors): with harmful 'Sure, here is' rows in the data, 10 kept 29-40 % of held-out "
            "AdvBench and 30 kept 95-99 %, at the same compute (results/harmful_mixing); training-position "
            "`mse` needed 100 to keep refusals against an attack and cost 2x the task loss at 1 (results/decision)."
        ),
    )
    warmup_steps: int = Field(
        default=0,
        description="Ramp coef linearly from 0 to `coef` over this many optimizer steps (`handle.step()` calls).",
    )
    verify_projection: bool = Field(
        default=True,
        description=(
            "At attach, check once that the safety logits projected from hidden states equal the model's own "
            "logits (catches a logit transform str-hooks does not know)."
        ),
    )
    tokens: TokensConfig = Field(default_factory=TokensConfig, description="Safety-token selection.")
    penalty: PenaltyConfig = Field(default_factory=PenaltyConfig, description="Penalty form and positions.")
    reference: ReferenceConfig = Field(
        default_factory=ReferenceConfig, description="Reference logits source."
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics.")
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="Refusal probe during training.")

    def where_penalized(self) -> str:
        """Where the penalty acts, in words (for logs and `str-hooks` checks)."""
        reference = self.reference
        rows = ""
        if reference.rows is not None:
            gate = self.penalty.min_reference_mass
            rows = (
                f", and {self.penalty.positions} positions where the reference's safety mass is >= {gate:g}"
            )
        if reference.source != "anchors":
            return f"{self.penalty.positions} positions"
        where = "the decision point of anchor prompts"
        if reference.anchor_tokens > 1:
            where += f" and up to {reference.anchor_tokens - 1} more tokens of the aligned model's openings"
        if reference.benign_weight > 0:
            where += f", benign anchors weighted {reference.benign_weight:g}"
        return where + rows

    @model_validator(mode="after")
    def _form_follows_source(self) -> STRConfig:
        # The default form (kl) was chosen for anchors; the training-position sources were studied with mse,
        # and `cache` keeps k logits per position (mse or hinge only). The one source-dependent default.
        if "form" not in self.penalty.model_fields_set and self.reference.source != "anchors":
            self.penalty = self.penalty.model_copy(update={"form": "mse"})
        return self

    @model_validator(mode="after")
    def _rows_gate(self) -> STRConfig:
        # Rows next to anchors exist for the rows that attack: ungated, the KL pins a benign task's answer
        # positions to the reference's small safety mass there (SST-2 accuracy 18.5 %, results/harmful_mixing).
        coarse = self.penalty.form in ("kl", "logprob")  # otherwise `_check` names the form
        unset = "min_reference_mass" not in self.penalty.model_fields_set  # an explicit null means ungated
        if self.reference.rows is not None and unset and coarse:
            self.penalty = self.penalty.model_copy(update={"min_reference_mass": 0.5})
        return self

    @model_validator(mode="after")
    def _check(self) -> STRConfig:
        if self.coef < 0 or self.coef != self.coef or self.coef == float("inf"):
            raise ValueError(f"`coef` must be a finite number >= 0, got {self.coef}: use e.g. 0.1 or 1.0.")
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}.")
        if self.penalty.form in ("logprob", "kl") and self.reference.source == "cache":
            raise ValueError(
                f"`penalty.form` {self.penalty.form!r} needs full-vocabulary reference logits, which "
                "`reference.source` 'cache' does not keep (k logits per position): use form 'mse' or 'hinge', "
                "or source 'adapter', 'model' or 'anchors'."
            )
        if self.reference.rows is not None and self.penalty.form not in ("kl", "logprob"):
            raise ValueError(
                f"`reference.rows` is {self.reference.rows!r} but `penalty.form` is {self.penalty.form!r}: the rows "
                "are penalized only where the reference would refuse, which only forms kl and logprob can tell; "
                "set form: kl or remove rows."
            )
        placed = self.penalty._set_off_default({"positions", "first_n"})
        if self.reference.source == "anchors" and self.reference.rows is None and placed:
            name = placed[-1]  # `positions` over `first_n` (which only counts with it)
            raise ValueError(
                f"`penalty.{name}` is set ({getattr(self.penalty, name)!r}) but `reference.source` is "
                "'anchors': anchors are penalized at "
                f"their decision point (the last prompt position); remove {name}, pick another source, or set "
                "`reference.rows` to penalize the training rows too."
            )
        # The gate and the screen both act on a reference forward at the training rows.
        forward_at_rows = self.reference.source in ("adapter", "model") or self.reference.rows is not None
        acts_on_rows = {
            "penalty.min_reference_mass": (
                self.penalty.min_reference_mass,
                "the gate picks training positions by the reference's full softmax",
            ),
            "reference.screen_mass": (self.reference.screen_mass, "the screen picks the rows it runs on"),
        }
        for name, (value, why) in acts_on_rows.items():
            if value is not None and not forward_at_rows:
                raise ValueError(
                    f"`{name}` is set ({value}) but `reference.source` is {self.reference.source!r}: {why}, which "
                    "only sources 'adapter' and 'model' (or `reference.rows`) compute; set source: adapter (or "
                    f"model), or reference.rows: adapter, or remove {name.rpartition('.')[2]}."
                )
        if self.reference.screen_mass is not None and self.penalty.form not in ("kl", "logprob"):
            why = "the screen reads the trained model's safety-token probability, which only forms kl and logprob keep; "
            raise ValueError(
                f"`reference.screen_mass` is set ({self.reference.screen_mass}) but `penalty.form` is "
                f"{self.penalty.form!r}: {why}set form: kl, or remove screen_mass."
            )
        if (
            self.probe.every > 0
            and self.probe.prompts_path is None
            and self.reference.source == "anchors"
            and self.reference.anchors_path is None
        ):
            warnings.warn(
                "`probe.every` is set and both `probe.prompts_path` and `reference.anchors_path` are unset: "
                "the probe's default prompts are the package's anchor prompts, which the penalty trains on, so "
                "`refusal_rate` is not a held-out measure. Set `probe.prompts_path` to held-out harmful prompts.",
                UserWarning,
                stacklevel=2,
            )
        return self


def __getattr__(name: str) -> Any:
    # File loading lives in schemas/load.py; `str_hooks.schemas.config.load_config` keeps working.
    if name == "load_config":
        from str_hooks.schemas.load import load_config

        return load_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnchorPlacement",
    "FoldPadding",
    "LoggingConfig",
    "NonFiniteAction",
    "PenaltyConfig",
    "PenaltyForm",
    "PositionMode",
    "ProbeConfig",
    "ReferenceConfig",
    "ReferenceSource",
    "STRConfig",
    "TokenMethod",
    "TokensConfig",
]
