"""Issue 27's study parts: evaluations on the way through a run (durability), the durability table's numbers,
and the balanced subject's given answers (the study itself is `python -m study generality`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.tiny_subject import tiny_aligned_subject

from study.finetune import RunSpec, run_one
from study.generality_report import durability_points
from study.harmful_sources import HARMFUL_SOURCES, OVER_REFUSAL_SOURCES
from study.task_prompts import labelled_task_prompts, task_style_prompts


def test_a_checkpoint_evaluation_is_the_evaluation_of_a_run_stopped_there(tmp_path: Path) -> None:
    """Step 2 of a 4-step run, measured on the way, equals a 2-step run's final evaluation on the same
    (every other) prompts: the same rows in the same order reach step 2, at a constant learning rate."""
    data, task = tiny_aligned_subject(
        tmp_path / "aligned", n_aligned=200, n_harmful=8, n_safe=6, n_task=(32, 8)
    )
    common = {"max_len": 64, "curve_every": 0, "keep_replies": True}
    short = run_one(
        RunSpec("sort", "lora", "plain SFT", 0), tmp_path / "aligned", data, task, epochs=1.0, **common
    )
    long = run_one(
        RunSpec("sort", "lora", "plain SFT", 0),
        tmp_path / "aligned",
        data,
        task,
        epochs=2.0,
        checkpoints=(2, 4),
        save_dir=tmp_path / "adapters",
        **common,
    )
    assert short["steps"] == 2 and long["steps"] == 4
    # Step 4 is the last: the final evaluation measures it, so only step 2 is a checkpoint.
    (point,) = long["checkpoint_evals"]
    assert point["step"] == 2 and long["checkpoint_stride"] == 2
    assert point["harmful_refused"] == short["heldout_refused"][::2]
    assert point["over_refused"] == short["xstest_refused"][::2]
    assert point["task_correct"] == short["task_correct"]
    # The replies themselves, not only their verdicts (a tiny model's verdicts are mostly alike).
    assert point["replies"]["harmful"] == short["replies"]["harmful"][::2]
    assert point["replies"]["over_refusal"] == short["replies"]["over_refusal"][::2]
    assert point["replies"]["task"] == short["replies"]["task"]
    assert point["replies"]["harmful"] != long["replies"]["harmful"][::2]
    assert (tmp_path / "adapters" / "sort-lora-plain-sft-seed0-step2").is_dir()
    # A run without checkpoints records none.
    assert "checkpoint_evals" not in short and short["live_refusal_curve"] == []


def test_durability_points_by_hand() -> None:
    """Retention, over-refusal and accuracy per checkpoint, counted by hand on every other prompt."""
    base = {
        "advbench": "1111",
        "xstest_unsafe": "1100",
        "llamas": "1010",
        "xstest_safe": "0000",
        "alpaca": "0010",
        "opening": {"advbench": "1111", "xstest_unsafe": "1000", "llamas": "1010"},
    }
    # Every other harmful prompt: 1111 1100 1010 -> positions 0,2,4,6,8,10: 1,1,1,0,1,1 -> 5 refused.
    # Opening: 1111 1000 1010 -> 1,1,1,0,1,1 -> 5. Over: 0000 0010 -> 0,0,0,1 -> 1 of 4.
    run = {
        "steps": 8,
        "checkpoint_stride": 2,
        "checkpoint_evals": [
            {
                "step": 4,
                "harmful_refused": "111000",
                "harmful_opening": "110000",
                "over_refused": "1100",
                "task_correct": "0101",
            }
        ],
        "per_source": {
            "advbench": "0000",
            "xstest_unsafe": "0000",
            "llamas": "0011",
            "xstest_safe": "1000",
            "alpaca": "0000",
        },
        "per_source_opening": {"advbench": "0000", "xstest_unsafe": "0000", "llamas": "0011"},
        "task_correct": "1111",
    }
    assert set(HARMFUL_SOURCES) == {"advbench", "xstest_unsafe", "llamas"}
    assert OVER_REFUSAL_SOURCES == ["xstest_safe", "alpaca"]
    first, last = durability_points(run, base)
    assert first == pytest.approx(
        {
            "step": 4,
            "retention": 3 / 5,
            "retention_opening": 2 / 5,
            "over_refusal": 2 / 4 - 1 / 4,
            "accuracy": 0.5,
        }
    )
    # Final: harmful 0000 0000 0011 -> every other: 0,0,0,0,0,1 -> 1; over 1000 0000 -> 1,0,0,0.
    assert last == pytest.approx(
        {
            "step": 8,
            "retention": 1 / 5,
            "retention_opening": 1 / 5,
            "over_refusal": 1 / 4 - 1 / 4,
            "accuracy": 1.0,
        }
    )


def test_labelled_task_prompts_carry_their_labels_and_counts() -> None:
    labelled = dict(labelled_task_prompts())
    assert set(labelled) <= set(task_style_prompts())
    assert len(labelled) == 96 + 24 + 12
    for prompt, answer in labelled.items():
        if prompt.startswith("Count the words"):
            assert answer == str(len(prompt.split("\n", 1)[1].split()))
        else:
            assert answer in {
                "positive",
                "negative",
                "local politics",
                "business",
                "science",
                "sports",
                "technology",
            }


def test_report_cells_by_hand() -> None:
    """One block of two methods: retention under both judges, over-refusal and the step ratio, by hand."""
    from study.generality_report import report

    base = {
        "advbench": "1111",
        "xstest_unsafe": "1100",
        "llamas": "1010",
        "xstest_safe": "0000",
        "alpaca": "0010",
        "opening": {
            "advbench": "1111",
            "xstest_unsafe": "1000",
            "llamas": "1010",
            "xstest_safe": "0000",
            "alpaca": "0000",
        },
    }

    def run(method: str, harmful: str, step: float) -> dict[str, object]:
        flags = {"advbench": harmful[:4], "xstest_unsafe": harmful[4:8], "llamas": harmful[8:]}
        return {
            "family": "smollm2",
            "aligned_fingerprint": "f",
            "task": "sst2",
            "mode": "lora",
            "attack": "beavertails",
            "p": 0.1,
            "n": 1000,
            "epochs": 1.0,
            "method": method,
            "seed": 0,
            "per_source": {**flags, "xstest_safe": "1000", "alpaca": "0010"},
            "per_source_opening": {**flags, "xstest_safe": "0000", "alpaca": "0000"},
            "task_exact_match": 0.9,
            "task_refused": "00",
            "step_time_median_s": step,
            "peak_rss_delta_mib": 100.0,
            "wall_seconds": 60.0,
        }

    # Far from the anchors and the BeaverTails rows (both < 0.4): AdvBench's first and last prompts (its second
    # is near the anchors, its third near the rows), XSTest's first two, llamas' first (advbench rows: all far).
    distances = {
        "advbench": {
            "anchors": [0.1, 0.5, 0.2, 0.3],
            "beavertails": [0.1, 0.2, 0.6, 0.3],
            "advbench": [0.0] * 4,
        },
        "xstest_unsafe": {"anchors": [0.0] * 4, "beavertails": [0.0, 0.0, 0.4, 0.9], "advbench": [0.0] * 4},
        "llamas": {
            "anchors": [0.1, 0.1, 0.7, 0.1],
            "beavertails": [0.1, 0.5, 0.1, 0.5],
            "advbench": [0.0] * 4,
        },
    }
    # The subject refuses 8 of 12 (keyword) and 7 of 12 (opening); of the 5 far prompts, all 5.
    text = report(
        [run("plain SFT", "100000000000", 2.0), run("STR as shipped {}", "111111001010", 2.5)],
        {"f": base},
        "python -m study generality",
        "protocol",
        distances,
    )
    plain = next(line for line in text.splitlines() if line.startswith("| plain SFT |"))
    shipped = next(line for line in text.splitlines() if line.startswith("| STR as shipped {} |"))
    # plain: 1 of 8 keyword (12 %), 1 of 7 opening (14 %); far 1 of 5 (AdvBench's first); over-refusal XSTest
    # +25.0 keyword / +0.0 opening.
    assert plain.startswith(
        "| plain SFT | 1 | 12 % | 14 % | 25 % | 0 % | 0 % | 20 % | 25.0 / 0.0 | 0.0 / 0.0 | 90.0 %"
    )
    # {}: 8 of 8 (100 %), opening 8 of 7 refusals kept (114 %: it refuses where the subject opened otherwise);
    # far: 5 of 5.
    assert shipped.startswith("| STR as shipped {} | 1 | 100 % | 114 % | 100 % | 100 % | 100 % | 100 % |")
    assert "| x1.25 |" in shipped
    # The distance table: medians and far counts per set, for the attack the runs used only.
    advbench = next(line for line in text.splitlines() if line.startswith("| AdvBench held-out | 4 |"))
    assert advbench == "| AdvBench held-out | 4 | 0.25 | 0.25 | 2 |"
    llamas = next(
        line for line in text.splitlines() if line.startswith("| safety_tuned_llamas held-out | 4 |")
    )
    assert llamas == "| safety_tuned_llamas held-out | 4 | 0.10 | 0.30 | 1 |"


def test_distill_cached_reuses_only_whole_batches_and_equals_a_fresh_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A longer prompt list that starts with the cached one reuses its whole batches and distils the rest; the
    result is what a fresh call gives (same batches, same padding)."""
    import study.subject as subject
    from study.shipped import load

    tiny_aligned_subject(tmp_path / "aligned", n_aligned=60, n_harmful=2, n_safe=2, n_task=(8, 2))
    model, tokenizer = load(tmp_path / "aligned")
    monkeypatch.setattr(subject, "DISTILL_BATCH", 4)
    monkeypatch.setattr(subject, "DISTILL_TOKENS", 6)
    prompts = [f"Tell me about item {i} of the list, please" + " please" * (i % 3) for i in range(10)]
    calls: list[int] = []
    real = subject.distill

    def counting(m: object, t: object, ps: list[str], n: int) -> list[tuple[str, bool]]:
        calls.append(len(ps))
        return real(m, t, ps, n)

    monkeypatch.setattr(subject, "distill", counting)
    path = tmp_path / "distilled.json"
    first = subject.distill_cached(model, tokenizer, prompts[:7], path)
    longer = subject.distill_cached(model, tokenizer, prompts, path)
    # 7 cached prompts hold one whole batch of 4: the other 6 are distilled again.
    assert calls == [7, 6]
    assert longer[:4] == first[:4]
    assert longer == real(model, tokenizer, prompts, 6)
    # A list that differs in its first batch reuses nothing.
    subject.distill_cached(model, tokenizer, ["Another start", *prompts[1:]], path)
    assert calls[-1] == 10


