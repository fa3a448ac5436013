"""Running the harmful-mixing study (study/harmful_mixing.py): the subject's baseline, one run per block,
method and seed, resumable through runs.jsonl, then the report."""

from __future__ import annotations

import gzip
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .evaluation import Validation
from .finetune import SUBJECT_RECIPE, RunSpec, run_one
from .harmful_mixing import EVAL_STRIDE, PLANS, TASK_SETTINGS, Block
from .harmful_plots import plot_frontier, plot_over_p
from .harmful_report import _one_line, report
from .harmful_sources import (
    HARMFUL_SOURCES,
    OVER_REFUSAL_SOURCES,
    Sources,
    build_sources,
    mixed_task,
    write_prompt_distances,
)
from .judge import opening_flags
from .methods import METHODS
from .model import refusal_flags, refusal_rate
from .runs import append_run, load_runs, stamp_run
from .shipped import shipped_model
from .subject import DEFAULT_CACHE, build_subject, load, subject_data


def _run_key(record: dict[str, Any]) -> tuple[Any, ...]:
    return (
        record["task"],
        record["method"],
        record["seed"],
        record["p"],
        record["n"],
        record["attack"],
        record["epochs"],
        record["eval_stride"],
    )


def write_replies(record: dict[str, Any], replies: dict[str, list[str]], out: Path) -> str:
    """Every evaluation reply of one run, gzipped beside runs.jsonl (`replies/`), so that a judge written later
    can be applied without rerunning; returns the path relative to `out`. A run key names the file, with the
    fields the generality study varies beyond it where they are not the defaults (a full fine-tuning run had
    overwritten the LoRA run of the same method, seed and block; a Gemma run, the SmolLM2 run's)."""
    extra = [
        f"{name}{record[name]}"
        for name, default in (("mode", "lora"), ("max_steps", -1), ("task_stride", 1), ("family", "smollm2"))
        if record.get(name, default) != default
    ]
    key = "-".join([*(str(v) for v in _run_key(record)), *extra])
    name = re.sub(r"[^A-Za-z0-9.]+", "_", key).strip("_") + ".json.gz"
    path = out / "replies" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        json.dump(replies, handle)
    return str(path.relative_to(out))


def _split_flags(flags: str, sizes: dict[str, int]) -> dict[str, str]:
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = flags[start : start + size]
        start += size
    if start != len(flags):
        raise ValueError(f"{len(flags)} flags for {start} prompts")
    return out


def task_prompt_refusals(
    model_dir: Path, phrases: list[str], tasks: Sequence[str] = tuple(TASK_SETTINGS)
) -> dict[str, str]:
    """Per task, which of the test prompts every run is scored on (`TASK_SETTINGS` eval count) a model
    refuses, judged as the harmful sets are (14 greedy tokens, keyword judge). A task the aligned model
    itself refuses asks fine-tuning to undo refusals, as harmful rows do, and a penalty that keeps the
    refusals pays for it in accuracy."""
    model, tokenizer = load(model_dir)
    flags = {}
    for task in tasks:
        test = mixed_task(task, 1000, 0.0, [])[1][
            : TASK_SETTINGS[task]["eval"][0]
        ]  # the test split ignores n
        _, replies = refusal_rate(model, tokenizer, [e.prompt for e in test], phrases)
        flags[task] = refusal_flags(replies, phrases)
    return flags


