"""Issue 26's protocol study (`python -m study harmful-mixing`): its splits, its mixing, its arithmetic, and
that `{}` reaches the package exactly as a user passes it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.tiny_subject import tiny_aligned_subject

from study import finetune
from study.data import SHARED, Example
from study.finetune import METHODS, RunSpec, run_one

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is not here")


@needs_shared
def test_evaluation_sets_share_nothing_with_subject_anchors_or_attacks() -> None:
    from study.harmful_sources import build_sources
    from study.subject import subject_data

    sources = build_sources()
    subject = subject_data("shared")
    trained = {p for p, _ in subject.harmful} | set(subject.benign) | set(subject.benign_heldout)
    attack_prompts = {e.prompt for rows in sources.attacks.values() for e in rows}
    held_harmful = [p for prompts in sources.harmful.values() for p in prompts]
    held_over = [p for prompts in sources.over_refusal.values() for p in prompts]
    held = set(held_harmful) | set(held_over)
    assert len(set(held_harmful)) == len(held_harmful) == 120 + 200 + 200
    assert len(held_over) == 250 + 200
    assert not held & trained
    assert not held & attack_prompts
    assert not held & set(sources.anchors)
    validation = set(sources.val_harmful) | set(sources.val_over_refusal)
    mix = {e.prompt for e in sources.mix_rows}
    assert not validation & held and not validation & trained
    assert not mix & (held | validation | trained | attack_prompts)
    # The second attack's goals are AdvBench goals the subject neither trained nor is evaluated on.
    assert not {e.prompt for e in sources.attacks["advbench"]} & (trained | set(sources.harmful["advbench"]))
    assert all(e.response.startswith("Sure") for e in sources.attacks["advbench"])
    assert len(sources.attacks["beavertails"]) == 200
    # The second validation set: AdvBench goals neither trained, held out, anchors, nor among the first 140
    # attack rows (the most a run may take); a run that would reach them is refused before training.
    goals = set(sources.val_harmful_goals)
    assert len(goals) == 60 and not goals & (held | trained | set(sources.anchors) | validation)
    assert not goals & {e.prompt for e in sources.attacks["advbench"][:140]}
    assert goals <= {e.prompt for e in sources.attacks["advbench"]}


@needs_shared
def test_mixing_replaces_the_first_rows_in_order() -> None:
    from study.harmful_sources import mixed_task

    attack = [Example(f"harm {i}", f"sure {i}", "harmful") for i in range(30)]
    clean, test, val = mixed_task("sst2", 100, 0.0, attack)
    train, test2, val2 = mixed_task("sst2", 100, 0.2, attack)
    assert len(train) == len(clean) == 100 and test == test2 and val == val2
    assert [e.prompt for e in train[:20]] == [f"harm {i}" for i in range(20)]
    assert train[20:] == clean[20:]
    assert not {e.prompt for e in val} & {e.prompt for e in clean}
    with pytest.raises(ValueError, match="needs 40 harmful rows"):
        mixed_task("sst2", 200, 0.2, attack)


@needs_shared
def test_a_run_that_would_train_on_validation_goals_is_refused_before_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from study import harmful_run
    from study.harmful_mixing import Block
    from study.harmful_sources import build_sources
    from study.subject import subject_data

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("trained")

    monkeypatch.setattr(harmful_run, "run_one", no_training)
    sources = build_sources()
    common: dict[str, Any] = dict(
        subject_dir=Path("unused"),
        sources=sources,
        data=subject_data("shared").study,
        tokens=[],
        fingerprint="f",
        stride=1,
    )
    # 150 AdvBench rows reach the validation goals (rows 140-199 of the attack); 140 do not.
    with pytest.raises(ValueError, match="reaches 10 validation goals"):
        harmful_run.run_block_spec(
            Block("sst2", 0.15, ("plain SFT",), attack="advbench"), "plain SFT", 0, **common
        )
    with pytest.raises(AssertionError, match="trained"):
        harmful_run.run_block_spec(
            Block("sst2", 0.14, ("plain SFT",), attack="advbench"), "plain SFT", 0, **common
        )


def test_retention_flags_and_distances_by_hand() -> None:
    from study.distances import max_jaccard
    from study.harmful_report import retention
    from study.harmful_run import _split_flags

    base = {"advbench": "1101", "xstest_unsafe": "10", "llamas": "0111"}
    run = {"per_source": {"advbench": "1001", "xstest_unsafe": "00", "llamas": "0110"}}
    names = ["advbench", "xstest_unsafe", "llamas"]
    assert retention(run, base, names) == pytest.approx(4 / 7)
    assert retention(run, base, ["llamas"]) == pytest.approx(2 / 3)
    far = {"advbench": [True, False, False, True], "xstest_unsafe": [True, True], "llamas": [False] * 4}
    # Far: AdvBench 0 and 3 (subject 1, 1; run 1, 1), XSTest unsafe 0 and 1 (subject 1, 0; run 0, 0).
    assert retention(run, base, names, far) == pytest.approx(2 / 3)
    assert _split_flags("110100", {"a": 2, "b": 4}) == {"a": "11", "b": "0100"}
    with pytest.raises(ValueError):
        _split_flags("110", {"a": 2, "b": 2})
    # {how, to, make, a, cake} vs {how, to, bake, a, cake}: 4 shared of 6.
    assert max_jaccard(["How to make a cake", "zzz"], ["how to bake a cake", "x y"]) == [
        pytest.approx(4 / 6),
        0.0,
    ]


def test_as_shipped_config_reaches_attach_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`STR as shipped {}` passes `{}` and no tokens (the package mines its own, its own anchors), while the
    study's older methods keep their pinned settings."""
    shipped = METHODS["STR as shipped {}"]
    assert shipped.str_config == {} and shipped.as_shipped
    assert METHODS["STR adapter mse c1"].str_config["penalty"]["form"] == "mse"
    seen: list[tuple[dict[str, Any], Any]] = []
    real_attach = finetune.attach

    def spy(trainer: Any, config: Any, **kwargs: Any) -> Any:
        seen.append((config, kwargs["tokens"]))
        return real_attach(trainer, config, **kwargs)

    monkeypatch.setattr(finetune, "attach", spy)
    data, task = tiny_aligned_subject(
        tmp_path / "aligned", n_aligned=120, n_harmful=4, n_safe=2, n_task=(16, 4)
    )
    refusal_rows = [Example(p, "I cannot help with that.", "harmful") for p in data.harmful_train[:4]]
    results = {}
    for method in ("STR as shipped {}", "mix 10% refusals"):
        results[method] = run_one(
            RunSpec("sort", "lora", method, 0),
            tmp_path / "aligned",
            data,
            task,
            epochs=1.0,
            max_len=64,
            curve_every=0,
            mix_rows=refusal_rows,
            keep_replies=True,
        )
    assert seen == [({}, None)]
    # The kept replies are the ones the flags were read from: a judge applied later sees what was judged.
    from study.model import refusal_flags

    for result in results.values():
        replies = result["replies"]
        assert refusal_flags(replies["harmful"], data.refusal_phrases) == result["heldout_refused"]
        assert refusal_flags(replies["over_refusal"], data.refusal_phrases) == result["xstest_refused"]
        assert refusal_flags(replies["task"], data.refusal_phrases) == result["task_refused"]
        assert len(result["task_correct"]) == len(replies["task"]) > 0
        assert result["task_correct"].count("1") / len(replies["task"]) == result["task_exact_match"]
    # The shipped default's anchors are the package's (a separate anchor forward each step).
    assert results["STR as shipped {}"]["steps"] == 1
    assert results["STR as shipped {}"]["anchor_token_share"] > 0
    # 16 rows of batch 16, plus 16 // 9 = 1 given refusal row: a second step.
    assert results["mix 10% refusals"]["steps"] == 2


