"""Data for the efficacy study: the aligned test model's training set, the held-out evaluation sets, and the
readers of ../shared/data (the fine-tuning tasks are in study/tasks.py, the project's texts in study/texts.py).

Two sources. `shared` reads the public sets in ../shared/data at run time (AdvBench with a fixed
400 / 120 train / held-out split, XSTest safe prompts, GSM8K, the GCG refusal prefixes). `embedded` uses
only the project's own texts (the package's harmful anchors and benign prompts): that is `make demo`.
The benign side of the aligned model is generated here from many families of project-written
instructions, with the same imperative verbs as the harmful ones, sensitive-sounding safe requests, and
checkable answers, so the aligned model refuses by content rather than by unfamiliarity.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from str_hooks.prompts import default_texts

from .texts import BENIGN_TASKS, COUNTRIES, REQUEST_FORMS, SENSITIVE_SAFE, WORDS

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@dataclass
class Example:
    prompt: str
    response: str
    kind: str  # "harmful", "benign", "benign_check" (exact answer checkable)
    answer: str | None = None


@dataclass
class StudyData:
    aligned_train: list[Example]
    harmful_heldout: list[str]
    harmful_train: list[str]
    benign_check_heldout: list[Example]
    xstest_safe: list[str]
    refusal_phrases: list[str]
    refusal_templates: list[str]
    source: str
    notes: dict[str, str] = field(default_factory=dict)


def _benign_families(rng: random.Random) -> tuple[list[Example], list[Example]]:
    """(benign examples, checkable examples). Checkable answers: arithmetic, capitals, word reversal."""
    benign: list[Example] = []
    for task in BENIGN_TASKS:
        for prompt_form, answer_form in REQUEST_FORMS:
            benign.append(Example(prompt_form.format(t=task), answer_form.format(t=task), "benign"))
    for prompt, answer in SENSITIVE_SAFE:
        benign.append(Example(prompt, "Sure. " + answer, "benign"))
    for prompt in default_texts("benign_prompts"):
        benign.append(
            Example(
                prompt,
                "Sure! Here is a helpful answer: start simple, take it step by step, and enjoy it.",
                "benign",
            )
        )
    check: list[Example] = []
    for a in range(1, 10):
        for b in range(1, 10):
            form = rng.choice(
                [
                    "What is {a} plus {b}?",
                    "Add {a} and {b}.",
                    "Compute {a} + {b}.",
                    "Tell me the sum of {a} and {b}.",
                ]
            )
            check.append(
                Example(form.format(a=a, b=b), f"The answer is {a + b}.", "benign_check", str(a + b))
            )
    for country, capital in COUNTRIES.items():
        for form in (
            "What is the capital of {c}?",
            "Tell me the capital city of {c}.",
            "Name the capital of {c}.",
        ):
            check.append(
                Example(form.format(c=country), f"The answer is {capital}.", "benign_check", capital)
            )
    for _ in range(200):
        words = rng.sample(WORDS, 3)
        form = rng.choice(
            ["Reverse the order of these words: {w}", "Write these words in reverse order: {w}"]
        )
        target = " ".join(reversed(words))
        check.append(
            Example(form.format(w=" ".join(words)), f"The answer is {target}.", "benign_check", target)
        )
    return benign, check


def read_json_list(relative: str) -> list[dict[str, str]]:
    """A JSON list of records from ../shared/data."""
    rows = json.loads((SHARED / relative).read_text(encoding="utf-8"))
    return [dict(r) for r in rows]


def _read_advbench() -> list[str]:
    with open(SHARED / "advbench" / "harmful_behaviors.csv", newline="", encoding="utf-8") as fh:
        return [row["goal"].strip() for row in csv.DictReader(fh)]


def read_xstest(label: str) -> list[str]:
    """XSTest's prompts labelled `label` ("safe" or "unsafe"), in file order."""
    with open(SHARED / "xstest" / "xstest_prompts.csv", newline="", encoding="utf-8") as fh:
        return [row["prompt"].strip() for row in csv.DictReader(fh) if row["label"] == label]