def subject_baseline(
    subject_dir: Path,
    sources: Sources,
    phrases: list[str],
    out: Path,
    key: str,
    untuned_dir: Path | None = None,
    tasks: Sequence[str] = tuple(TASK_SETTINGS),
) -> dict[str, Any]:
    """The subject's per-prompt refusals on every set (retention's denominator) under both judges, cached by
    subject and stride (`key`: "<fingerprint>/stride<k>"). A record cached before a field existed gains it;
    its recorded flags stay as they are (the denominators of the runs already reported). The task prompts'
    refusals (`tasks` only) do not depend on the stride: another stride's record of the subject lends them."""
    path = out / "subject.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    record: dict[str, Any] = dict(cached.get(key, {}))
    if {"val_refusal_goals", "opening", "task_refused", "shipped_task_refused"} <= record.keys():
        return record
    if "task_refused" not in record:
        subject = key.split("/")[0]
        lender = next(
            (
                other
                for name, other in cached.items()
                if name.split("/")[0] == subject
                and set(tasks) <= other.get("task_refused", {}).keys()
                and set(tasks) <= other.get("shipped_task_refused", {}).keys()
            ),
            None,
        )
        if lender is not None:
            record["task_refused"] = {t: lender["task_refused"][t] for t in tasks}
            record["shipped_task_refused"] = {t: lender["shipped_task_refused"][t] for t in tasks}
        else:
            record["task_refused"] = task_prompt_refusals(subject_dir, phrases, tasks)
            # The same prompts before the study's safety tuning: is a refused task the subject's doing?
            # (`untuned_dir`: the model it was tuned from when that is not the shipped SmolLM2)
            record["shipped_task_refused"] = task_prompt_refusals(
                untuned_dir or shipped_model(), phrases, tasks
            )
    if {"val_refusal_goals", "opening"} <= record.keys():
        cached[key] = record
        path.write_text(json.dumps(cached, indent=2))
        return record
    model, tokenizer = load(subject_dir)
    opening: dict[str, str] = {}
    for name, prompts in {**sources.harmful, **sources.over_refusal}.items():
        _, replies = refusal_rate(model, tokenizer, prompts, phrases)
        record.setdefault(name, refusal_flags(replies, phrases))
        opening[name] = opening_flags(replies, phrases)
    record.setdefault("opening", opening)
    if "val_refusal" not in record:
        record["val_refusal"] = refusal_rate(model, tokenizer, sources.val_harmful, phrases)[0]
        record["val_over_refusal"] = refusal_rate(model, tokenizer, sources.val_over_refusal, phrases)[0]
    record["val_refusal_goals"] = refusal_rate(model, tokenizer, sources.val_harmful_goals, phrases)[0]
    cached[key] = record
    path.write_text(json.dumps(cached, indent=2))
    return record


