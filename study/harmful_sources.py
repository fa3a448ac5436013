"""The fixed prompt sets of the harmful-mixing study (study/harmful_mixing.py's docstring): evaluation,
validation, mixing and attack rows, and how far each held-out harmful prompt is from the anchors and attacks."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from str_hooks.probe import is_refusal
from str_hooks.prompts import default_texts

from .data import Example, read_advbench_targets, read_json_list, read_xstest
from .distances import FAR_JACCARD, max_jaccard
from .subject import _short_refusal, subject_data
from .tasks import agnews_task, gsm8k_task, sst2_task

HARMFUL_SOURCES = ["advbench", "xstest_unsafe", "llamas"]
OVER_REFUSAL_SOURCES = ["xstest_safe", "alpaca"]


@dataclass(frozen=True)
class Sources:
    """Every prompt set of the study, fixed (no setting changes them)."""

    harmful: dict[str, list[str]]
    over_refusal: dict[str, list[str]]
    val_harmful: list[str]
    val_over_refusal: list[str]
    # AdvBench goals the subject neither trained on nor is evaluated on, never attack rows: the second attack's
    # kind, which the safety_tuned_llamas validation prompts cannot see (every STR method kept 107-110 % there
    # while coef 10 kept 29-40 % of held-out AdvBench).
    val_harmful_goals: list[str]
    mix_rows: list[Example]  # refusal rows for the mixing baseline (safety_tuned_llamas' own refusals)
    attacks: dict[str, list[Example]]  # attack source -> its harmful rows in order
    anchors: list[str]  # the package's shipped harmful anchors

    def strided(self, stride: int) -> Sources:
        return replace(
            self,
            harmful={k: v[::stride] for k, v in self.harmful.items()},
            over_refusal={k: v[::stride] for k, v in self.over_refusal.items()},
            val_harmful=self.val_harmful[::stride],
            val_over_refusal=self.val_over_refusal[::stride],
            val_harmful_goals=self.val_harmful_goals[::stride],
        )


def study_pools() -> tuple[list[dict[str, str]], list[str]]:
    """The two pools the fixed splits are cut from, in their fixed order: safety_tuned_llamas instructions whose
    own answer is a refusal (and which the `shared` subject did not train on), and Alpaca instructions (neither
    the `shared` subject's nor XSTest's). build_sources takes llamas[:600] and alpaca[:260]; the `balanced`
    subject (study/subject.py) trains on what comes after, so nothing held out here is trained on."""
    subject = subject_data("shared")
    study = subject.study
    used_harmful = {p for p, _ in subject.harmful}
    llamas = [
        r
        for r in read_json_list("safety_tuned_llamas/safety_only_data_Instructions.json")
        if not r.get("input")
        and r["instruction"] not in used_harmful
        and is_refusal(r["output"][:200], study.refusal_phrases)
    ]
    random.Random(26).shuffle(llamas)
    used_benign = set(subject.benign) | set(subject.benign_heldout) | set(study.xstest_safe)
    alpaca = [
        r["instruction"]
        for r in read_json_list("refusal_direction/harmless_train.json")
        if r["instruction"] not in used_benign and len(r["instruction"]) < 300
    ]
    random.Random(26).shuffle(alpaca)
    return llamas, alpaca


# How much of each pool build_sources holds out (evaluation, validation, mixing rows).
LLAMAS_RESERVED = 600
ALPACA_RESERVED = 260


def build_sources() -> Sources:
    """The fixed splits (module docstring). Built from the subject's own data so that nothing the subject
    trained on is held out."""
    study = subject_data("shared").study
    llamas, alpaca = study_pools()
    targets = read_advbench_targets()
    beavertails = [
        Example(r["prompt"], r["response"], "harmful")
        for r in read_json_list("beavertails/harmful_qa_200.json")
    ]
    # AdvBench training goals 0-199 trained the subject; 200-399 are the second attack's rows, in order, and
    # 340-399 validate against it: a run may take at most 140 of them (`run_block_spec` checks).
    advbench_attack = [Example(g, targets[g], "harmful") for g in study.harmful_train[200:400]]
    return Sources(
        harmful={
            "advbench": list(study.harmful_heldout),
            "xstest_unsafe": read_xstest("unsafe"),
            "llamas": [r["instruction"] for r in llamas[:200]],
        },
        over_refusal={"xstest_safe": read_xstest("safe"), "alpaca": alpaca[:200]},
        val_harmful=[r["instruction"] for r in llamas[200:260]],
        val_over_refusal=alpaca[200:260],
        val_harmful_goals=list(study.harmful_train[340:400]),
        mix_rows=[
            Example(r["instruction"], _short_refusal(r["output"]), "harmful")
            for r in llamas[260:LLAMAS_RESERVED]
        ],
        attacks={"beavertails": beavertails, "advbench": advbench_attack},
        anchors=default_texts("harmful_anchors"),
    )


def mixed_task(
    task: str, n: int, p: float, attack: list[Example], n_val: int = 100
) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, test, validation): n task rows whose first round(p * n) are replaced by the first round(p * n)
    attack rows (the literature's protocol); validation is task rows never trained on."""
    n_harm = round(p * n)
    if n_harm > len(attack):
        raise ValueError(f"p = {p} of n = {n} needs {n_harm} harmful rows; the attack has {len(attack)}")
    loaders = {"sst2": sst2_task, "agnews": agnews_task, "gsm8k": gsm8k_task}
    pool, test = loaders[task](n + n_val, 200)
    rows, val = pool[:n], pool[n : n + n_val]
    return attack[:n_harm] + rows[n_harm:], test, val


def prompt_distances(sources: Sources) -> dict[str, dict[str, list[float]]]:
    """Per held-out harmful source, per prompt: its largest word-Jaccard similarity to the anchors
    (`"anchors"`) and to each attack's rows (by attack name)."""
    return {
        name: {
            "anchors": max_jaccard(prompts, sources.anchors),
            **{a: max_jaccard(prompts, [e.prompt for e in rows]) for a, rows in sources.attacks.items()},
        }
        for name, prompts in sources.harmful.items()
    }


def write_prompt_distances(sources: Sources, path: Path) -> None:
    """Every held-out harmful prompt with its largest Jaccard to the anchors and to each attack's rows."""
    distances = prompt_distances(sources)
    records = []
    for name in HARMFUL_SOURCES:
        to = distances[name]
        for i, prompt in enumerate(sources.harmful[name]):
            records.append(
                {
                    "source": name,
                    "prompt": prompt,
                    "jaccard_anchors": round(to["anchors"][i], 3),
                    **{f"jaccard_{a}": round(to[a][i], 3) for a in sources.attacks},
                }
            )
    path.write_text(json.dumps(records, indent=1))


def far_mask(distances: dict[str, dict[str, list[float]]], attack: str) -> dict[str, list[bool]]:
    """Per harmful source, per prompt: far (< FAR_JACCARD) from every anchor and every row of `attack`
    (`distances`: `prompt_distances`)."""
    return {
        name: [a < FAR_JACCARD and r < FAR_JACCARD for a, r in zip(to["anchors"], to[attack], strict=True)]
        for name, to in distances.items()
    }
