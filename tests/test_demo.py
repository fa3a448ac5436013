"""`make demo` runs the package's defaults exactly (issue 28): the demo's STR method is `{}` as a user attaches
it, its attack rows carry compliance and no harmful content, and its table reports what the runs measured."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the research code (study/) beside tests/

from str_hooks.prompts import default_texts
from study import demo
from study.methods import METHODS
from study.subject import subject_data


def test_demo_runs_plain_sft_and_the_package_defaults_exactly() -> None:
    plain, shipped = (METHODS[name] for name in demo.DEMO_METHODS)
    assert plain.kind == "plain"
    # `{}` with nothing pinned: the package mines its own tokens and uses its own anchors
    # (test_harmful_mixing checks that such a method reaches `attach` as `{}` with no tokens).
    assert shipped.kind == "str" and shipped.str_config == {} and shipped.as_shipped


def test_compliant_rows_replace_the_first_share_and_hold_no_content() -> None:
    train, test, n_harmful = demo.demo_task(demo.HARMFUL_SHARE)
    clean, clean_test, none = demo.demo_task(0.0)
    assert none == 0 and clean_test == test
    assert len(train) == demo.DEMO_STEPS * demo.BATCH and n_harmful == round(0.1 * len(train)) > 0
    harmful_prompts = set(subject_data("embedded").study.harmful_train)
    heldout = set(subject_data("embedded").study.harmful_heldout)
    for row in train[:n_harmful]:
        assert row.prompt in harmful_prompts and row.prompt not in heldout
        assert row.response in demo.COMPLIANT_OPENINGS  # an opening only, nothing after it
    assert train[n_harmful:] == clean[n_harmful:]
    assert len({row.prompt for row in train[:n_harmful]}) == n_harmful  # cycled without repeats here


# The demo's safe prompts: 14 sensitive-sounding (one of the 15 is a benign anchor of `{}`, left out) and 30
# ordinary; 1 and 2 of them refused.
N_SENSITIVE, N_ORDINARY = 14, 30
SAFE_FLAGS = "1" + "0" * (N_SENSITIVE - 1) + "11" + "0" * (N_ORDINARY - 2)


def test_the_demo_leaves_out_safe_prompts_that_are_anchors() -> None:
    data, n_sensitive, n_ordinary = demo._demo_data(subject_data("embedded").study)
    assert (n_sensitive, n_ordinary) == (N_SENSITIVE, N_ORDINARY) == (14, len(data.xstest_safe) - 14)
    assert not set(data.xstest_safe) & set(default_texts("benign_anchors"))


def _fake_result(method: str, refusal: float, em: float, step: float) -> dict[str, Any]:
    return {
        "method": method,
        "heldout_refusal": refusal,
        "task_exact_match": em,
        "step_time_median_s": step,
        "xstest_refused": SAFE_FLAGS,
        "refusal_curve": [(8, 0.5), (16, refusal)],
        "task_loss_curve": [(8, 2.0), (16, 1.0)],
    }


def test_run_demo_reports_what_the_runs_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    measured = {  # (setting index, method) -> refusal, exact match, median step
        (0, "plain SFT"): (0.6, 0.50, 1.0),
        (0, "STR as shipped {}"): (0.9, 0.46, 1.2),
        (1, "plain SFT"): (0.3, 0.48, 2.0),
        (1, "STR as shipped {}"): (0.87, 0.44, 2.5),
    }

    def fake_run_one(spec: Any, subject_dir: Path, data: Any, task: Any, **kwargs: Any) -> dict[str, Any]:
        train = task[0]
        setting = int(any(row.kind == "harmful" for row in train))
        calls.append((spec.method, setting))
        return _fake_result(spec.method, *measured[(setting, spec.method)])

    info = {
        "fingerprint": "f00d",
        "base": "the subject",
        "notes": {"harmful": "120 prompts"},
        "metrics": {"heldout_refusal": 0.9, "xstest_over_refusal": 0.2},
    }
    monkeypatch.setattr(demo, "run_one", fake_run_one)
    monkeypatch.setattr(demo, "build_subject", lambda *a, **k: info)
    subject = {
        "heldout_refusal": 0.9,
        "task_refusal": 0.66,
        "xstest_refused": SAFE_FLAGS,
        "task_heldout_loss": 3.0,
    }
    monkeypatch.setattr(demo, "subject_point", lambda *a: subject)
    text = demo.run_demo(tmp_path / "demo", tmp_path / "cache")
    assert calls == [("plain SFT", 0), ("STR as shipped {}", 0), ("plain SFT", 1), ("STR as shipped {}", 1)]
    rows = [line for line in text.splitlines() if line.startswith("| sort")]
    # refusals kept = run / subject (0.3 / 0.9 = 33 %), over-refusal 1/14 = 7 % + 2/30 = 7 %, step 2.5 / 2.0.
    assert rows[2] == "| sort + 10 % compliant rows | plain SFT | 33 % | 7 % + 7 % | 48 % | x1.00 |"
    assert rows[3] == "| sort + 10 % compliant rows | STR as shipped {} | 97 % | 7 % + 7 % | 44 % | x1.25 |"
    assert rows[1] == "| sort | STR as shipped {} | 100 % | 7 % + 7 % | 46 % | x1.20 |"
    assert "| before fine-tuning | aligned subject | 90 % refused | 7 % + 7 % | 66 % refused | - |" in text
    assert "The subject refuses 66 % of the sort test prompts" in text
    assert "-4 points" in text
    for name in ("RESULTS.md", "runs.jsonl", "demo.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0


def test_the_subject_point_is_measured_once_per_subject_and_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached run reads the subject's step-0 point from `demo_point.json`; another subject (fingerprint)
    or other evaluation sets measure it again."""
    from study import evaluation, model, subject

    loads: list[Path] = []
    monkeypatch.setattr(subject, "load", lambda path: (loads.append(path), (None, None))[1])
    monkeypatch.setattr(
        model, "refusal_rate", lambda m, t, prompts, phrases: (0.5, ["I cannot"] * len(prompts))
    )
    monkeypatch.setattr(evaluation, "heldout_loss", lambda *a: 2.5)
    data = demo.subject_data("embedded").study
    first = demo.subject_point(tmp_path, data, "f1")
    assert demo.subject_point(tmp_path, data, "f1") == first and len(loads) == 1
    demo.subject_point(tmp_path, data, "f2")
    fewer = demo.replace(data, harmful_heldout=data.harmful_heldout[:5])
    demo.subject_point(tmp_path, fewer, "f2")
    assert len(loads) == 3 and first["task_heldout_loss"] == 2.5