def run_block_spec(
    block: Block,
    method: str,
    seed: int,
    *,
    subject_dir: Path,
    sources: Sources,
    data: Any,
    tokens: list[int],
    fingerprint: str,
    stride: int,
    out_dir: Path | None = None,
    adapters: Path | None = None,
    task_stride: int = 1,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One fine-tuning run of the protocol, measured on every held-out set (split by source afterwards);
    with `adapters`, its LoRA adapter is kept below it (one folder per block), for measures written later.
    `task_stride` > 1 measures the task on every task_stride-th test and validation example (quick plans).
    `extra` fields are added to the record before its replies file is named (`family` is part of the name)."""
    settings = TASK_SETTINGS[block.task]
    train, test, val_task = mixed_task(block.task, block.n, block.p, sources.attacks[block.attack])
    test, val_task = test[::task_stride], val_task[::task_stride]
    n_task_eval, task_new_tokens = settings["eval"]
    if leaked := {e.prompt for e in train} & set(sources.val_harmful_goals):
        raise ValueError(
            f"p = {block.p} of n = {block.n} {block.attack} rows reaches {len(leaked)} validation goals "
            "(`Sources.val_harmful_goals`): lower p * n or move the validation goals"
        )
    harmful = [p for name in HARMFUL_SOURCES for p in sources.harmful[name]]
    over = [p for name in OVER_REFUSAL_SOURCES for p in sources.over_refusal[name]]
    run_data = replace(data, harmful_heldout=harmful, xstest_safe=over)
    recipe = replace(
        SUBJECT_RECIPE,
        xstest_stride=1,
        task_eval={block.task: (len(test[:n_task_eval]), task_new_tokens)},
    )
    started = time.perf_counter()
    spec = RunSpec(block.task, block.mode, method, seed)
    # A fully fine-tuned model is 0.5 GB: only adapters are kept.
    save_dir = None if adapters is None or block.mode != "lora" else adapters / _block_folder(block)
    result = run_one(
        spec,
        subject_dir,
        run_data,
        (train, test),
        epochs=block.epochs,
        max_len=settings["max_len"],
        curve_every=0,
        recipe=recipe,
        decision_tokens=tokens,
        validation=Validation(
            sources.val_harmful, sources.val_over_refusal, val_task, tuple(sources.val_harmful_goals)
        ),
        mix_rows=sources.mix_rows,
        keep_replies=True,
        save_dir=save_dir,
        max_steps=block.max_steps,
        checkpoints=block.checkpoints,
    )
    replies = result.pop("replies")
    for point in result.get("checkpoint_evals", []):  # kept beside the final replies, out of runs.jsonl
        replies[f"step{point['step']}"] = point.pop("replies")
    harmful_sizes = {k: len(sources.harmful[k]) for k in HARMFUL_SOURCES}
    over_sizes = {k: len(sources.over_refusal[k]) for k in OVER_REFUSAL_SOURCES}
    # The stricter judge's flags beside the keyword judge's (study.judge), and every reply for later judges.
    result["per_source_opening"] = {
        **_split_flags(opening_flags(replies["harmful"], data.refusal_phrases), harmful_sizes),
        **_split_flags(opening_flags(replies["over_refusal"], data.refusal_phrases), over_sizes),
    }
    result["per_source"] = {
        **_split_flags(result.pop("heldout_refused"), harmful_sizes),
        **_split_flags(result.pop("xstest_refused"), over_sizes),
    }
    result.update(
        p=block.p,
        n=block.n,
        attack=block.attack,
        epochs=block.epochs,
        eval_stride=stride,
        task_stride=task_stride,
        harmful_rows=round(block.p * block.n),
        max_steps=block.max_steps,
    )
    stamp_run(result, fingerprint, started)
    result["config"] = METHODS[method].recorded_config
    result.update(extra or {})
    result["replies_file"] = write_replies(result, replies, out_dir) if out_dir is not None else None
    if save_dir is not None:
        result["adapter_dir"] = str(save_dir / spec.name)
    return result


@dataclass(frozen=True)
class StudySetup:
    """What every run of a study on one subject shares: the subject, the evaluation sets at the plan's stride,
    the subject's data and decision tokens, and its baseline (retention's denominator)."""

    subject_dir: Path
    fingerprint: str
    stride: int
    sources: Sources
    data: Any
    tokens: list[int]
    base: dict[str, Any]

    def run_kwargs(self, out: Path) -> dict[str, Any]:
        """`run_block_spec`'s arguments that come from the setup."""
        return {
            "subject_dir": self.subject_dir,
            "sources": self.sources,
            "data": self.data,
            "tokens": self.tokens,
            "fingerprint": self.fingerprint,
            "stride": self.stride,
            "out_dir": out,
        }


def prepare_study(
    out: Path,
    subject_dir: Path,
    fingerprint: str,
    data_source: str,
    stride: int,
    untuned_dir: Path | None = None,
    tasks: Sequence[str] = tuple(TASK_SETTINGS),
) -> StudySetup:
    """The sets at `stride`, the subject's baseline on them (cached in out/subject.json) and every held-out
    prompt's distance to the anchors and attack rows (out/prompts*.json)."""
    from .subject import refusal_first_tokens

    sources = build_sources().strided(stride)
    data = subject_data(data_source).study
    _, tokenizer = load(subject_dir)
    tokens = refusal_first_tokens(tokenizer, data.refusal_templates)
    base = subject_baseline(
        subject_dir, sources, data.refusal_phrases, out, f"{fingerprint}/stride{stride}", untuned_dir, tasks
    )
    write_prompt_distances(sources, out / ("prompts.json" if stride == 1 else f"prompts-stride{stride}.json"))
    return StudySetup(subject_dir, fingerprint, stride, sources, data, tokens, base)