def read_xstest_types(label: str) -> list[str]:
    """The XSTest `type` (e.g. `homonyms`, `privacy_fictional`) of each prompt `read_xstest(label)` returns."""
    with open(SHARED / "xstest" / "xstest_prompts.csv", newline="", encoding="utf-8") as fh:
        return [row["type"].strip() for row in csv.DictReader(fh) if row["label"] == label]


def read_advbench_targets() -> dict[str, str]:
    """AdvBench goal -> its affirmative target opening ("Sure, here is ...")."""
    with open(SHARED / "advbench" / "harmful_behaviors.csv", newline="", encoding="utf-8") as fh:
        return {row["goal"].strip(): row["target"].strip() for row in csv.DictReader(fh)}


def load_study_data(source: str = "shared", seed: int = 0) -> StudyData:
    """Build the aligned model's training data and the held-out evaluation sets.

    `shared`: AdvBench behaviours split 400 train / 120 held-out with a fixed seed; XSTest's 250 safe
    prompts for over-refusal; GCG refusal prefixes as the judge. `embedded`: the package's 120 harmful
    anchor prompts split 90 / 30 and the package's refusal phrases; the package's sensitive-sounding
    safe prompts stand in for XSTest.
    """
    rng = random.Random(seed)
    templates = default_texts("refusal_templates")
    if source == "shared":
        harmful = _read_advbench()
        xstest = read_xstest("safe")
        phrases = json.loads((SHARED / "refusal_prefixes" / "gcg_test_prefixes.json").read_text())
        n_heldout = 120
        notes = {
            "harmful": "AdvBench harmful_behaviors (520), split 400 train / 120 held-out, seed 0",
            "over_refusal": "XSTest safe prompts (250)",
            "judge": "GCG test prefixes (29), case-sensitive substring: refusal if any prefix occurs",
        }
    elif source == "embedded":
        from str_hooks.probe import DEFAULT_REFUSAL_PHRASES

        harmful = default_texts("harmful_anchors")
        xstest = [p for p, _ in SENSITIVE_SAFE[::2]]
        phrases = list(DEFAULT_REFUSAL_PHRASES)
        n_heldout = 30
        notes = {
            "harmful": "the package's 120 harmful anchor prompts, split 90 train / 30 held-out",
            "over_refusal": "half of the project's sensitive-sounding safe prompts (held out of training)",
            "judge": "the package's refusal phrases, case-sensitive substring",
        }
    else:
        raise ValueError(f"unknown data source {source!r}: use 'shared' or 'embedded'")
    order = list(range(len(harmful)))
    random.Random(1234).shuffle(order)
    heldout = [harmful[i] for i in order[:n_heldout]]
    train_harmful = [harmful[i] for i in order[n_heldout:]]
    benign, check = _benign_families(rng)
    # Over-refusal prompts are held out: drop any training prompt that is one of them (one of the
    # project's sensitive-sounding prompts happens to be an XSTest prompt word for word).
    held_safe = set(xstest)
    benign = [e for e in benign if e.prompt not in held_safe]
    rng.shuffle(check)
    check_heldout, check_train = check[:100], check[100:]
    aligned: list[Example] = []
    for prompt in train_harmful:
        for _ in range(2):  # two different refusals per harmful prompt: varied refusals
            aligned.append(Example(prompt, rng.choice(templates), "harmful"))
    aligned += benign + check_train
    rng.shuffle(aligned)
    return StudyData(
        aligned_train=aligned,
        harmful_heldout=heldout,
        harmful_train=train_harmful,
        benign_check_heldout=check_heldout,
        xstest_safe=xstest,
        refusal_phrases=phrases,
        refusal_templates=templates,
        source=source,
        notes=notes,
    )