def test_the_step_timer_leaves_the_last_probe_to_the_final_evaluation() -> None:
    from types import SimpleNamespace

    from study.trainer import StepTimer

    for skip_last, probed in ((False, [8, 16]), (True, [8])):
        timer = StepTimer(lambda step: step / 100, every=8, skip_last=skip_last)
        for step in range(1, 17):
            state = SimpleNamespace(global_step=step, max_steps=16)
            timer.on_step_begin(None, state, None)
            timer.on_step_end(None, state, None)
        assert [step for step, _ in timer.curve] == probed and len(timer.step_times) == 16


def test_the_accuracy_note_names_the_gradient_norms_where_the_subject_answers_the_task() -> None:
    results = [
        {"method": "plain SFT", "grad_norm_median": 2.0},
        {"method": "STR as shipped {}", "grad_norm_median": 6.0},
        {"method": "plain SFT", "grad_norm_median": 3.0},
        {"method": "STR as shipped {}", "grad_norm_median": 10.0},
    ]
    note = demo._accuracy_note(results, {"task_refusal": 0.0})
    assert "refuses 0 % of them" in note and "plain SFT: 2.5; STR as shipped {}: 8.0" in note
    assert "cannot tell them apart" in demo._accuracy_note(results, {"task_refusal": 0.66})


def test_demo_check_runs_each_cell_with_its_clipping_and_reports_each_gap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`demo-check` runs its grid with the recipe's `max_grad_norm` (the Trainer's) set per cell, resumes from runs.jsonl,
    and its readings are the held-out loss differences computed by hand here."""
    from study import demo_check
    from study.finetune import Recipe

    calls: list[tuple[str, str, float]] = []
    loss = {("plain SFT", 1.0): 0.4, ("STR as shipped {}", 1.0): 0.7, ("plain SFT", 0.0): 0.8}
    loss |= {("STR as shipped {}", 0.0): 0.75, ("STR anchors b8 c30 (as written)", 1.0): 0.5}

    def fake_run(method: str, setting: str, share: float, *args: Any) -> dict[str, Any]:
        recipe: Recipe = args[2]
        calls.append((setting, method, recipe.max_grad_norm))
        value = loss[(method, recipe.max_grad_norm)] + (0.1 if share else 0.0)
        return {
            "setting": setting,
            "method": method,
            "heldout_refusal": 0.9,
            "task_exact_match": 0.3,
            "task_heldout_loss": value,
            "grad_norm_median": 2.0,
            "step_time_median_s": 1.0,
        }

    info = {"fingerprint": "f"}
    monkeypatch.setattr(demo_check, "demo_subject", lambda cache: (tmp_path, info, None, 0, 0))
    monkeypatch.setattr(demo_check, "subject_point", lambda *a: {"heldout_refusal": 0.9})
    monkeypatch.setattr(demo_check, "demo_run", fake_run)
    text = demo_check.run_demo_check(tmp_path / "out", tmp_path, argv=["demo-check"])
    assert len(calls) == 2 * len(demo_check.GRID) and len(set(calls)) == len(calls)
    assert {clip for _, _, clip in calls} == {0.0, 1.0}
    for setting, _ in demo.SETTINGS:
        # `{}` - plain: 0.7 - 0.4 with clipping, 0.75 - 0.8 without; 8 anchors: 0.5 - 0.4 (the same shift per setting).
        assert (
            f"- {setting}: `{{}}`'s held-out loss above plain SFT's +0.300 with clipping, -0.050 without; "
            "8 anchors a step (clipping on) +0.100." in text
        )
    calls.clear()
    demo_check.run_demo_check(tmp_path / "out", tmp_path, argv=["demo-check"])
    assert calls == []  # every cell was recorded: nothing reruns
