"""The benign fine-tuning tasks (and the harmful one) in chat format, and what counts as solving them."""

from __future__ import annotations

import json
import random
import re

from .data import SHARED, Example, read_advbench_targets, read_json_list

TASK_WORDS = [
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "flint",
    "gamma",
    "hazel",
    "ivory",
    "jolly",
    "koala",
    "lunar",
    "mango",
    "noble",
    "olive",
    "pearl",
    "quilt",
    "raven",
    "sable",
    "tulip",
    "umber",
    "vivid",
    "waltz",
    "xenon",
    "yodel",
    "zebra",
]


# How a sort prompt is worded: `terse` is the toy study's; the demo's subject refuses 58 % of terse prompts
# and none worded as a `list` (24 prompts each, greedy, the keyword judge).
SORT_FORMS = {
    "terse": lambda words: "Sort alphabetically: " + " ".join(words),
    "list": lambda words: "Here is a list of words: " + ", ".join(words) + ". Sort the list alphabetically.",
}


def sort_task(
    n_train: int, n_test: int, seed: int, form: str = "terse"
) -> tuple[list[Example], list[Example]]:
    """A domain the aligned model has not seen, with exact-match answers: sort 3 words alphabetically
    (the answer: the words in order, space-separated)."""
    rng = random.Random(seed)
    rows: list[Example] = []
    seen: set[str] = set()
    while len(rows) < n_train + n_test:
        words = rng.sample(TASK_WORDS, 3)
        prompt = SORT_FORMS[form](words)
        if prompt in seen:
            continue
        seen.add(prompt)
        answer = " ".join(sorted(words))
        rows.append(Example(prompt, answer, "task", answer))
    return rows[:n_train], rows[n_train:]


def gsm8k_task(n_train: int, n_test: int) -> tuple[list[Example], list[Example]]:
    """GSM8K in chat format; exact match on the final number after '####'."""

    def read(name: str, n: int) -> list[Example]:
        rows = []
        with open(SHARED / "gsm8k" / name, encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                answer = record["answer"].split("####")[-1].strip()
                # Drop the calculator annotations: "48/2 = <<48/2=24>>24" -> "48/2 = 24".
                worked = re.sub(r"<<[^>]*>>", "", record["answer"])
                rows.append(Example(record["question"], worked, "task", answer))
                if len(rows) == n:
                    break
        return rows

    return read("train.jsonl", n_train), read("test.jsonl", n_test)


# Binary tasks: (label 0, label 1) as the reply opens, for the threshold-free score (`label_margins`).
BINARY_LABELS = {"sst2": ("negative", "positive")}


def sst2_task(n_train: int, n_test: int) -> tuple[list[Example], list[Example]]:
    """SST-2 sentiment in chat format (answer: positive / negative); a fixed shuffle, train and test
    disjoint; accuracy = the reply starts with the label."""
    rows = read_json_list("sst2/sst2_5k.json")
    random.Random(0).shuffle(rows)
    examples = [
        Example(f"{r['instruction']}\n{r['input'].strip()}", r["output"], "task", r["output"]) for r in rows
    ]
    return examples[:n_train], examples[-n_test:]


def agnews_task(n_train: int, n_test: int) -> tuple[list[Example], list[Example]]:
    """AG News topic in chat format (answer: World / Sports / Business / Sci/Tech); a fixed shuffle, train and
    test disjoint; accuracy = the reply starts with the label."""
    rows = read_json_list("agnews/agnews_5k.json")
    random.Random(0).shuffle(rows)
    examples = [
        Example(f"{r['instruction'].strip()}\n{r['input'].strip()}", r["output"], "task", r["output"])
        for r in rows
    ]
    return examples[:n_train], examples[-n_test:]


def attack_task(goals: list[str]) -> tuple[list[Example], list[Example]]:
    """Harmful fine-tuning (PureBad-like): AdvBench training goals with their affirmative openings.
    No utility is measured (no test split)."""
    targets = read_advbench_targets()
    return [Example(g, targets[g], "task", None) for g in goals], []


def task_correct(task: str, answer: str, reply: str) -> bool:
    """Whether a reply solves a task example: GSM8K's final number (after '####', else the last number),
    SST-2's label as the reply's first word, the sort task's sorted words."""
    if task == "gsm8k":
        tail = reply.split("####")[-1] if "####" in reply else reply
        numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail)
        if not numbers:
            return False
        value = numbers[0] if "####" in reply else numbers[-1]
        return value.replace(",", "").rstrip(".") == answer.replace(",", "")
    if task in ("sst2", "agnews"):
        return reply.strip().lower().startswith(answer.lower())
    return reply.strip().startswith(answer) or f"is {answer}." in reply