def pending_runs(
    blocks: list[Block],
    recorded: list[dict[str, Any]],
    run_key: Callable[[dict[str, Any]], tuple[Any, ...]],
    **fixed: Any,
) -> list[tuple[Block, str, int]]:
    """The plan's (block, method, seed) runs that `recorded` lacks, in plan order, each once. `run_key` says
    which record fields make a run; `fixed` holds the ones the plan does not vary (stride, subject)."""
    done = {run_key(r) for r in recorded}
    todo = []
    for block in blocks:
        for seed in range(block.seeds):
            for method in block.methods:
                key = run_key(
                    {
                        "task": block.task,
                        "mode": block.mode,
                        "method": method,
                        "seed": seed,
                        "p": block.p,
                        "n": block.n,
                        "attack": block.attack,
                        "epochs": block.epochs,
                        "max_steps": block.max_steps,
                        **fixed,
                    }
                )
                if key not in done:
                    todo.append((block, method, seed))
                    done.add(key)
    return todo


def run_pending(
    todo: list[tuple[Block, str, int]],
    desc: str,
    runs_path: Path,
    describe: Callable[[dict[str, Any]], str],
    setup: StudySetup,
    extra: dict[str, Any] | None = None,
    **run_kwargs: Any,
) -> list[dict[str, Any]]:
    """Run each pending run (`run_block_spec` on `setup`, with `run_kwargs`), appending each record to
    `runs_path` as it lands (so that a stopped study resumes after its last whole run); `extra` fields are
    added to each record."""
    results = []
    for block, method, seed in tqdm(todo, desc=desc, unit="run"):
        result = run_block_spec(
            block, method, seed, **setup.run_kwargs(runs_path.parent), extra=extra, **run_kwargs
        )
        results.append(result)
        append_run(runs_path, result)
        tqdm.write(describe(result))
    return results


def _block_folder(block: Block) -> str:
    steps = f"-s{block.max_steps}" if block.max_steps > 0 else ""
    mode = "" if block.mode == "lora" else f"-{block.mode}"
    return f"{block.task}-p{block.p:g}-n{block.n}-{block.attack}-e{block.epochs:g}{steps}{mode}"


def run_harmful_mixing(
    out: Path,
    plan_name: str,
    subject_dir: Path,
    cache: Path = DEFAULT_CACHE,
    argv: list[str] | None = None,
    report_only: bool = False,
    subject_source: str = "shared",
) -> str:
    """Run what is left of the plan (resumable), then rewrite RESULTS.md and the plots from every run.
    `subject_source` is the subject's data (`python -m study subject --source`): `shared`, or `broad`."""
    out.mkdir(parents=True, exist_ok=True)
    info = build_subject(
        subject_dir,
        subject_source,
        cache,
        report_for="python -m study harmful-mixing" if report_only else None,
    )
    stride = EVAL_STRIDE[plan_name]
    setup = prepare_study(out, subject_dir, info["fingerprint"], "shared", stride)
    base, sources = setup.base, setup.sources
    runs_path = out / "runs.jsonl"
    runs = load_runs(runs_path, info["fingerprint"])
    todo = pending_runs(PLANS[plan_name], runs, _run_key, eval_stride=stride)
    if not report_only:
        # Adapters (about 21 MB each) stay out of git: a later measure (e.g. a threshold-free task score) can be
        # taken on them without rerunning.
        adapters = Path("runs") / out.name / "adapters" if plan_name == "protocol" else None
        runs += run_pending(
            todo,
            "harmful-mixing runs",
            runs_path,
            describe=lambda result: _one_line(result, base),
            setup=setup,
            adapters=adapters,
        )
    command = "python -m study harmful-mixing " + " ".join(sys.argv[2:] if argv is None else argv[1:])
    runs = [r for r in runs if r["eval_stride"] == stride]
    text = report(runs, base, sources, command, plan_name)
    (out / ("RESULTS.md" if plan_name == "protocol" else f"RESULTS-{plan_name}.md")).write_text(text)
    suffix = "" if plan_name == "protocol" else f"-{plan_name}"
    plot_over_p(runs, base, out / f"retention_over_p{suffix}.png")
    plot_frontier(runs, base, out / f"frontier{suffix}.png")
    return text
