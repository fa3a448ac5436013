"""Issue 27: evidence beyond one small model and one short LoRA run.

    python -m study generality [--plan protocol|quick|gemma3|head|benign|coef] [--out results/generality] [--subject runs/subject-balanced]
                               [--report]

The subject is the `balanced` one (`python -m study subject --source balanced`, built here when absent): it
refuses by harm, not by topic (its table, SUBJECT.md, shows every held-out split under both judges against item
1's targets). On it, the harmful-mixing protocol (study/harmful_mixing.py: SST-2, n = 1000 rows, the first p * n
of them BeaverTails questions with compliant answers; the same held-out, validation and attack sets,
study/harmful_sources.py) with:
- plain SFT, the defaults (`{}`) and KL-SFT at p = 10 % (LoRA, one epoch): step time and peak memory beside them;
- durability: plain SFT and `{}` (with the package's own refusal probe on, `str/refusal_rate`) through 600
  optimizer steps (4.8 epochs), evaluated at 60, 150 and 300 steps on every other held-out prompt and every
  task test example, and at 600 on all of them;
- full fine-tuning: plain SFT and `{}` at p = 0 and 10 %.
Runs are appended to runs.jsonl (resumable by subject, block, method and seed); RESULTS.md and the plot are
rewritten from every recorded run (study/generality_report.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .gemma import gemma_base
from .harmful_mixing import BASELINE, SHIPPED, Block
from .harmful_run import pending_runs, prepare_study, run_pending
from .harmful_sources import prompt_distances
from .methods import BENIGN_WEIGHT_3, COEF_3, HEAD_GRADIENT_OFF, LIVE_PROBE, LIVE_PROBE_PROMPTS
from .runs import read_records, study_command
from .shipped import shipped_model
from .subject import DEFAULT_CACHE, build_subject

KL_SFT = "KL-SFT (full vocab, beta 1)"
DURABILITY_CHECKPOINTS = (60, 150, 300, 600)

PLANS: dict[str, list[Block]] = {
    # Whole rows first: the three methods at p = 10 %, full fine-tuning at 10 % (two ~25-min runs: a row that
    # fits the end of a session), the long runs (~65 min each; the defaults first, since a decay there is what
    # item 3 asks to find and fix), full fine-tuning at p = 0, then more seeds.
    "protocol": [
        Block("sst2", 0.1, (BASELINE, SHIPPED, KL_SFT)),
        Block("sst2", 0.1, (BASELINE, SHIPPED), mode="full"),
        Block(
            "sst2",
            0.1,
            (LIVE_PROBE, BASELINE),
            epochs=5.0,
            max_steps=600,
            checkpoints=DURABILITY_CHECKPOINTS,
        ),
        Block("sst2", 0.0, (BASELINE, SHIPPED), mode="full"),
        Block("sst2", 0.1, (BASELINE, SHIPPED, KL_SFT), seeds=3),
    ],
    # Item 4's over-refusal under full fine-tuning: the defaults with no penalty gradient to the (tied) head,
    # beside the protocol plan's full fine-tuning rows.
    "head": [
        Block("sst2", 0.1, (HEAD_GRADIENT_OFF,), mode="full"),
        # p = 0: the defaults and plain SFT (the protocol plan counts these runs as its own), then this.
        Block("sst2", 0.0, (SHIPPED, BASELINE, HEAD_GRADIENT_OFF), mode="full"),
    ],
    # The full fine-tuning over-refusal, second candidate: benign anchors weighted 3.
    "benign": [Block("sst2", 0.1, (BENIGN_WEIGHT_3,), mode="full")],
    # Third candidate: the defaults at coef 3, p = 10 % then p = 0 (retention against over-refusal).
    "coef": [Block("sst2", 0.1, (COEF_3,), mode="full"), Block("sst2", 0.0, (COEF_3,), mode="full")],
    # The second family (issue 27 item 2, `--family gemma3`): the three methods at p = 10 %.
    "gemma3": [Block("sst2", 0.1, (BASELINE, SHIPPED, KL_SFT))],
    # The pipeline end to end in minutes (issue 27: < 20): 160 rows (16 harmful, 20 steps), a 30-step run with
    # a checkpoint (the live probe reads at step 30), every eighth held-out prompt and every fourth task
    # example. At 200 rows, strides 4 and 1 and a baseline that replied to every task's prompts: 29.6 min.
    "quick": [
        Block("sst2", 0.1, (BASELINE, SHIPPED), n=160),
        Block("sst2", 0.1, (LIVE_PROBE,), n=160, max_steps=30, checkpoints=(15, 30)),
    ],
}
EVAL_STRIDE = {"protocol": 1, "gemma3": 1, "head": 1, "benign": 1, "coef": 1, "quick": 8}
TASK_STRIDE = {"protocol": 1, "gemma3": 1, "head": 1, "benign": 1, "coef": 1, "quick": 4}


def run_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two records the same run: subject, block and method, seed, evaluation stride."""
    return (
        record["aligned_fingerprint"],
        record["task"],
        record.get("mode", "lora"),
        record["method"],
        record["seed"],
        record["p"],
        record["n"],
        record["attack"],
        record["epochs"],
        record.get("max_steps", -1),
        record["eval_stride"],
        record.get("task_stride", 1),
    )