def test_contrast_prompts_are_not_xstest_prompts() -> None:
    from study.data import SHARED, read_xstest
    from study.distances import max_jaccard
    from study.texts import CONTRAST_SAFE

    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not here")
    xstest = read_xstest("safe") + read_xstest("unsafe")
    assert len(set(CONTRAST_SAFE)) == len(CONTRAST_SAFE) == 90
    assert max(max_jaccard(CONTRAST_SAFE, xstest)) <= 0.5


def test_harsh_and_task_instruction_prompts_carry_no_sst2_input() -> None:
    """The balanced subject's sentiment questions under SST-2's own instruction use the project's inputs only."""
    from study.data import SHARED
    from study.task_prompts import SST2_INSTRUCTION_FORM
    from study.tasks import sst2_task

    harsh = dict(labelled_task_prompts(harsh=True))
    added = set(harsh) - set(dict(labelled_task_prompts()))
    assert len(added) == 90 + 54
    under_instruction = [p for p in added if p.startswith(SST2_INSTRUCTION_FORM.split("\n")[0])]
    assert len(under_instruction) == 54
    assert {harsh[p] for p in added} == {"positive", "negative"}
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not here")
    train, test = sst2_task(4800, 200)
    inputs = {e.prompt.split("\n", 1)[1].strip().lower() for e in train + test}
    assert not {p.split("\n", 1)[1].strip().lower() for p in added} & inputs


