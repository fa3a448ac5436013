"""The cost benchmarks in bench/: the step-cost script's report, the vocabulary-growth property measured by
its live-bytes tracker, and the GPU plan (dry run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402
import step_cost  # noqa: E402

# PEFT calls a transformers method deprecated in v5 on every get_peft_model.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def test_live_bytes_counts_new_storages_only() -> None:
    existing = torch.ones(1000)
    with benchlib.LiveBytes() as tracker:
        view = existing.view(10, 100).t()  # a view of a storage made before: not counted
        assert tracker.current == 0
        a = torch.ones(2000)  # 8000 bytes
        b = a * 2  # 8000 more
        assert tracker.current == 16000
        del a
        assert tracker.current == 8000
        del b
    assert tracker.current == 0
    assert tracker.peak == 16000
    assert view.shape == (100, 10)


def test_step_cost_report_and_vocab_growth(tmp_path: Path) -> None:
    out = tmp_path / "cpu"
    argv = [
        "--shape", "tiny",
        "--vocab", "512", "4096",
        "--repeats", "1",
        "--warmup", "0",
        "--k", "16",
        "--modes", "str-cache-mse", "str-anchors-folded", "str-anchors-folded-kl-open4", "gather-from-logits",
        "kl-sft",
        "--out", str(out),
        "--no-progress",
        "--no-plot",
    ]  # fmt: skip
    step_cost.main(argv)
    report = json.loads((tmp_path / "cpu.json").read_text())
    assert (tmp_path / "cpu.md").read_text().startswith("# STR step cost")
    for key in ("platform", "cpu_count", "torch", "transformers", "peft", "command"):
        assert key in report["meta"]
    assert report["load_before"] is not None and report["load_after"] is not None
    assert [r["vocab"] for r in report["runs"]] == [512, 4096]
    for run in report["runs"]:
        assert run["cache_build"]["sequences"] == 4 * run["batch"]
        assert set(run["modes"]) == {
            "plain",
            "str-cache-mse",
            "str-anchors-folded",
            "str-anchors-folded-kl-open4",
            "gather-from-logits",
            "kl-sft",
        }
        plain = run["modes"]["plain"]
        assert plain["ratio"] == pytest.approx(1.0) and plain["delta_bytes"] == 0
        for entry in run["modes"].values():
            assert entry["median_s"] > 0 and entry["min_s"] <= entry["median_s"] <= entry["max_s"]
            assert len(entry["times_s"]) == 1 and entry["peak_bytes"] > 0
        # The naive gather and KL-SFT cost extra memory; projecting k rows from hidden states barely any.
        modes = run["modes"]
        assert modes["str-cache-mse"]["delta_bytes"] < modes["gather-from-logits"]["delta_bytes"]
        assert modes["str-cache-mse"]["delta_vs_kl"] < 0.1
        # Folded anchors (through the core's prepare_batch): 8 anchors of T/32 tokens on 4 x 64 tokens.
        assert modes["str-anchors-folded"]["extra_tokens_frac"] == pytest.approx(8 * 8 / (2 * 64))
    growth = {g["mode"]: g for g in report["vocab_growth"]}
    # One fp32 [B, T, dV] tensor is the unit: the naive gather allocates a full-vocabulary gradient
    # buffer and KL-SFT full-vocabulary log-probs, so both grow by at least one; STR does not grow at all.
    assert growth["gather-from-logits"]["growth_in_fp32_BTdV"] >= 0.9
    assert growth["kl-sft"]["growth_in_fp32_BTdV"] >= 1.0
    assert growth["str-cache-mse"]["growth_bytes"] == 0
    assert growth["str-anchors-folded"]["growth_bytes"] == 0
    # The coarse KL at anchors takes the softmax on the anchors' points only: its growth with the vocabulary
    # is a few fp32 [points, dV] rows (8 anchors x a 4-token opening = 32 points), never a [B, T, dV] tensor.
    points_row = 32 * (4096 - 512) * 4
    kl_growth = growth["str-anchors-folded-kl-open4"]["growth_bytes"]
    assert 0 < kl_growth <= 2 * points_row and kl_growth < growth["kl-sft"]["growth_bytes"]
    with pytest.raises(SystemExit, match="--overwrite"):
        step_cost.main(argv)


def test_gpu_plan_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    plan = step_cost.main(["--shape", "llama3-8b", "qwen2.5-1.5b", "--device", "cuda", "--dry-run"])
    runs = {r["shape"]["name"]: r for r in plan["runs"]}
    assert runs["llama3-8b"]["parameters"] == pytest.approx(8.03e9, rel=0.01)
    assert runs["qwen2.5-1.5b"]["parameters"] == pytest.approx(1.54e9, rel=0.01)
    assert (
        runs["llama3-8b"]["tokens_per_step"] == 4 * 2048
        and runs["qwen2.5-1.5b"]["tokens_per_step"] == 8 * 2048
    )
    assert all(r["gradient_checkpointing"] and r["dtype"] == "bf16" for r in runs.values())
    assert set(plan["args"]["modes"]) == set(step_cost.MODES)
    assert json.loads(capsys.readouterr().out)["dry_run"] is True


def test_gpu_sync_check_runs_its_steps_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_sync_check.py runs once, on a lent GPU: its code path (three optimizer steps per setting,
    the cache built from the batches, folded anchors with openings and benign anchors) is run here on CPU,
    where the synchronization mode itself does not exist."""
    import gpu_sync_check

    for name in ("cache mse", "anchors folded kl, openings 4, benign"):
        workdir = tmp_path / name.split()[0]
        workdir.mkdir()
        result = gpu_sync_check.check(name, gpu_sync_check.SETTINGS[name], workdir, device_name="cpu")
        assert result["penalty"] is None and result["prepare_batch"] is None, result
        # The adapters start at the reference (LoRA B = 0) and move little in 3 steps at lr 1e-5: the penalty is
        # about 0 (a KL can round to -1e-8); what matters here is that it was computed and logged.
        assert abs(result["logged"]["str/penalty"]) < 1e-3 and result["logged"]["str/skipped"] == 0.0