def run_generality(
    out: Path,
    plan_name: str,
    subject_dir: Path,
    cache: Path = DEFAULT_CACHE,
    argv: list[str] | None = None,
    report_only: bool = False,
    family: str = "smollm2",
) -> str:
    """Run what is left of the plan on the balanced subject of `family` (resumable), then rewrite the report
    from every recorded run of both families."""
    from .generality_report import plot_durability, report, subject_table

    out.mkdir(parents=True, exist_ok=True)
    info = build_subject(
        subject_dir,
        "balanced",
        cache,
        family=family,
        report_for="python -m study generality" if report_only else None,
    )
    (out / ("SUBJECT.md" if family == "smollm2" else f"SUBJECT-{family}.md")).write_text(
        subject_table(info, subject_dir)
    )
    stride = EVAL_STRIDE[plan_name]
    untuned = gemma_base(cache) if family == "gemma3" else shipped_model(cache)
    tasks = sorted({block.task for block in PLANS[plan_name]})
    setup = prepare_study(out, subject_dir, info["fingerprint"], "balanced", stride, untuned, tasks)
    # The live probe's prompts: the validation harmful prompts (never held out, never trained on).
    probe_path = Path(LIVE_PROBE_PROMPTS)
    probe_path.parent.mkdir(parents=True, exist_ok=True)
    probe_path.write_text(json.dumps(setup.sources.val_harmful))
    runs_path = out / "runs.jsonl"
    recorded = read_records(runs_path) if runs_path.is_file() else []
    runs = [
        r for r in recorded if r["aligned_fingerprint"] == info["fingerprint"] and r["eval_stride"] == stride
    ]
    todo = pending_runs(
        PLANS[plan_name],
        runs,
        run_key,
        aligned_fingerprint=info["fingerprint"],
        eval_stride=stride,
        task_stride=TASK_STRIDE[plan_name],
    )
    if not report_only:
        run_pending(
            todo,
            "generality runs",
            runs_path,
            describe=lambda r: (
                f"{r['task']} {r.get('mode', 'lora')} p={r['p']:.0%} {r['method']} seed {r['seed']}: "
                f"{r['wall_seconds']:.0f} s"
            ),
            setup=setup,
            extra={"family": family, "plan": plan_name},
            adapters=Path("runs") / out.name / "adapters" if stride == 1 else None,
            task_stride=TASK_STRIDE[plan_name],
        )
    # The report covers both families: every run at this stride, each against its own subject's baseline.
    baselines = json.loads((out / "subject.json").read_text())
    every = [r for r in read_records(runs_path) if r["eval_stride"] == stride]
    bases = {r["aligned_fingerprint"]: baselines[f"{r['aligned_fingerprint']}/stride{stride}"] for r in every}
    command = study_command(argv if argv is not None else sys.argv[1:])
    suffix = "" if stride == 1 else f"-{plan_name}"
    distances = prompt_distances(setup.sources)
    text = report(every, bases, command, plan_name, distances, plot_name=f"durability{suffix}.png")
    (out / f"RESULTS{suffix}.md").write_text(text)
    plot_durability(every, bases, out / f"durability{suffix}.png")
    return text
