"""The `reference` section: where the reference (aligned-model) safety logits come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from str_hooks.schemas.base import Section, unset_by_default, unused_error

ReferenceSource = Literal["adapter", "model", "cache", "anchors"]
AnchorPlacement = Literal["separate", "folded"]
FoldPadding = Literal["auto", "yes", "no"]
SharePrefix = Literal["auto", "yes", "no"]
RowsSource = Literal["adapter"]


class ReferenceConfig(Section):
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
    model_path: str | None = unset_by_default(
        "For source `model`: a local path loaded with `AutoModelForCausalLM.from_pretrained`."
    )
    cache_path: str | None = unset_by_default(
        "For source `cache`: the `.safetensors` file written by `build_reference_cache`."
    )
    anchors_path: str | None = unset_by_default(
        "For source `anchors`: a file of harmful prompts (text, one per line; JSON list; CSV or JSONL with "
        "`anchors_column`). None uses the package's own anchor prompts."
    )
    anchors_column: str | None = unset_by_default(
        "Column holding the prompt when `anchors_path` is a CSV or JSONL file."
    )
    anchor_batch_size: int = Field(
        default=2,
        description=(
            "Anchor prompts per anchor step (harmful and benign together), taken in turn from a fixed shuffle, "
            "so every anchor is visited once every len(anchors) / anchor_batch_size steps; the anchor term is a "
            "mean over points, so its expected size does not depend on this. On a 2-core CPU, 2 (the default) cost "
            "x1.15 of plain SFT's step on the real subject where 8 cost x1.45, and kept as many refusals with "
            "harmful rows in the data (results/harmful_mixing); on a GPU a separate anchor forward is "
            "latency-bound (about the same cost at any size), where `anchor_placement: folded` is the cheap "
            "option. >= 1."
        ),
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
    benign_anchors_path: str | None = unset_by_default(
        "Benign anchor prompts (same file formats as `anchors_path`, same `anchors_column`). None, with "
        "`benign_weight` > 0, uses the package's own ordinary and sensitive-sounding safe prompts (none of "
        "them an XSTest prompt)."
    )
    rows: RowsSource | None = unset_by_default(
        "For source `anchors`: also penalize the training rows' own positions (`penalty.positions`) against "
        "this reference, where the aligned model would refuse (`penalty.min_reference_mass`, 0.5 unless "
        "set; an explicit null penalizes every position): harmful rows in the user's data train compliance exactly there, which anchors elsewhere "
        "cannot hold (DESIGN section 10). `adapter`: the PEFT model with its adapters disabled, one no-grad "
        "forward per micro-batch. Needs form `kl` or `logprob`, a forward that builds logits, and anchors "
        "placed `separate`. The anchors' term and the rows' term add up, each normalized as alone (the "
        "rows' like the host's cross-entropy). None: anchors only."
    )
    screen_mass: float | None = unset_by_default(
        "For a reference forward at training rows (sources `adapter`, `model`, or `reference.rows`) with form "
        "`kl` or `logprob`: run that forward only on the rows where the model being trained still puts at "
        "least this probability on the safety tokens at one of the penalized positions (the rows it would "
        "still refuse, which the gate `penalty.min_reference_mass` is after), plus a random `audit_share` of "
        "the other rows, weighted by 1 / audit_share, so the penalty's expectation is that of the full "
        "forward (Horvitz-Thompson). Cuts the reference forward to the few rows that can matter; costs one "
        "host read per micro-batch (the number of rows chosen). None: every row. In (0, 1]."
    )
    audit_share: float = Field(
        default=0.125,
        description=(
            "For `screen_mass`: the probability that a row the model would not refuse still gets the reference "
            "forward (and weight 1 / audit_share), which catches rows the model already learned to comply with. "
            "Larger is closer to the full forward at more cost. In (0, 1]."
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
            "front of the rows (no extra forward, the same gradient; in front, every row is widened by the longest "
            "front segment: on SST-2's short rows on a 2-core CPU x1.59 of plain SFT's step where `separate` cost "
            "x1.29, results/harmful_mixing/STEP_COST.md). Folded needs "
            "unpadded or right-padded `input_ids` batches, passed through `handle.prepare_batch` (the "
            "trainer integrations do it), and a transformers version that builds packed-sequence masks "
            "from position ids (checked at attach)."
        ),
    )
    share_anchor_prefix: SharePrefix = Field(
        default="auto",
        description=(
            "For `anchor_placement: separate`: run the prompt prefix every anchor shares (the chat template's "
            "system prompt and role header, e.g. 24 of SmolLM2's ~47 anchor tokens) once per anchor step and "
            "the anchors' own tokens on its repeated KV cache: the same penalty and gradient at fewer tokens, "
            "for a second forward. `auto`: where that pays, on the CPU when it saves >= 96 tokens a step (on "
            "SmolLM2 8 anchors cost x0.78 of their full rows, 4 x0.98, 2 would cost x1.26); not on an "
            "accelerator, where the anchor step is latency-bound (docs/design.md section 4). `yes`: whenever "
            "they share a prefix; `no`: never. Never under activation checkpointing, and off (with a warning) "
            "where the model does not extend a passed cache or the two paths' values differ at attach. "
            "Decoding the anchors' openings at attach (no gradient, wide batches) runs the prefix once per "
            "batch under `auto` and `yes` on any device; `no` runs the whole prompts there too."
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
        for path, source in (("cache_path", "cache"), ("model_path", "model")):
            if getattr(self, path) and self.source != source:
                shown = f"set ({getattr(self, path)!r})"
                raise unused_error(f"reference.{path}", shown, "reference.source", self.source, source)
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
                "rows",
                "share_anchor_prefix",
            }
        )
        if anchor_fields_set and self.source != "anchors":
            name = anchor_fields_set[0]
            raise ValueError(
                f"`reference.{name}` is set ({getattr(self, name)!r}) but `reference.source` is "
                f"{self.source!r}: anchor options are only used by source 'anchors'."
            )
        if self.rows is not None and self.anchor_placement != "separate":
            raise ValueError(
                f"`reference.rows` is {self.rows!r} but `reference.anchor_placement` is "
                f"{self.anchor_placement!r}: the rows' reference forward re-runs the training batch, which folded "
                "anchors would be part of; set anchor_placement: separate or remove rows."
            )
        if self.screen_mass is not None and not 0 < self.screen_mass <= 1:
            raise ValueError(
                f"`reference.screen_mass` must be in (0, 1], got {self.screen_mass}: e.g. 0.05 (a tenth of the "
                "default gate), or remove it to run the reference on every row."
            )
        if not 0 < self.audit_share <= 1:
            raise ValueError(
                f"`reference.audit_share` must be in (0, 1], got {self.audit_share}: e.g. 0.125 (one row in eight)."
            )
        if self._set_off_default({"audit_share"}) and self.screen_mass is None:
            raise ValueError(
                f"`reference.audit_share` is set ({self.audit_share}) but `reference.screen_mass` is not: the audit "
                "only samples the rows the screen left out; set screen_mass (e.g. 0.05) or remove audit_share."
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
        # Each placement's own switch, set away from `auto` under the other placement, would do nothing.
        for switch, placement, why in (
            ("fold_into_padding", "folded", "it only applies to folded anchors; "),
            (
                "share_anchor_prefix",
                "separate",
                "folded anchors ride in the training forward and have no forward of their own; ",
            ),
        ):
            value = getattr(self, switch)
            if value != "auto" and self.anchor_placement != placement:
                where = "reference.anchor_placement"
                raise unused_error(
                    f"reference.{switch}", repr(value), where, self.anchor_placement, placement, why
                )
        if self.benign_anchors_path is not None and self.benign_weight == 0:
            raise ValueError(
                f"`reference.benign_anchors_path` is set ({self.benign_anchors_path!r}) but "
                "`reference.benign_weight` is 0, so no benign anchor would be used: set benign_weight, e.g. 1.0, "
                "or remove benign_anchors_path."
            )
        return self


__all__ = [
    "AnchorPlacement",
    "FoldPadding",
    "ReferenceConfig",
    "ReferenceSource",
    "RowsSource",
    "SharePrefix",
]