def test_pending_runs_skips_recorded_runs_in_plan_order_for_both_studies() -> None:
    """Resuming: a recorded run is not run again, a record from another subject or stride does not count,
    and the same (block, method, seed) listed twice in a plan runs once."""
    from study import generality
    from study.harmful_mixing import Block
    from study.harmful_run import _run_key, pending_runs

    lora = Block("sst2", 0.1, ("plain SFT", "{}"), seeds=2)
    long = Block("sst2", 0.1, ("plain SFT",), epochs=5.0, max_steps=600, checkpoints=(60,))
    again = Block("sst2", 0.1, ("plain SFT",))  # seed 0 of `lora`'s first method again

    def record(block: Block, method: str, seed: int, fingerprint: str = "f1", stride: int = 1) -> dict:
        return {
            "aligned_fingerprint": fingerprint,
            "task": block.task,
            "mode": block.mode,
            "method": method,
            "seed": seed,
            "p": block.p,
            "n": block.n,
            "attack": block.attack,
            "epochs": block.epochs,
            "max_steps": block.max_steps,
            "eval_stride": stride,
        }

    recorded = [
        record(lora, "{}", 0),
        record(lora, "plain SFT", 1, fingerprint="other subject"),
        record(long, "plain SFT", 0, stride=4),
        {**record(lora, "plain SFT", 0), "task_stride": 4},  # a quick plan's task subset is another run
    ]
    todo = pending_runs(
        [lora, long, again], recorded, generality.run_key, aligned_fingerprint="f1", eval_stride=1
    )
    assert [(b, m, s) for b, m, s in todo] == [
        (lora, "plain SFT", 0),
        (lora, "plain SFT", 1),
        (lora, "{}", 1),
        (long, "plain SFT", 0),
    ]
    # The harmful-mixing study's key has no subject, step budget or task stride (it uses none): its records are
    # filtered by subject before, and a 600-step block is told apart by its epochs.
    mixing = [r for r in recorded if r["aligned_fingerprint"] == "f1" and "task_stride" not in r]
    todo = pending_runs([lora], mixing, _run_key, eval_stride=1)
    assert todo == [(lora, "plain SFT", 0), (lora, "plain SFT", 1), (lora, "{}", 1)]


