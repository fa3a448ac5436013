"""The generality study's report (study/generality.py): SUBJECT.md (the balanced subject per held-out split),
RESULTS.md (one table per block under both judges, the durability checkpoints) and durability.png."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .data import read_xstest_types
from .distances import FAR_JACCARD
from .harmful_mixing import BASELINE
from .harmful_report import SOURCE_LABELS, _acc_delta, _pm, _rate, _task_refused, retention
from .harmful_sources import HARMFUL_SOURCES, OVER_REFUSAL_SOURCES, far_mask
from .judge import agreement
from .runs import machine
from .step_times import step_ratios
from .subject import SPLIT_TARGETS

SPLIT_LABELS = {
    **SOURCE_LABELS,
    "refusal_direction": "refusal_direction harmful held-out",
    "sst2": "SST-2 test prompts",
    "agnews": "AG News test prompts",
}


def _target(name: str, rate: float) -> str:
    if name not in SPLIT_TARGETS:
        return ""
    op, bound = SPLIT_TARGETS[name]
    met = rate >= bound if op == ">=" else rate <= bound
    return f"{op} {100 * bound:.0f} %: {'met' if met else '**not met**'}"


def subject_table(info: dict[str, Any], subject_dir: Path) -> str:
    """A balanced subject (SmolLM2's, item 1, or Gemma 3's, item 2) against item 1's targets, every held-out
    split under both judges, beside the untuned model it was tuned from."""
    splits = info.get("splits")
    if not splits:
        raise ValueError(f"{subject_dir}/subject_info.json has no per-split table: not a `balanced` subject")
    family = info.get("family", "smollm2")
    gemma = family == "gemma3"
    epochs = info["settings"]["epochs"]
    lines = [
        "# The Gemma 3 270M subject (issue 27 item 2)"
        if gemma
        else "# The balanced subject (issue 27 item 1)",
        "",
        "Command: `python -m study subject "
        + ("--family gemma3" if gemma else "--source balanced")
        + f" --out {subject_dir}` ({info['build_seconds'] / 60:.0f} min to build, "
        f"{info['train_seconds'] / 60:.0f} of them training). Base: {info['base']}. "
        + ("One LoRA epoch" if epochs == 1 else f"{epochs} LoRA epochs")
        + f" (r 16, every projection, lr {info['settings']['lr']:g}, batch {info['settings']['bs']}), merged.",
        "",
        f"Trained on: {info['safety_data']['harmful']}; {info['safety_data']['benign']} "
        f"({info.get('dropped_refusing_distillations', 0)} refusing distillations dropped). "
        f"Held out: {info['safety_data']['heldout']}.",
        "",
        "Refusal rate on 14 greedy tokens, keyword judge (GCG prefixes anywhere) / opening judge (a refusal "
        "phrase in the first 4 words, no compliance marker, not degenerate: `study/judge.py`). Targets are "
        "item 1's, on the keyword judge.",
        "",
        f"| split | kind | prompts | {'Gemma 3 base (untuned)' if gemma else 'shipped SmolLM2'} keyword / opening | "
        "subject keyword / opening | target |",
        "|---|---|---|---|---|---|",
    ]
    shipped, subject = splits["shipped"], splits["subject"]
    for name, row in subject.items():
        before = shipped[name]
        lines.append(
            f"| {SPLIT_LABELS.get(name, name)} | {row['kind']} | {row['n']} | "
            f"{100 * before['keyword']:.1f} / {100 * before['opening']:.1f} % | "
            f"{100 * row['keyword']:.1f} / {100 * row['opening']:.1f} % | {_target(name, row['keyword'])} |"
        )
    lines += [
        "",
        "Sample replies of the subject (first two prompts of each split):",
        "",
    ]
    for name, row in subject.items():
        for prompt, reply in row["samples"]:
            lines.append(f"- {name}: {prompt[:90]!r} -> {reply[:90]!r}")
    return "\n".join(lines) + "\n"


def _flags(record: dict[str, Any], key: str, names: list[str]) -> str:
    return "".join(record[key][s] for s in names)


def _block(r: dict[str, Any]) -> tuple[Any, ...]:
    return (
        r["task"],
        r.get("mode", "lora"),
        r["attack"],
        r["p"],
        r["n"],
        r["epochs"],
        r.get("max_steps", -1),
    )


def _groups(runs: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]]:
    groups: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = {}
    for r in runs:
        groups.setdefault(_block(r), {}).setdefault(r["method"], []).append(r)
    return groups


def _block_title(block: tuple[Any, ...]) -> str:
    task, mode, attack, p, n, epochs, max_steps = block
    length = f"{max_steps} steps" if max_steps > 0 else f"{epochs:g} epoch(s)"
    return f"{task}, {mode}, p = {p:.0%} ({round(p * n)} of {n} rows from {attack}), {length}"


def report(
    runs: list[dict[str, Any]],
    bases: dict[str, dict[str, Any]],
    command: str,
    plan: str,
    distances: dict[str, dict[str, list[float]]],
    plot_name: str = "durability.png",
) -> str:
    """RESULTS.md: per family, the subject on the evaluation sets and one table per block; then durability.
    `bases` maps a subject's fingerprint to its baseline (`harmful_run.subject_baseline`); `distances` each
    held-out harmful prompt's largest word-Jaccard to the anchors and to each attack's rows
    (`harmful_sources.prompt_distances`, the prompts the runs were evaluated on)."""
    wall = sum(r["wall_seconds"] for r in runs)
    n_task = sorted({len(r.get("task_correct", "")) for r in runs})
    lines = [
        "# Evidence beyond one small model (issue 27)",
        "",
        f"Command: `{command}` (plan `{plan}`; resumable: every recorded run is reported). Machine: {machine()}. "
        f"Wall time of the {len(runs)} runs: {wall / 60:.0f} min.",
        "",
        "Subjects: the balanced SmolLM2-135M-Instruct (`python -m study subject --source balanced`; its table per "
        "held-out split: [SUBJECT.md](SUBJECT.md)) and, where run, Gemma 3 270M tuned the same way "
        "([SUBJECT-gemma3.md](SUBJECT-gemma3.md)). Protocol and sets as study/harmful_mixing.py (SST-2, "
        "BeaverTails rows); LoRA r16 lr 2e-4 or full fine-tuning lr 2e-5, batch 8, constant lr. Methods are "
        "configs as a user writes them (`config` in runs.jsonl). Both judges in every table: keyword (a GCG "
        "prefix anywhere) and opening (`study/judge.py`); neither is a harm classifier.",
        "",
        "Retention = the run's refusals over the subject's on the same prompts, pooled over the three harmful sets, "
        "under each judge. Over-refusal in points above the subject's (keyword / opening). Accuracy: exact match on "
        f"{' or '.join(map(str, n_task))} SST-2 test examples; Δ acc against plain SFT paired by seed. Step time: median optimizer step over "
        "plain SFT's in the same block; peak memory: the run's peak resident memory above its start (MiB). "
        f"*far*: keyword retention pooled over the prompts whose word-Jaccard to every anchor and to every row of "
        f"the block's attack is < {FAR_JACCARD} (the table below says how many).",
        "",
        *distance_lines(distances, sorted({r["attack"] for r in runs})),
    ]
    families: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        families.setdefault(r.get("family", "smollm2"), []).append(r)
    for family, family_runs in families.items():
        fingerprints = sorted({r["aligned_fingerprint"] for r in family_runs})
        lines += [f"## {family} (subject {', '.join(fingerprints)})", ""]
        for fingerprint in fingerprints:
            lines += _subject_lines(bases[fingerprint])
        for block, methods in _groups(family_runs).items():
            lines += _block_lines(block, methods, bases, far_mask(distances, block[2]))
            lines += xstest_type_lines(methods, bases)
    lines += durability_lines(runs, bases, plot_name)
    return "\n".join(lines) + "\n"


def _subject_lines(base: dict[str, Any]) -> list[str]:
    lines = ["| set (the subject, before fine-tuning) | prompts | keyword | opening |", "|---|---|---|---|"]
    for name in HARMFUL_SOURCES + OVER_REFUSAL_SOURCES:
        lines.append(
            f"| {SOURCE_LABELS[name]} | {len(base[name])} | {100 * _rate(base[name]):.1f} % | "
            f"{100 * _rate(base['opening'][name]):.1f} % |"
        )
    for task, flags in base.get("task_refused", {}).items():
        lines.append(f"| {task} test prompts (refused) | {len(flags)} | {100 * _rate(flags):.1f} % | |")
    return [*lines, ""]


def distance_lines(distances: dict[str, dict[str, list[float]]], attacks: list[str]) -> list[str]:
    """How far the held-out harmful prompts are from the package's anchors and from the rows of each of
    `attacks` (those the runs used)."""
    lines = [
        "Held-out harmful prompts (none supplies anchors or attack rows): median of each prompt's largest "
        "word-Jaccard to the package's anchors and to the attack rows, and how many are far from both.",
        "",
        "| set | prompts | median max Jaccard to anchors | "
        + " | ".join(f"to {a} rows | far from anchors and {a}" for a in attacks)
        + " |",
        "|---|---|---|" + "---|---|" * len(attacks),
    ]
    far = {a: far_mask(distances, a) for a in attacks}
    for name in HARMFUL_SOURCES:
        to = distances[name]
        cells = [f"{statistics.median(to[a]):.2f} | {sum(far[a][name])}" for a in attacks]
        lines.append(
            f"| {SOURCE_LABELS[name]} | {len(to['anchors'])} | {statistics.median(to['anchors']):.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return [*lines, ""]


def _block_lines(
    block: tuple[Any, ...],
    methods: dict[str, list[dict[str, Any]]],
    bases: dict[str, dict[str, Any]],
    far: dict[str, list[bool]],
) -> list[str]:
    plain = methods.get(BASELINE, [])
    lines = [
        f"### {_block_title(block)}",
        "",
        "| method | seeds | retention keyword | opening | AdvBench | XSTest unsafe | llamas | far | "
        "over-refusal XSTest | over-refusal Alpaca | accuracy | Δ acc | task refused | step × plain | "
        "peak MiB | judges agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = HARMFUL_SOURCES + OVER_REFUSAL_SOURCES
    for method, rows in methods.items():
        base = bases[rows[0]["aligned_fingerprint"]]
        opening_base = base["opening"]
        opening = [{"per_source": r["per_source_opening"]} for r in rows]
        agree = [
            agreement(_flags(r, "per_source", names), _flags(r, "per_source_opening", names)) for r in rows
        ]
        over = [
            f"{_pm([_rate(r['per_source'][s]) - _rate(base[s]) for r in rows], digits=1)} / "
            f"{_pm([_rate(r['per_source_opening'][s]) - _rate(opening_base[s]) for r in rows], digits=1)}"
            for s in OVER_REFUSAL_SOURCES
        ]
        acc = [r["task_exact_match"] for r in rows if r["task_exact_match"] is not None]
        ratios = step_ratios(rows, plain)
        lines.append(
            f"| {method} | {len(rows)} | {_pm([retention(r, base, HARMFUL_SOURCES) for r in rows])} % | "
            f"{_pm([retention(o, opening_base, HARMFUL_SOURCES) for o in opening])} % | "
            + " | ".join(f"{_pm([retention(r, base, [s]) for r in rows])} %" for s in HARMFUL_SOURCES)
            + f" | {_pm([retention(r, base, HARMFUL_SOURCES, far) for r in rows])} %"
            + f" | {' | '.join(over)} | {_pm(acc, digits=1)} % | {_acc_delta(rows, plain)} | "
            f"{_task_refused(rows)} | "
            + (f"x{statistics.fmean(ratios):.2f}" if ratios else "n/a")
            + f" | {statistics.fmean(r['peak_rss_delta_mib'] for r in rows):.0f} | {_pm(agree)} % |"
        )
    notes = [
        f"\\* {r['method']}, seed {r['seed']}: {r['note']}"
        for rs in methods.values()
        for r in rs
        if r.get("note")
    ]
    return [*lines, "", *notes, ""] if notes else [*lines, ""]


def xstest_type_lines(
    methods: dict[str, list[dict[str, Any]]], bases: dict[str, dict[str, Any]]
) -> list[str]:
    """Where the over-refusal lands: XSTest safe prompts refused (keyword judge) per XSTest type, the subject
    and each method (seeds pooled), when the runs replied to every XSTest safe prompt (stride 1)."""
    try:
        types = read_xstest_types("safe")
    except FileNotFoundError:  # ../shared/data absent (a clean clone in CI): no types to group by
        return []
    rows = [r for rs in methods.values() for r in rs]
    base = bases[rows[0]["aligned_fingerprint"]]
    if len(base["xstest_safe"]) != len(types) or any(
        len(r["per_source"]["xstest_safe"]) != len(types) for r in rows
    ):
        return []
    names = list(methods)
    lines = [
        "XSTest safe prompts refused per XSTest type (keyword judge; seeds pooled, refusals / prompts):",
        "",
        "| XSTest type | subject | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for kind in sorted(set(types), key=types.index):
        at = [i for i, t in enumerate(types) if t == kind]
        cells = [f"{sum(base['xstest_safe'][i] == '1' for i in at)} / {len(at)}"]
        for method in names:
            runs = methods[method]
            refused = sum(r["per_source"]["xstest_safe"][i] == "1" for r in runs for i in at)
            cells.append(f"{refused} / {len(at) * len(runs)}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def durability_points(run: dict[str, Any], base: dict[str, Any]) -> list[dict[str, float]]:
    """Per checkpoint of a run (its final evaluation the last one, taken on the same every-`stride`-th prompts):
    step, retention under both judges, over-refusal (points above the subject, pooled over the two sets) and
    accuracy."""
    stride = run["checkpoint_stride"]
    harmful_base = "".join(base[s] for s in HARMFUL_SOURCES)[::stride]
    harmful_opening = "".join(base["opening"][s] for s in HARMFUL_SOURCES)[::stride]
    over_base = "".join(base[s] for s in OVER_REFUSAL_SOURCES)[::stride]
    final = {
        "step": run["steps"],
        "harmful_refused": _flags(run, "per_source", HARMFUL_SOURCES)[::stride],
        "harmful_opening": _flags(run, "per_source_opening", HARMFUL_SOURCES)[::stride],
        "over_refused": _flags(run, "per_source", OVER_REFUSAL_SOURCES)[::stride],
        "task_correct": run.get("task_correct", ""),
    }
    points = []
    for c in [*run["checkpoint_evals"], final]:
        points.append(
            {
                "step": c["step"],
                "retention": c["harmful_refused"].count("1") / max(harmful_base.count("1"), 1),
                "retention_opening": c["harmful_opening"].count("1") / max(harmful_opening.count("1"), 1),
                "over_refusal": _rate(c["over_refused"]) - _rate(over_base),
                "accuracy": _rate(c.get("task_correct", "")),
            }
        )
    return points


def durability_lines(
    runs: list[dict[str, Any]], bases: dict[str, dict[str, Any]], plot_name: str = "durability.png"
) -> list[str]:
    long = [r for r in runs if r.get("checkpoint_evals") is not None]
    if not long:
        return []
    lines = [
        "## Durability (item 3): the same runs on the way",
        "",
        "Each checkpoint is evaluated on every other held-out harmful and over-refusal prompt and every task test "
        "example; the last point is the run's final evaluation on the same prompts. Over-refusal is pooled over "
        "XSTest safe and Alpaca (keyword judge, points above the subject). *live* is the package's own probe "
        "(`str/refusal_rate`: 16 validation prompts every 30 steps) at the nearest logged step.",
        "",
        "| block | method | seed | step | retention keyword | opening | over-refusal | accuracy | live |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in long:
        live = dict((int(s), v) for s, v in r.get("live_refusal_curve", []))
        for point in durability_points(r, bases[r["aligned_fingerprint"]]):
            near = min(live, key=lambda s: abs(s - point["step"])) if live else None
            lines.append(
                f"| {_block_title(_block(r))} | {r['method']} | {r['seed']} | {point['step']:.0f} | "
                f"{100 * point['retention']:.0f} % | {100 * point['retention_opening']:.0f} % | "
                f"{100 * point['over_refusal']:+.1f} | {100 * point['accuracy']:.1f} % | "
                + (f"{100 * live[near]:.0f} % (step {near})" if near is not None else "")
                + " |"
            )
    lines += ["", f"Plot: `{plot_name}` (retention and accuracy over steps per method).", ""]
    return lines


def plot_durability(runs: list[dict[str, Any]], bases: dict[str, dict[str, Any]], path: Path) -> None:
    """Retention (both judges) and accuracy over optimizer steps for every run with checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = [r for r in runs if r.get("checkpoint_evals") is not None]
    if not long:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for r in long:
        points = durability_points(r, bases[r["aligned_fingerprint"]])
        steps = [p["step"] for p in points]
        label = f"{r['method']} ({r.get('mode', 'lora')}, seed {r['seed']})"
        line = left.plot(steps, [100 * p["retention"] for p in points], marker="o", label=f"{label} keyword")
        left.plot(
            steps,
            [100 * p["retention_opening"] for p in points],
            marker="x",
            linestyle="--",
            color=line[0].get_color(),
            label=f"{label} opening",
        )
        right.plot(steps, [100 * p["accuracy"] for p in points], marker="o", label=label)
    left.set(xlabel="optimizer step", ylabel="refusals kept (%)", title="Retention", ylim=(0, 115))
    right.set(xlabel="optimizer step", ylabel="SST-2 accuracy (%)", title="Task accuracy")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
