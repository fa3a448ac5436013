"""`STRConfig`: every option of Safety Token Regularization, validated before any training step.

Validation has two phases. Shape, ranges and cross-field rules are checked here, when the config is
built (from a dict, a YAML or JSON file, or an Axolotl `str:` block). Checks that need the model (does it
have adapters, does its forward build logits) run when the hook attaches, still before the first step.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TokenMethod = Literal["frequency", "contrastive", "list"]
PenaltyForm = Literal["mse", "hinge", "logprob", "kl"]
PositionMode = Literal["supervised", "all", "first_n"]
ReferenceSource = Literal["adapter", "model", "cache", "anchors"]
AnchorPlacement = Literal["separate", "folded"]
FoldPadding = Literal["auto", "yes", "no"]
NonFiniteAction = Literal["raise", "skip"]


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, with a did-you-mean hint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def _set_off_default(self, names: set[str]) -> list[str]:
        """The fields among `names` given explicitly with a value other than their default, sorted.

        A dump (`model_dump_json`) writes every field, defaults included; a field that only carries its
        default must not count as "set", or a config would not round-trip through JSON.
        """
        fields = type(self).model_fields
        return sorted(
            name
            for name in names & self.model_fields_set
            if getattr(self, name) != fields[name].get_default(call_default_factory=True)
        )

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        unknown = [key for key in data if key not in known]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ValueError(
                f"unknown key `{key}` (value {data[key]!r}) in {cls.__name__}.{hint} "
                f"Known keys: {', '.join(sorted(known))}."
            )
        return data


class TokensConfig(_Section):
    """Which safety tokens are regularized and how they are found."""

    method: TokenMethod = Field(
        default="frequency",
        description=(
            "How safety tokens are mined. `frequency`: position-weighted token frequency over refusal "
            "templates (needs only the tokenizer). `contrastive`: tokens whose first-response log-prob "
            "the aligned model raises on harmful versus benign prompts (needs the model). `list`: the "
            "tokens named in `strings`."
        ),
    )
    k: int = Field(default=32, description="Number of safety tokens to keep. Must be >= 1.")
    templates: str | None = Field(
        default=None,
        description=(
            "Path to a file of refusal templates (one per line, or a JSON list of strings). None uses the "
            "package's own default templates."
        ),
    )
    strings: list[str | int] | None = Field(
        default=None,
        description="For method `list`: token strings (each must be one token) or token ids.",
    )
    path: str | None = Field(
        default=None,
        description=(
            "Path to a saved SafetyTokens JSON (from `str-hooks mine` or `SafetyTokens.save`). When set, "
            "the tokens are loaded from it instead of mined, and checked against the tokenizer."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> TokensConfig:
        if self.k < 1:
            raise ValueError(
                f"`tokens.k` must be >= 1, got {self.k}: set a positive number of tokens, e.g. 32."
            )
        if self.method == "list" and not self.strings and self.path is None:
            raise ValueError(
                "`tokens.method` is 'list' but `tokens.strings` is empty: name the tokens, e.g. "
                "strings: ['Sorry', 'cannot'], or use method 'frequency'."
            )
        if self.strings and self.method != "list":
            raise ValueError(
                f"`tokens.strings` is set ({self.strings!r}) but `tokens.method` is {self.method!r}: strings "
                "are only used by "
                "method 'list'; set method: list or remove strings."
            )
        return self


class PenaltyConfig(_Section):
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
            raise ValueError(
                f"`penalty.margin` is {self.margin} but `penalty.form` is {self.form!r}: the margin is only "
                "used by form 'hinge'; set form: hinge or remove margin."
            )
        if self.first_n < 1:
            raise ValueError(f"`penalty.first_n` must be >= 1, got {self.first_n}.")
        if self.first_n != 1 and self.positions != "first_n":
            raise ValueError(
                f"`penalty.first_n` is {self.first_n} but `penalty.positions` is {self.positions!r}: set "
                "positions: first_n or remove first_n."
            )
        return self


class ReferenceConfig(_Section):
    """Where the reference (aligned-model) safety logits come from."""

    source: ReferenceSource = Field(
        default="anchors",
        description=(
            "`adapter`: the same PEFT model with adapters disabled, one no-grad forward per step (exact). "
            "`model`: a separate frozen reference model (passed as `reference_model=` or `model_path`). "
            "`cache`: reference logits precomputed over the training set (`str-hooks cache`), looked up "
            "per example, no extra forward. `anchors`: a fixed set of harmful prompts whose reference "
            "logits at the decision point are computed once at attach; the penalty is evaluated on them."
        ),
    )
    model_path: str | None = Field(
        default=None,
        description="For source `model`: a local path loaded with `AutoModelForCausalLM.from_pretrained`.",
    )
    cache_path: str | None = Field(
        default=None,
        description="For source `cache`: the `.safetensors` file written by `build_reference_cache`.",
    )
    anchors_path: str | None = Field(
        default=None,
        description=(
            "For source `anchors`: a file of harmful prompts (text, one per line; JSON list; CSV or JSONL with "
            "`anchors_column`). None uses the package's own anchor prompts."
        ),
    )
    anchors_column: str | None = Field(
        default=None, description="Column holding the prompt when `anchors_path` is a CSV or JSONL file."
    )
    anchor_batch_size: int = Field(
        default=8, description="Anchor prompts per anchor step (harmful and benign together). >= 1."
    )
    anchor_tokens: int = Field(
        default=4,
        description=(
            "How many positions of each anchor's opening are penalized. 1: the decision point only (the last "
            "prompt position). n > 1: the aligned model's own greedy opening of n tokens is generated once at "
            "attach (stopping early at end-of-sequence) and teacher-forced during training, and every position "
            "of it is penalized (refusals are decided over the first few tokens: 'I'm sorry, but I'). The "
            "anchor term is the mean over all penalized positions. >= 1."
        ),
    )
    benign_weight: float = Field(
        default=1.0,
        description=(
            "Weight of benign anchors relative to the harmful ones (whose weight is 1). > 0 adds benign "
            "anchors, pinned the same way to the aligned model's own behaviour (with `anchor_tokens` > 1, its "
            "own first answer tokens), so the penalty keeps answering what it answered as well as refusing what "
            "it refused. The anchor term is then the weighted mean over the step's points. 0 uses harmful "
            "anchors only. >= 0."
        ),
    )
    benign_anchors_path: str | None = Field(
        default=None,
        description=(
            "Benign anchor prompts (same file formats as `anchors_path`, same `anchors_column`). None, with "
            "`benign_weight` > 0, uses the package's own ordinary and sensitive-sounding safe prompts (none of "
            "them an XSTest prompt)."
        ),
    )
    anchor_every: int = Field(
        default=1,
        description=(
            "Penalize the anchors every this many optimizer steps (amortizes the cost; in results/study "
            "every 8th step lost the refusals that every step kept). >= 1."
        ),
    )
    anchor_placement: AnchorPlacement = Field(
        default="separate",
        description=(
            "`separate`: a forward+backward of its own for the anchor batch (any batch works; on a GPU "
            "this costs x1.28-x1.41 per anchor step, being latency-bound). `folded`: the anchors ride in "
            "the training forward as packed segments, in the rows' trailing padding where they fit, else in "
            "front of the rows (no extra forward, at most their tokens; the same gradient). Folded needs "
            "unpadded or right-padded `input_ids` batches, passed through `handle.prepare_batch` (the "
            "trainer integrations do it), and a transformers version that builds packed-sequence masks "
            "from position ids (checked at attach)."
        ),
    )
    fold_into_padding: FoldPadding = Field(
        default="auto",
        description=(
            "For `anchor_placement: folded`: whether anchors may go into the rows' trailing padding (no extra "
            "tokens) before going in front of the rows. Finding the padding reads the batch's attention mask "
            "on the host, which on an accelerator is a synchronization once per anchor step. `auto`: only for "
            "batches on the CPU (where reading costs nothing); `yes`: always; `no`: never read the batch "
            "(anchors always go in front; a left-padded or segment-numbered batch is then reported by "
            "`handle.step()` at the end of the step instead of before the forward)."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> ReferenceConfig:
        if self.source == "cache" and not self.cache_path:
            raise ValueError(
                "`reference.source` is 'cache' but `reference.cache_path` is not set: build a cache with "
                "`str-hooks cache` and set cache_path to its file."
            )
        if self.cache_path and self.source != "cache":
            raise ValueError(
                f"`reference.cache_path` is set ({self.cache_path!r}) but `reference.source` is "
                f"{self.source!r}: set source: cache "
                "or remove cache_path."
            )
        if self.model_path and self.source != "model":
            raise ValueError(
                f"`reference.model_path` is set ({self.model_path!r}) but `reference.source` is "
                f"{self.source!r}: set source: model "
                "or remove model_path."
            )
        anchor_fields_set = self._set_off_default(
            {
                "anchors_path",
                "anchors_column",
                "anchor_batch_size",
                "anchor_every",
                "anchor_placement",
                "anchor_tokens",
                "benign_weight",
                "benign_anchors_path",
                "fold_into_padding",
            }
        )
        if anchor_fields_set and self.source != "anchors":
            name = anchor_fields_set[0]
            raise ValueError(
                f"`reference.{name}` is set ({getattr(self, name)!r}) but `reference.source` is "
                f"{self.source!r}: anchor options are only used by source 'anchors'."
            )
        if self.anchor_batch_size < 1:
            raise ValueError(f"`reference.anchor_batch_size` must be >= 1, got {self.anchor_batch_size}.")
        if self.anchor_every < 1:
            raise ValueError(f"`reference.anchor_every` must be >= 1, got {self.anchor_every}.")
        if self.anchor_tokens < 1:
            raise ValueError(
                f"`reference.anchor_tokens` must be >= 1, got {self.anchor_tokens}: use 1 for the decision point "
                "only, or e.g. 4 for the first four tokens of the reply."
            )
        if not (self.benign_weight >= 0 and self.benign_weight != float("inf")):
            raise ValueError(
                f"`reference.benign_weight` must be a finite number >= 0, got {self.benign_weight}: use 0 for "
                "harmful anchors only, or e.g. 1.0."
            )
        if self.fold_into_padding != "auto" and self.anchor_placement != "folded":
            raise ValueError(
                f"`reference.fold_into_padding` is {self.fold_into_padding!r} but `reference.anchor_placement` is "
                f"{self.anchor_placement!r}: it only applies to folded anchors; set anchor_placement: folded or "
                "remove fold_into_padding."
            )
        if self.benign_anchors_path is not None and self.benign_weight == 0:
            raise ValueError(
                f"`reference.benign_anchors_path` is set ({self.benign_anchors_path!r}) but "
                "`reference.benign_weight` is 0, so no benign anchor would be used: set benign_weight, e.g. 1.0, "
                "or remove benign_anchors_path."
            )
        return self


class ProbeConfig(_Section):
    """The refusal probe: an early warning of eroding refusals, logged by the trainer integrations."""

    every: int = Field(
        default=0,
        description=(
            "Every this many optimizer steps, greedy-generate replies to `n_prompts` held-out harmful prompts "
            "and log the keyword-judged refusal rate as `str/refusal_rate`. 0 turns the probe off."
        ),
    )
    prompts_path: str | None = Field(
        default=None,
        description=(
            "Harmful prompts to probe with (text, JSON list, or CSV/JSONL with `column`). None uses the "
            "package's own harmful prompts; keep them out of the training data."
        ),
    )
    column: str | None = Field(
        default=None, description="Column holding the prompt when `prompts_path` is CSV/JSONL."
    )
    n_prompts: int = Field(default=16, description="How many prompts each probe generates for. >= 1.")
    max_new_tokens: int = Field(default=16, description="Tokens generated per reply. >= 1.")
    phrases: list[str] | None = Field(
        default=None,
        description="Refusal phrases of the keyword judge (substring match); None uses the package's own list.",
    )

    @model_validator(mode="after")
    def _check(self) -> ProbeConfig:
        if self.every < 0:
            raise ValueError(f"`probe.every` must be >= 0, got {self.every}: use 0 to turn the probe off.")
        if self.n_prompts < 1:
            raise ValueError(f"`probe.n_prompts` must be >= 1, got {self.n_prompts}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"`probe.max_new_tokens` must be >= 1, got {self.max_new_tokens}.")
        if self.phrases is not None and not [p for p in self.phrases if p.strip()]:
            raise ValueError(
                "`probe.phrases` is empty: give refusal phrases, or remove it to use the defaults."
            )
        others = self._set_off_default({"prompts_path", "column", "n_prompts", "max_new_tokens", "phrases"})
        if others and self.every == 0:
            raise ValueError(
                f"`probe.{others[0]}` is set ({getattr(self, others[0])!r}) but `probe.every` is 0, so the probe "
                "never runs: set every to a number of steps, e.g. 50."
            )
        return self


class LoggingConfig(_Section):
    """What `STRHandle.metrics()` reports and how integrations name it."""

    prefix: str = Field(default="str/", description="Prefix of metric names in trainer logs.")
    top_tokens: int = Field(
        default=3, description="Report the drift of this many highest-weight safety tokens separately. >= 0."
    )

    @model_validator(mode="after")
    def _check(self) -> LoggingConfig:
        if self.top_tokens < 0:
            raise ValueError(f"`logging.top_tokens` must be >= 0, got {self.top_tokens}.")
        return self


class STRConfig(_Section):
    """Configuration of Safety Token Regularization.

    Build it from a dict (`STRConfig.model_validate({...})`), a YAML or JSON file (`load_config(path)`),
    or an Axolotl `str:` block. Unknown keys are errors. Round-trips through JSON
    (`STRConfig.model_validate_json(cfg.model_dump_json())`).

    Example:
        >>> cfg = STRConfig.model_validate({"coef": 3.0})
        >>> cfg.reference.source, cfg.penalty.form, cfg.reference.anchor_tokens
        ('anchors', 'kl', 4)
        >>> STRConfig.model_validate({"reference": {"source": "adapter"}}).penalty.form
        'mse'
    """

    coef: float = Field(
        default=10.0,
        description=(
            "Strength of the penalty: the loss gains `coef * pen_sum / N`, N normalized like the host's "
            "cross-entropy. >= 0; 0 keeps the hook (metrics) but adds nothing. Coefficients compare within "
            "one form and source, not across them: 10 is the study's choice for the default (`kl` at anchors "
            "with 4-token openings and benign anchors); training-position `mse` needed 100 to keep refusals "
            "against an attack and cost 2x the task loss at 1 (results/decision)."
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
        if reference.source != "anchors":
            return f"{self.penalty.positions} positions"
        where = "the decision point of anchor prompts"
        if reference.anchor_tokens > 1:
            where += f" and up to {reference.anchor_tokens - 1} more tokens of the aligned model's openings"
        if reference.benign_weight > 0:
            where += f", benign anchors weighted {reference.benign_weight:g}"
        return where

    @model_validator(mode="after")
    def _form_follows_source(self) -> STRConfig:
        # The default form (kl) was chosen for anchors; the training-position sources were studied with mse,
        # and `cache` keeps k logits per position (mse or hinge only). The one source-dependent default.
        if "form" not in self.penalty.model_fields_set and self.reference.source != "anchors":
            self.penalty = self.penalty.model_copy(update={"form": "mse"})
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
        if self.reference.source == "anchors" and self.penalty._set_off_default({"positions"}):
            raise ValueError(
                f"`penalty.positions` is set ({self.penalty.positions!r}) but `reference.source` is "
                "'anchors': anchors are penalized at "
                "their decision point (the last prompt position); remove positions or pick another source."
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
