"""The `penalty` section: the penalty on the safety-token logits and where it is applied."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from str_hooks.schemas.base import Section, unset_by_default, unused_error

PenaltyForm = Literal["mse", "hinge", "logprob", "kl"]
PositionMode = Literal["supervised", "all", "first_n"]
NonFiniteAction = Literal["raise", "skip"]


class PenaltyConfig(Section):
    """The penalty on the safety-token logits and where it is applied."""

    form: PenaltyForm = Field(
        default="kl",
        description=(
            "Default: `kl` with `reference.source` 'anchors' (the default source), `mse` with any other source "
            "(the form the training-position families were studied with; results/decision). "
            "`mse`: (z - r)^2, anchors the safety logits both ways. `hinge`: relu(-(z - r + margin))^2, only "
            "forbids them falling more than `margin` below the reference. `logprob`: (z - r)^2 on log-softmax "
            "values, so a task token that gains probability counts even where the safety logits stay put. `kl`: "
            "KL(reference || policy) between the two distributions coarse-grained to the k safety tokens plus one "
            "'everything else' bucket (token weights do not apply). `logprob` and `kl` need the full-vocabulary "
            "softmax: at anchors (source `anchors`) it is taken at the anchors' positions only (a few rows of "
            "the vocabulary); at training positions (sources `adapter`, `model`) the training forward must "
            "build logits (no fused loss kernel; checked at attach). Source `cache` keeps only k logits per "
            "position and takes `mse` or `hinge`."
        ),
    )
    margin: float = Field(
        default=0.0,
        description="For form `hinge`: how far (in logits) a safety logit may fall before it is penalized. >= 0.",
    )
    positions: PositionMode = Field(
        default="supervised",
        description=(
            "Where the penalty is evaluated on training batches. `supervised`: positions whose next-token "
            "label is not -100 (shifted exactly like the causal-LM loss). `all`: every non-padding position. "
            "`first_n`: the first `first_n` supervised positions of each sequence (the decision point)."
        ),
    )
    first_n: int = Field(
        default=1, description="For positions `first_n`: how many positions per sequence. >= 1."
    )
    min_reference_mass: float | None = unset_by_default(
        "For the training-position sources (`adapter`, `model`) with form `kl` or `logprob`: penalize only the "
        "positions where the reference puts at least this probability on the safety tokens, i.e. where the "
        "aligned model would open a refusal. A harmful row's first answer positions pass (the aligned model "
        "refuses there); a benign row's answer positions do not, so the task is not pinned to the reference's "
        "small safety mass there (the ungated coarse KL cost SST-2 accuracy 72 points in "
        "results/harmful_mixing). The sum still divides by the same normalizer (every penalized-position "
        "candidate, or the host's). None: every position of `positions`. In (0, 1]."
    )
    head_gradient: bool = Field(
        default=True,
        description=(
            "Whether the penalty's gradient reaches a trainable LM head (full fine-tuning, where the head is "
            "often tied to the input embeddings, or LoRA on the head). The head is shared by every prompt: "
            "under Adam a small but steady pull on the safety tokens' head rows moves them by the full learning "
            "rate each step, raising those tokens everywhere, not only at the anchors. false: the penalty "
            "uses the head's current weights without a gradient to them and moves the model through its "
            "hidden states only (as under LoRA on the body, where the head is frozen); the task's own loss "
            "still trains the head. Needs an nn.Linear or PEFT LoRA Linear head when the head is trainable."
        ),
    )
    on_nonfinite: NonFiniteAction = Field(
        default="raise",
        description=(
            "What to do when the projected safety logits or the penalty are NaN/inf: `raise` an error, or "
            "`skip` the step with a warning (the count is in `metrics()['skipped']`). The check runs once per "
            "optimizer step, before it (`handle.check_step()`; the micro-batches never wait for the device): "
            "the non-finite term is 0, and since a non-finite forward can put NaN into every gradient, the "
            "trainer integrations drop the step's gradients under `skip` (the optimizer step changes nothing)."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> PenaltyConfig:
        if self.margin < 0:
            raise ValueError(f"`penalty.margin` must be >= 0, got {self.margin}: use 0 or a positive margin.")
        if self.margin != 0 and self.form != "hinge":
            why = "the margin is only used by form 'hinge'; "
            raise unused_error("penalty.margin", f"{self.margin}", "penalty.form", self.form, "hinge", why)
        gate = self.min_reference_mass
        if gate is not None and not 0 < gate <= 1:
            raise ValueError(
                f"`penalty.min_reference_mass` must be in (0, 1], got {gate}: e.g. 0.5 (where the aligned model "
                "would more likely refuse than not), or remove it."
            )
        if gate is not None and self.form not in ("kl", "logprob"):
            why = "the gate reads the reference's safety-token probability, which only forms kl and logprob keep; "
            raise unused_error("penalty.min_reference_mass", f"{gate}", "penalty.form", self.form, "kl", why)
        if self.first_n < 1:
            raise ValueError(f"`penalty.first_n` must be >= 1, got {self.first_n}.")
        if self.first_n != 1 and self.positions != "first_n":
            raise unused_error(
                "penalty.first_n", f"{self.first_n}", "penalty.positions", self.positions, "first_n"
            )
        return self


__all__ = ["NonFiniteAction", "PenaltyConfig", "PenaltyForm", "PositionMode"]
