"""The study's named methods: every setting a run can be asked for by name (`METHODS`), each defined once.

A method's name is what results/*/runs.jsonl records: a name keeps meaning the settings its runs measured."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from str_hooks.schemas.load import load_config

# The package defaults that issue 12 changed, at their values before: training positions with the adapter
# reference and mse; at anchors, the decision point alone (one position per anchor, no benign anchors), the
# pre-change anchor settings. `Method` pins them unless a method sets them.
PRE_CHANGE_SETTINGS: dict[str, dict[str, Any]] = {
    "penalty": {"form": "mse"},
    "reference": {"source": "adapter"},
}
PRE_CHANGE_ANCHOR_SETTINGS: dict[str, Any] = {"anchor_tokens": 1, "benign_weight": 0.0}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # plain | str | kl | mix
    str_config: dict[str, Any] = field(default_factory=dict)
    kl_beta: float = 1.0
    grad_accum: int = 1  # micro-batches of 16 rows per optimizer step
    # As a user would write it: `str_config` reaches `attach` exactly (the package's defaults fill the rest,
    # its shipped anchors included, and it mines its own tokens), nothing pinned, no study anchors.
    as_shipped: bool = False

    def __post_init__(self) -> None:
        # A method's name must keep meaning what its runs in results/ measured: the settings that the
        # package's defaults changed for (issue 12) are pinned to their values before, unless a method sets them.
        if self.kind != "str" or self.as_shipped:
            return
        config = copy.deepcopy(self.str_config)
        for section, settings in PRE_CHANGE_SETTINGS.items():
            for key, value in settings.items():
                config.setdefault(section, {}).setdefault(key, value)
        reference = config["reference"]
        if reference["source"] == "anchors":
            for key, value in PRE_CHANGE_ANCHOR_SETTINGS.items():
                reference.setdefault(key, value)
        object.__setattr__(self, "str_config", config)

    @property
    def recorded_config(self) -> dict[str, Any] | None:
        """The STR config a run records (`config` in runs.jsonl); None for a method without STR."""
        return self.str_config if self.kind == "str" else None

    @property
    def anchor_every(self) -> int:
        """Optimizer steps per anchor term (`reference.anchor_every` as the package resolves the config)."""
        if self.kind != "str":
            return 1
        return load_config(self.str_config).reference.anchor_every


GATED_ROWS = "STR adapter kl gate0.5 c10 (as written)"
ANCHORS_AND_ROWS = "STR anchors + rows (as written)"
PREVIOUS_DEFAULT = "STR anchors c10 (as written)"
SCREENED_ROWS = "STR anchors + rows screened (as written)"
EVERY_THIRD = "STR anchors every3 c90 (as written)"
HEAD_GRADIENT_OFF = "STR no head gradient (as written)"
BENIGN_WEIGHT_3 = "STR benign weight 3 (as written)"
COEF_3 = "STR coef 3 (as written)"
# `{}` with the package's refusal probe on (issue 27 item 3's live `str/refusal_rate`): the penalty is `{}`'s; the
# probe generates for 16 of the prompts in LIVE_PROBE_PROMPTS every 30 steps (written by study/generality.py).
LIVE_PROBE = "STR as shipped {} + live probe"
LIVE_PROBE_PROMPTS = "runs/live_probe_prompts.json"


def _decision_method(form: str, coef: float, opening: int = 4, benign: float = 1.0) -> Method:
    """Folded anchors with form `form`, `anchor_tokens: opening` and `benign_weight: benign`, named by them."""
    parts = [f"STR anchors {form}"]
    if opening > 1:
        parts.append(f"open{opening}")
    if benign > 0:
        parts.append("benign" if benign == 1.0 else f"benign{benign:g}")
    reference: dict[str, Any] = {"source": "anchors", "anchor_placement": "folded"}
    if opening > 1:
        reference["anchor_tokens"] = opening
    if benign > 0:
        reference["benign_weight"] = benign
    return Method(
        f"{' '.join(parts)} c{coef:g} folded",
        "str",
        {"coef": coef, "penalty": {"form": form}, "reference": reference},
    )


METHODS = {
    m.name: m
    for m in [
        Method("plain SFT", "plain"),
        Method("mix 10% refusals", "mix"),
        Method("KL-SFT (full vocab, beta 1)", "kl"),
        Method("STR adapter mse c1", "str", {"coef": 1.0, "reference": {"source": "adapter"}}),
        Method(
            "STR adapter hinge c1",
            "str",
            {"coef": 1.0, "penalty": {"form": "hinge"}, "reference": {"source": "adapter"}},
        ),
        Method("STR model mse c1", "str", {"coef": 1.0, "reference": {"source": "model"}}),
        Method("STR cache mse c1", "str", {"coef": 1.0, "reference": {"source": "cache"}}),
        Method("STR anchors mse c10", "str", {"coef": 10.0, "reference": {"source": "anchors"}}),
        Method(
            "STR anchors mse c10 every 8",
            "str",
            {"coef": 10.0, "reference": {"source": "anchors", "anchor_every": 8}},
        ),
        Method(
            "STR anchors hinge c10",
            "str",
            {"coef": 10.0, "penalty": {"form": "hinge"}, "reference": {"source": "anchors"}},
        ),
        # The coefficient sweep that followed the main plan (see RESULTS.md).
        Method("STR adapter mse c10", "str", {"coef": 10.0, "reference": {"source": "adapter"}}),
        Method("STR adapter mse c100", "str", {"coef": 100.0, "reference": {"source": "adapter"}}),
        Method("STR anchors mse c3", "str", {"coef": 3.0, "reference": {"source": "anchors"}}),
        Method(
            "STR anchors mse c30 every 4",
            "str",
            {"coef": 30.0, "reference": {"source": "anchors", "anchor_every": 4}},
        ),
        Method(
            "STR anchors mse c100 every 8",
            "str",
            {"coef": 100.0, "reference": {"source": "anchors", "anchor_every": 8}},
        ),
        # Anchors folded into the training forward (issue 7): the same objective as a separate anchor
        # forward, then fewer anchors per step, to find how few tokens per step still keep the refusals.
        Method(
            "STR anchors mse c10 folded",
            "str",
            {"coef": 10.0, "reference": {"source": "anchors", "anchor_placement": "folded"}},
        ),
        # The coefficient curve of folded anchors on the real subject (c10 is the toy study's setting).
        Method(
            "STR anchors mse c1 folded",
            "str",
            {"coef": 1.0, "reference": {"source": "anchors", "anchor_placement": "folded"}},
        ),
        Method(
            "STR anchors mse c3 folded",
            "str",
            {"coef": 3.0, "reference": {"source": "anchors", "anchor_placement": "folded"}},
        ),
        Method(
            "STR anchors mse c10 folded, 2 per step",
            "str",
            {
                "coef": 10.0,
                "reference": {"source": "anchors", "anchor_placement": "folded", "anchor_batch_size": 2},
            },
        ),
        # The anchor term is a mean over the anchor batch: c40 on 2 anchors weighs each anchor as c10 on 8 does.
        Method(
            "STR anchors mse c40 folded, 2 per step",
            "str",
            {
                "coef": 40.0,
                "reference": {"source": "anchors", "anchor_placement": "folded", "anchor_batch_size": 2},
            },
        ),
        Method(
            "STR anchors mse c10 folded, 1 per step",
            "str",
            {
                "coef": 10.0,
                "reference": {"source": "anchors", "anchor_placement": "folded", "anchor_batch_size": 1},
            },
        ),
        # 4x the rows per optimizer step (gradient accumulation 4): the 8 folded anchors per step are then a
        # quarter of the share of the step's tokens. Compared with plain SFT at the same accumulation.
        Method("plain SFT, GA 4", "plain", grad_accum=4),
        Method(
            "STR anchors mse c10 folded, GA 4",
            "str",
            {"coef": 10.0, "reference": {"source": "anchors", "anchor_placement": "folded"}},
            grad_accum=4,
        ),
        # The decision-point methods (issue 12), each over a coefficient curve (study/decision.py): the coarse
        # KL and the log-probs at folded anchors over the aligned model's 4-token openings, with the package's
        # benign anchors at weight 1; their ablations; training-position STR at the answer's first 4 tokens.
        *[_decision_method("kl", coef) for coef in (1.0, 10.0, 100.0)],
        *[_decision_method("logprob", coef) for coef in (1.0, 3.0, 10.0)],
        _decision_method("kl", 10.0, opening=1, benign=0.0),
        _decision_method("kl", 10.0, opening=4, benign=0.0),
        *[
            Method(
                f"STR adapter mse first4 c{coef:g}",
                "str",
                {
                    "coef": coef,
                    "penalty": {"positions": "first_n", "first_n": 4},
                    "reference": {"source": "adapter"},
                },
            )
            for coef in (1.0, 10.0, 100.0)
        ],
        # The package's own anchor prompts, as a user without alignment data would run it.
        Method(
            "STR default-anchors mse c10",
            "str",
            {"coef": 10.0, "reference": {"source": "anchors"}},
            kl_beta=0.0,
        ),
        # Issue 26 (study/harmful_mixing.py): configs exactly as a user writes them, the package's defaults
        # filling the rest. `{}` is what every user gets.
        Method("STR as shipped {}", "str", {}, as_shipped=True),
        *[
            Method(
                f"STR adapter kl c{coef:g} (as written)",
                "str",
                {"coef": coef, "penalty": {"form": "kl"}, "reference": {"source": "adapter"}},
                as_shipped=True,
            )
            for coef in (1.0, 10.0)
        ],
        # Cheaper anchor steps (issue 26 item 4, issue 29 item 3): fewer anchors per step (the penalty is a
        # mean over points, so its expectation is unchanged), or the anchors folded into the training forward.
        *[
            Method(
                f"STR anchors {name} (as written)",
                "str",
                {"coef": 10.0, "reference": reference},
                as_shipped=True,
            )
            for name, reference in (
                ("b8", {"anchor_batch_size": 8}),
                ("b4", {"anchor_batch_size": 4}),
                ("b2", {"anchor_batch_size": 2}),
                ("folded", {"anchor_placement": "folded"}),
                ("folded b4", {"anchor_placement": "folded", "anchor_batch_size": 4}),
                ("open2 b4", {"anchor_tokens": 2, "anchor_batch_size": 4}),
            )
        ],
        # DESIGN section 10's self-gating made explicit: the coarse KL at training positions only where the
        # aligned model puts >= half its probability on the safety tokens (a refusal opening). The ungated KL
        # pinned SST-2's answer positions to the reference's small safety mass there (accuracy 18.5 %).
        Method(
            GATED_ROWS,
            "str",
            {
                "coef": 10.0,
                "penalty": {"form": "kl", "min_reference_mass": 0.5},
                "reference": {"source": "adapter"},
            },
            as_shipped=True,
        ),
        # The default until coef became 30 (the runs recorded as `STR as shipped {}` before, `recorded_as`);
        # the runs recorded as `STR anchors c30 (as written)` are now `STR as shipped {}`.
        Method(PREVIOUS_DEFAULT, "str", {"coef": 10.0}, as_shipped=True),
        # The anchors at coef 10 plus the same gate on the training rows (`reference.rows`: the anchors hold
        # prompts absent from the data, the rows hold the ones the data attacks).
        Method(ANCHORS_AND_ROWS, "str", {"coef": 10.0, "reference": {"rows": "adapter"}}, as_shipped=True),
        # The same with the reference forward screened to the rows the trained model still refuses (a tenth of
        # the gate) plus an audit of one other row in eight, weighted so the penalty's expectation is unchanged.
        Method(
            SCREENED_ROWS,
            "str",
            {"coef": 10.0, "reference": {"rows": "adapter", "screen_mass": 0.05}},
            as_shipped=True,
        ),
        # Is part of `{}`'s SST-2 cost the anchor term's sampling noise? `{}` (2 anchors a step, coef 30) logs a
        # gradient-norm spread of 4.3-7.3 against plain SFT's 0.4-1.2 and 8 anchors at coef 10's 0.46, and the
        # Trainer clips the summed gradient at norm 1: the same coef over 8 anchors a step. (On the demo, turning
        # clipping off did not close `{}`'s gap: results/demo_check.)
        Method(
            "STR anchors b8 c30 (as written)",
            "str",
            {"coef": 30.0, "reference": {"anchor_batch_size": 8}},
            as_shipped=True,
        ),
        # From stop 41 a separate anchor step runs the prompt prefix every anchor shares once (str_hooks/prefix.py:
        # the same penalty and gradient at fewer tokens); these run the full rows, as every run recorded before.
        *[
            Method(
                f"STR anchors {name} full rows (as written)",
                "str",
                {"reference": {**reference, "share_anchor_prefix": "no"}},
                as_shipped=True,
            )
            for name, reference in (
                ("b2", {}),
                ("b4 c30", {"anchor_batch_size": 4}),
                ("b8 c30", {"anchor_batch_size": 8}),
            )
        ],
        Method(
            "STR anchors b4 c30 (as written)", "str", {"reference": {"anchor_batch_size": 4}}, as_shipped=True
        ),
        # Issue 29 item 3: `{}`'s anchor step costs x1.25-1.29 of plain SFT's step at the study's shape. The same
        # anchor term every third optimizer step at 3x the coef: the penalty's expectation per step unchanged
        # (90 / 3 = 30), a third of its cost, three times its gradient on the steps that take it.
        Method(
            EVERY_THIRD,
            "str",
            {"coef": 90.0, "reference": {"anchor_every": 3}},
            as_shipped=True,
        ),
        # The two halvings of `{}`'s anchor tokens per step: every other step at twice the coef (the expectation
        # per step unchanged), or one anchor a step (harmful or benign as the package's fixed shuffle gives them,
        # each visited half as often).
        Method(
            "STR anchors every2 c60 (as written)",
            "str",
            {"coef": 60.0, "reference": {"anchor_every": 2}},
            as_shipped=True,
        ),
        Method(
            "STR anchors b1 (as written)", "str", {"reference": {"anchor_batch_size": 1}}, as_shipped=True
        ),
        # `{}` with its anchors folded into the training forward: the same penalty and gradient, no second
        # forward, on the CPU in the rows' trailing padding where they fit (issue 29 item 3's step cost).
        Method(
            "STR anchors folded c30 (as written)",
            "str",
            {"reference": {"anchor_placement": "folded"}},
            as_shipped=True,
        ),
        # The defaults with the penalty acting through hidden states only (no gradient to a trainable head):
        # under full fine-tuning `{}` over-refused (+22.8 points on XSTest safe, results/generality), the shared
        # head being one place a steady pull raises the safety tokens on every prompt. Measured (one seed, p = 10 %):
        # XSTest +14.4 against +22.8, Alpaca +11.5 against +12.0, validation over-refusal 30 % both: not the main
        # path; the default stays.
        Method(HEAD_GRADIENT_OFF, "str", {"penalty": {"head_gradient": False}}, as_shipped=True),
        # The defaults with the benign anchors' points weighted 3 (their 60 then outweigh the 120 harmful ones):
        # under full fine-tuning `{}` refused ordinary generative requests ("Write a recipe for lemon cake")
        # at p = 0 too (Alpaca +13.5), which the benign anchors' pinned answer openings are there to prevent.
        # Measured (one seed, p = 10 %): worse, Alpaca +24.5 against +12.0, validation over-refusal 40 % against 30 %.
        Method(BENIGN_WEIGHT_3, "str", {"reference": {"benign_weight": 3.0}}, as_shipped=True),
        # The defaults at a tenth of their coef. Under full fine-tuning the anchor term is 1.0-1.3 (LoRA: ~0.06)
        # even at p = 0, where plain SFT keeps 98 % of the refusals: the coarse KL there reads changes among the
        # safety tokens and the answer openings, not lost refusals, and at coef 30 it outweighs the task's loss,
        # so the update is mostly "reproduce the anchors' openings". Third full fine-tuning candidate.
        Method(COEF_3, "str", {"coef": 3.0}, as_shipped=True),
        Method(
            LIVE_PROBE, "str", {"probe": {"every": 30, "prompts_path": LIVE_PROBE_PROMPTS}}, as_shipped=True
        ),
        Method(
            "STR adapter kl first4 c10 (as written)",
            "str",
            {
                "coef": 10.0,
                "penalty": {"form": "kl", "positions": "first_n", "first_n": 4},
                "reference": {"source": "adapter"},
            },
            as_shipped=True,
        ),
    ]
}
