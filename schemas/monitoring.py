"""The `probe` and `logging` sections: what the run reports about itself (the refusal probe, metrics)."""

from __future__ import annotations

from pydantic import Field, model_validator

from str_hooks.schemas.base import Section, unset_by_default


class ProbeConfig(Section):
    """The refusal probe: an early warning of eroding refusals, logged by the trainer integrations."""

    every: int = Field(
        default=0,
        description=(
            "Every this many optimizer steps, greedy-generate replies to `n_prompts` held-out harmful prompts "
            "and log the keyword-judged refusal rate as `str/refusal_rate`. 0 turns the probe off."
        ),
    )
    prompts_path: str | None = unset_by_default(
        "Harmful prompts to probe with (text, JSON list, or CSV/JSONL with `column`). None uses the "
        "package's own harmful prompts; keep them out of the training data."
    )
    column: str | None = unset_by_default("Column holding the prompt when `prompts_path` is CSV/JSONL.")
    n_prompts: int = Field(default=16, description="How many prompts each probe generates for. >= 1.")
    max_new_tokens: int = Field(default=16, description="Tokens generated per reply. >= 1.")
    phrases: list[str] | None = unset_by_default(
        "Refusal phrases of the keyword judge (substring match); None uses the package's own list."
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


class LoggingConfig(Section):
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


__all__ = ["LoggingConfig", "ProbeConfig"]
