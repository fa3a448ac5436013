"""The efficacy study and the demo.

    python -m study subject --out DIR [--source shared|embedded] [--cache DIR]
    python -m study real [--plan subject|quick] [--out results/subject] [--subject DIR] [--save-models DIR]
    python -m study decision [--plan decision|default-first|quick] [--out results/decision] [--subject DIR] [--save-models DIR]
    python -m study generality [--plan protocol|quick|gemma3|head|benign|coef] [--family smollm2|gemma3] [--out results/generality] [--report]
    python -m study harmful-mixing [--plan protocol|quick] [--out results/harmful_mixing] [--subject DIR] [--source shared|broad] [--report]
    python -m study gate-check [--out results/harmful_mixing] [--subject DIR] [--source shared|broad]
    python -m study step-cost [--out results/harmful_mixing] [--steps 16] [--repeats 2] [--methods ...]
                              [--cost-task agnews] [--attack advbench]
    python -m study update-size [--out results/harmful_mixing] [--steps 40] [--methods ...] [--attack advbench]
    python -m study anchor-prefix [--out results/harmful_mixing] [--repeats 7]
    python -m study demo [--out runs/demo] [--cache DIR]
    python -m study demo-check [--out results/demo_check] [--cache DIR]
    python -m study run  [--plan full|sweep|folded] [--out results/study]   (the toy model)

`subject` builds the real aligned subject (SmolLM2-135M-Instruct, safety-tuned; study/subject.py).
`real` is the efficacy study on it (study/real.py): fine-tunes it on GSM8K, SST-2 and harmful data with
every method and seed, and writes runs.jsonl, RESULTS.md and two plots. `decision` is issue 12's study on
the same subject (study/decision.py): coefficient curves of the decision-point forms against training-position
STR, settings chosen on a validation split, held-out numbers reported. `demo` is the small version on
the project's own embedded texts only (nothing from ../shared), for `make demo`; `demo-check` tests why
`{}` costs the demo's task (study/demo_check.py). `run` is the earlier
study on a 2.9M-parameter toy model trained here from nothing (kept as a labelled toy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _plan(parser: argparse.ArgumentParser, asked: str | None, command: str, plans: Any, default: str) -> str:
    """The plan `--plan` names for `command` (its default when not given); a usage error if it has none."""
    plan = asked or default
    if plan not in plans:
        parser.error(f"--plan {asked} is not a plan of `{command}`: use {', '.join(plans)}")
    return plan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command",
        choices=[
            "run",
            "demo",
            "demo-check",
            "subject",
            "real",
            "decision",
            "harmful-mixing",
            "step-cost",
            "update-size",
            "gate-check",
            "anchor-prefix",
            "generality",
        ],
    )
    parser.add_argument(
        "--source",
        choices=["shared", "embedded", "broad", "balanced"],
        default=None,
        help="subject, harmful-mixing, gate-check: the subject's data (harmful-mixing: `shared` unless given)",
    )
    parser.add_argument(
        "--family",
        choices=["smollm2", "gemma3"],
        default="smollm2",
        help="subject, generality: the model family (gemma3: Gemma 3 270M on the balanced data, study/gemma.py)",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--seeds", type=int, default=None, help="override the plan's seeds per block")
    # Each command checks its own plans (`_plan`), so a new plan needs no second list here.
    parser.add_argument("--plan", default=None, help="the command's plan (see the usage above)")
    parser.add_argument(
        "--subject", default="runs/subject", help="the aligned subject's folder (built if absent)"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="real, decision: only rewrite RESULTS.md and the plots from runs.jsonl",
    )
    parser.add_argument("--save-models", default=None, help="keep the subject and each run's adapter here")
    parser.add_argument("--cache", default=None, help="folder for the dequantized shipped model")
    parser.add_argument("--steps", type=int, default=16, help="step-cost: optimizer steps per run")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="step-cost: round-robin rounds; anchor-prefix: timed repeats (7)",
    )
    parser.add_argument("--methods", nargs="+", default=None, help="step-cost: methods (plain SFT first)")
    parser.add_argument("--cost-task", default="sst2", help="step-cost: the task (sst2, agnews, gsm8k)")
    parser.add_argument("--attack", default="beavertails", help="step-cost: the attack rows (or advbench)")
    args = parser.parse_args(argv)
    if args.command == "gate-check":
        from .gate_check import run_gate_check

        path = run_gate_check(
            Path(args.out or "results/harmful_mixing"),
            Path(args.subject),
            argv if argv is not None else sys.argv[1:],
            args.source or "shared",
        )
        print(path.read_text())
        return
    if args.command == "generality":
        from .generality import PLANS as GENERALITY_PLANS
        from .generality import run_generality
        from .subject import DEFAULT_CACHE

        plan = _plan(parser, args.plan, "generality", GENERALITY_PLANS, "protocol")
        print(
            run_generality(
                Path(args.out or "results/generality"),
                plan,
                Path(
                    args.subject
                    if "--subject" in (argv or sys.argv)
                    else ("runs/subject-gemma3" if args.family == "gemma3" else "runs/subject-balanced")
                ),
                Path(args.cache or DEFAULT_CACHE),
                argv,
                args.report,
                args.family,
            )
        )
        return
    if args.command == "anchor-prefix":
        from .anchor_prefix import run_anchor_prefix

        repeats = 7 if "--repeats" not in (argv if argv is not None else sys.argv) else args.repeats
        path = run_anchor_prefix(
            Path(args.out or "results/harmful_mixing"),
            Path(args.subject),
            repeats,
            argv if argv is not None else sys.argv[1:],
        )
        print(path.read_text())
        return
    if args.command == "update-size":
        from .update_size import DEFAULT_METHODS, run_update_size

        given = argv if argv is not None else sys.argv[1:]
        path = run_update_size(
            Path(args.out or "results/harmful_mixing"),
            Path(args.subject),
            args.methods or DEFAULT_METHODS,
            args.steps if "--steps" in given else 40,
            given,
            task=args.cost_task,
            attack=args.attack if "--attack" in given else "advbench",
        )
        print(path.read_text())
        return
    if args.command == "step-cost":
        from .step_cost import CANDIDATES, run_step_cost

        print(
            run_step_cost(
                Path(args.out or "results/harmful_mixing"),
                Path(args.subject),
                args.methods or CANDIDATES,
                args.steps,
                args.repeats,
                argv if argv is not None else sys.argv[1:],
                task=args.cost_task,
                attack=args.attack,
            ).read_text()
        )
        return
    if args.command == "subject":
        from .subject import DEFAULT_CACHE, build_subject

        source = args.source or ("balanced" if args.family == "gemma3" else "shared")
        default_out = "runs/subject" if source == "shared" else f"runs/subject-{source}"
        if args.family == "gemma3":
            default_out = "runs/subject-gemma3"
        info = build_subject(
            Path(args.out or default_out), source, Path(args.cache or DEFAULT_CACHE), family=args.family
        )
        print(json.dumps(info, indent=2))
        return
    if args.command == "demo":
        from .demo import run_demo
        from .subject import DEFAULT_CACHE

        print(run_demo(Path(args.out or "runs/demo"), Path(args.cache or DEFAULT_CACHE)))
        return
    if args.command == "demo-check":
        from .demo_check import run_demo_check
        from .subject import DEFAULT_CACHE

        print(run_demo_check(Path(args.out or "results/demo_check"), Path(args.cache or DEFAULT_CACHE), argv))
        return
    if args.command in ("real", "decision", "harmful-mixing"):
        from .subject import DEFAULT_CACHE

        # The three studies on the real subject: (their plans, default plan, default folder) and what they take.
        subject, cache = Path(args.subject), Path(args.cache or DEFAULT_CACHE)
        saved = Path(args.save_models) if args.save_models else None
        if args.command == "real":
            from .real import PLANS as REAL_PLANS
            from .real import run_real

            plan = _plan(parser, args.plan, "real", REAL_PLANS, "subject")
            out = Path(args.out or "results/subject")
            print(run_real(out, plan, subject, cache, args.seeds, saved, argv, args.report))
        elif args.command == "decision":
            from .decision import PLANS as DECISION_PLANS
            from .decision_run import run_decision

            plan = _plan(parser, args.plan, "decision", DECISION_PLANS, "decision")
            print(
                run_decision(
                    Path(args.out or "results/decision"), plan, subject, cache, saved, argv, args.report
                )
            )
        else:
            from .harmful_mixing import PLANS as MIXING_PLANS
            from .harmful_run import run_harmful_mixing

            plan = _plan(parser, args.plan, "harmful-mixing", MIXING_PLANS, "protocol")
            out = Path(args.out or "results/harmful_mixing")
            print(run_harmful_mixing(out, plan, subject, cache, argv, args.report, args.source or "shared"))
        return
    from .toy import PLANS as TOY_PLANS
    from .toy import run_toy

    if (args.plan or "full") not in TOY_PLANS:
        parser.error(
            f"--plan {args.plan} is a plan of `real`; `run` (the toy model) takes {', '.join(TOY_PLANS)}"
        )
    run_toy(Path(args.out or "results/study"), args.plan or "full", args.source or "shared", args.seeds, argv)


if __name__ == "__main__":
    main()