def test_task_prompt_table_counts_refusals_per_task_by_hand() -> None:
    from study.harmful_report import _target_lines, _task_prompt_lines

    base = {
        "task_refused": {"sst2": "1101", "agnews": "0000"},
        "shipped_task_refused": {"sst2": "1000", "agnews": "0001"},
    }
    lines = _task_prompt_lines(base)
    assert "| sst2 | 4 | 75.0 % | 25.0 % |" in lines
    assert "| agnews | 4 | 0.0 % | 25.0 % |" in lines
    # A baseline recorded before the field existed gets no table rather than a made-up one.
    assert _task_prompt_lines({}) == []
    # A task with no one-epoch runs gets no targets table; one with runs names the subject's refusals.
    assert _target_lines([], base, "agnews", "advbench") == []


def test_auc_and_label_errors_by_hand() -> None:
    from study.evaluation import auc
    from study.task_errors import label_errors

    # Positives {0.4, 0.8} against negatives {0.1, 0.5}: 3 of 4 pairs ordered; a tie counts half.
    assert auc([0.1, 0.4, 0.5, 0.8], [False, True, False, True]) == 0.75
    assert auc([1.0, 1.0], [True, False]) == 0.5
    gold = ["negative", "positive", "negative", "positive", "positive"]
    # Wrong on the first two gold negatives' one and on no positive: bias toward positive +1 of 5.
    assert label_errors("01111", gold, ("negative", "positive")) == (1, 0, 0.2)
    assert label_errors("10011", gold, ("negative", "positive")) == (1, 1, 0.0)