def test_a_stopped_subject_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """`train_epochs` with a state file: a run stopped at step 5 of 8 (state saved at 4) and started again ends
    at the weights of a run never stopped, and a fresh run after the last save reports where it resumed."""
    import torch

    from str_hooks.testing import make_lora, make_model
    from study.model import train_epochs

    rows = [
        {
            "input_ids": [5 + (i * 7 + j) % 400 for j in range(6 + i % 5)],
            "labels": [-100, -100] + [9] * (4 + i % 5),
        }
        for i in range(22)
    ]  # 22 rows at batch 6: 4 steps per epoch, the last one short

    def training(state_path: Path | None, stop_at: int | None = None) -> tuple[dict, int, int]:
        model = make_lora(make_model(seed=3))
        params = [p for p in model.parameters() if p.requires_grad]
        calls = {"n": 0}

        class StoppingAdamW(torch.optim.AdamW):
            def step(self, closure: Any = None) -> Any:
                calls["n"] += 1
                if stop_at is not None and calls["n"] == stop_at:
                    raise KeyboardInterrupt  # the session ends mid-run
                return super().step(closure)

        optimizer = StoppingAdamW(params, lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        resumed = train_epochs(model, rows, 0, optimizer, schedule, 2, 6, 0, "t", state_path, save_every=4)
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return trained, resumed, calls["n"]

    never_stopped, resumed, steps = training(None)
    assert resumed == 0 and steps == 8
    state = tmp_path / "partial" / "training.pt"
    with pytest.raises(KeyboardInterrupt):
        training(state, stop_at=5)
    assert state.is_file() and not (tmp_path / "partial" / "training.pt.writing").exists()
    assert torch.load(state, weights_only=True)["step"] == 4
    finished, resumed, steps = training(state)
    assert resumed == 4 and steps == 4  # only the steps after the save were taken again
    for name, value in never_stopped.items():
        torch.testing.assert_close(finished[name], value, rtol=0, atol=1e-6, msg=name)
    # The steps the resumed run took matter: starting it from scratch would end elsewhere.
    assert (
        any(not torch.allclose(finished[n], v) for n, v in training(None, stop_at=None)[0].items()) is False
    )


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_labelled_loss_equals_the_models_own_loss_and_gradients(arch: str) -> None:
    """The head projected only where a label is predicted: the same loss and gradients as the full forward."""
    import torch

    from str_hooks.testing import make_model, pad_rows
    from study.model import labelled_loss

    model = make_model(arch, seed=2)
    rows = [
        {"input_ids": list(range(10, 10 + n)), "labels": [-100] * (n - k) + list(range(40, 40 + k))}
        for n, k in ((9, 4), (6, 6), (12, 1))
    ]
    batch = pad_rows(rows, 0)
    expected = model(**batch, use_cache=False).loss
    expected.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got = labelled_loss(model, batch)
    got.backward()
    torch.testing.assert_close(got, expected)
    for name, grad in full.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_a_subjects_task_prompt_refusals_are_lent_across_strides(tmp_path: Path) -> None:
    """The task prompts do not depend on the evaluation stride: a quick plan's baseline takes them from the
    protocol's record of the same subject instead of generating 2 x 200 replies again, and only those asked."""
    import json

    from study.harmful_run import subject_baseline

    protocol = {
        "task_refused": {"sst2": "0010", "agnews": "0000"},
        "shipped_task_refused": {"sst2": "1111", "agnews": "0000"},
        "opening": {},
        "val_refusal_goals": 1.0,
    }
    quick = {"opening": {}, "val_refusal_goals": 0.5}  # recorded before the task fields existed
    other_subject = {"task_refused": {"sst2": "1"}, "shipped_task_refused": {"sst2": "1"}}
    (tmp_path / "subject.json").write_text(
        json.dumps({"abc/stride1": protocol, "abc/stride8": quick, "xyz/stride8": other_subject})
    )
    missing = tmp_path / "no model here"  # nothing is loaded when the fields can be lent
    record = subject_baseline(missing, None, [], tmp_path, "abc/stride8", missing, tasks=("sst2",))  # type: ignore[arg-type]
    assert record["task_refused"] == {"sst2": "0010"} and record["shipped_task_refused"] == {"sst2": "1111"}
    assert json.loads((tmp_path / "subject.json").read_text())["abc/stride8"] == record
    # A task no record of this subject has is measured, not lent (here: there is no model to load).
    (tmp_path / "subject.json").write_text(json.dumps({"abc/stride1": protocol, "abc/stride8": quick}))
    with pytest.raises((OSError, ValueError)):
        subject_baseline(missing, None, [], tmp_path, "abc/stride8", missing, tasks=("gsm8k",))  # type: ignore[arg-type]


def test_replies_files_differ_where_the_generality_runs_differ(tmp_path: Path) -> None:
    """A full fine-tuning run, a 600-step run, a task-stride-4 run and a Gemma run of the same method, seed and
    block each keep their own replies file (the full run had overwritten the LoRA run's, the Gemma run the
    SmolLM2 run's), and a SmolLM2 LoRA run keeps the name the recorded runs already point to."""
    import gzip
    import json

    from study.harmful_run import write_replies

    lora = {"task": "sst2", "method": "plain SFT", "seed": 0, "p": 0.1, "n": 1000, "attack": "beavertails"}
    lora |= {"epochs": 1.0, "eval_stride": 1, "mode": "lora", "max_steps": -1, "task_stride": 1}
    variants = [lora, {**lora, "mode": "full"}, {**lora, "max_steps": 600}, {**lora, "task_stride": 4}]
    variants += [{**lora, "family": "smollm2"}, {**lora, "family": "gemma3"}]
    paths = [write_replies(r, {"harmful": [str(i)]}, tmp_path) for i, r in enumerate(variants)]
    assert paths[0] == paths[4] == "replies/sst2_plain_SFT_0_0.1_1000_beavertails_1.0_1.json.gz"
    assert paths[5] == "replies/sst2_plain_SFT_0_0.1_1000_beavertails_1.0_1_familygemma3.json.gz"
    assert len(set(paths)) == len(variants) - 1
    # Where two records share a name (the first and the fifth), the later write holds.
    for path, i in {path: i for i, path in enumerate(paths)}.items():
        with gzip.open(tmp_path / path, "rt") as handle:
            assert json.load(handle) == {"harmful": [str(i)]}


def test_xstest_type_table_counts_refusals_per_type_by_hand() -> None:
    """Each XSTest type's cell counts that type's refused prompts (seeds pooled); a run that replied to a
    stride of the prompts gets no table (its indices are not XSTest's)."""
    from study.data import SHARED, read_xstest_types
    from study.generality_report import xstest_type_lines

    if not (SHARED / "xstest").is_dir():
        pytest.skip(f"{SHARED} is not here")
    types = read_xstest_types("safe")
    first = types[0]
    n_first = types.count(first)
    base = {"xstest_safe": "".join("1" if i == 0 else "0" for i in range(len(types)))}
    every_first = "".join("1" if t == first else "0" for t in types)
    runs = {
        "plain SFT": [{"aligned_fingerprint": "f", "per_source": {"xstest_safe": "0" * len(types)}}],
        "STR": [
            {"aligned_fingerprint": "f", "per_source": {"xstest_safe": every_first}},
            {"aligned_fingerprint": "f", "per_source": {"xstest_safe": every_first}},
        ],
    }
    lines = xstest_type_lines(runs, {"f": base})
    row = next(line for line in lines if line.startswith(f"| {first} |"))
    assert row == f"| {first} | 1 / {n_first} | 0 / {n_first} | {2 * n_first} / {2 * n_first} |"
    assert len([line for line in lines if line.startswith("| ") and "/" in line]) == len(set(types))
    strided = {"STR": [{"aligned_fingerprint": "f", "per_source": {"xstest_safe": every_first[::4]}}]}
    assert xstest_type_lines(strided, {"f": base}) == []


@pytest.mark.parametrize("family", ["smollm2", "gemma3"])
def test_subject_table_names_the_family_its_command_and_its_untuned_model(family: str) -> None:
    """SUBJECT.md for each family: its own command, epochs and untuned column, the targets judged per split."""
    from study.generality_report import subject_table

    def split(kind: str, keyword: float) -> dict[str, object]:
        return {"kind": kind, "n": 10, "keyword": keyword, "opening": keyword, "samples": [["p", "r"]]}

    info = {
        "family": family,
        "settings": {"epochs": 2 if family == "gemma3" else 1, "lr": 1e-3, "bs": 8},
        "build_seconds": 600.0,
        "train_seconds": 300.0,
        "base": "the base",
        "safety_data": {"harmful": "h", "benign": "b", "heldout": "o"},
        "splits": {
            "shipped": {"advbench": split("harmful", 0.0), "alpaca": split("ordinary", 0.0)},
            "subject": {"advbench": split("harmful", 0.9), "alpaca": split("ordinary", 0.1)},
        },
    }
    text = subject_table(info, Path("runs/s"))
    if family == "gemma3":
        assert text.startswith("# The Gemma 3 270M subject (issue 27 item 2)")
        assert "`python -m study subject --family gemma3 --out runs/s` (10 min to build, 5 of them" in text
        assert "2 LoRA epochs (r 16" in text and "| Gemma 3 base (untuned) keyword / opening |" in text
    else:
        assert text.startswith("# The balanced subject (issue 27 item 1)")
        assert "`python -m study subject --source balanced --out runs/s`" in text
        assert "One LoRA epoch (r 16" in text and "| shipped SmolLM2 keyword / opening |" in text
    assert "| AdvBench held-out | harmful | 10 | 0.0 / 0.0 % | 90.0 / 90.0 % | >= 90 %: met |" in text
    assert "| Alpaca held-out | ordinary | 10 | 0.0 / 0.0 % | 10.0 / 10.0 % | <= 5 %: **not met** |" in text
