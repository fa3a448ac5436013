"""DeepSpeed ZeRO-2/3 through the HF Trainer, two CPU processes (DeepSpeed's CPU accelerator, gloo).

Each launches tests/dist_worker.py in a `trainer_zero*` mode and compares rank 0's one-step update (SGD,
lr 1: the gradient) with the same computation in one process over the whole batch, as the DDP tests do.
Under ZeRO-3 every parameter is partitioned (`stage3_param_persistence_threshold: 0`), so the frozen
head's safety rows are gathered by str-hooks, not read from a whole tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.hf import common_args, examples, make_trainer, one_big_batch_lora_gradient, trainable_snapshot
from helpers.launch import run_two_processes
from helpers.losses import assert_grads_close
from safetensors.torch import load_file

from str_hooks.testing import make_lora, make_model

pytest.importorskip("deepspeed", reason="the deepspeed extra (make test installs it)")

WORKER = Path(__file__).parent / "dist_worker.py"


def launch(mode: str, out: Path) -> Path:
    run_two_processes(WORKER, mode, str(out), timeout=600, env_extra={"DS_ACCELERATOR": "cpu"})
    return out


@pytest.mark.parametrize("mode", ["trainer_zero2", "trainer_zero3"])
def test_zero_two_processes_equal_one_big_batch(
    mode: str, tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    """LoRA, the penalty at training positions against the adapter-disabled model (mse)."""
    update = load_file(str(launch(mode, tmp_path) / "result.safetensors"))
    assert_grads_close(update, one_big_batch_lora_gradient(tokenizer, tokens))


def test_zero3_offload_logs_the_ddp_term(tmp_path: Path) -> None:
    """ZeRO-3 with the optimizer state offloaded to CPU: rank 0's logged loss and STR term equal those of the
    same two ranks under plain DDP (whose update tests/test_distributed.py checks against one process). The
    update itself is DeepSpeed's: its CPU-offload step with the Trainer's torch SGD moved every weight by
    +-lr here, so it cannot be compared with an SGD step."""
    logged = json.loads((launch("trainer_zero3_offload", tmp_path / "zero") / "log.json").read_text())
    run_two_processes(WORKER, "trainer", str(tmp_path / "ddp"))
    ddp = json.loads((tmp_path / "ddp" / "log.json").read_text())
    assert logged["str/penalty"] == pytest.approx(ddp["str/penalty"], rel=1e-5)
    assert logged["loss"] == pytest.approx(ddp["loss"], rel=1e-5)
    assert logged["str/penalty"] > 0


@pytest.mark.parametrize("mode", ["trainer_zero3_folded_decision", "trainer_zero3_default"])
def test_zero3_anchors_equal_one_process(mode: str, tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """Anchors under ZeRO-3 (2 x 4 rows): folded decision-point anchors, and `{}` exactly (the package's own
    anchors and mined tokens): the update equals one process with all 8 rows and the same config."""
    from helpers.hf import anchor_config

    from str_hooks.integrations.hf import attach

    update = load_file(str(launch(mode, tmp_path / "zero") / "result.safetensors"))
    torch.manual_seed(0)
    model = make_lora(make_model("llama"))
    before = trainable_snapshot(model)
    trainer = make_trainer("trainer", model, tokenizer, examples(tokenizer), common_args(tmp_path, 8, 1))
    if mode == "trainer_zero3_default":
        attach(trainer, {}, tokenizer=tokenizer)
    else:
        attach(trainer, anchor_config("folded", decision_point=True), tokens=tokens, tokenizer=tokenizer)
    trainer.train()
    expected = {n: before[n] - p for n, p in trainable_snapshot(model).items()}
    assert_grads_close(update, expected, rtol=2e-5)


def test_zero3_trainable_head_is_refused_with_the_alternatives(tmp_path: Path) -> None:
    """Full fine-tuning under ZeRO-3: the partitioned head is trainable; STR says why it cannot read its rows
    and what works instead, at train begin, before any step."""
    message = (launch("trainer_zero3_full_head", tmp_path) / "error.txt").read_text()
    assert "partitioned by DeepSpeed ZeRO-3 and trainable" in message
    assert "ZeRO-2" in message and "FSDP2" in message and "Freeze the head" in message


def test_the_gpu_scripts_zero_check_runs_on_the_cpu_and_compares_the_update(tmp_path: Path) -> None:
    """bench/gpu_zero_check.py (bench/gpu.sh's ZeRO check: one rank on one device) run as on a GPU but on
    DeepSpeed's CPU accelerator, ZeRO-3 with `{}`: the update equals the plain Trainer's, and its comparison
    fails an update that differs by more than its tolerance."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_zero_check.py"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "zero_check"
    cmd = [sys.executable, str(script), "--device", "cpu", "--cases", "1", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (case,) = json.loads(out.with_suffix(".json").read_text())["cases"]
    assert case["case"] == "zero3 {}" and case["compared"] == "update" and case["ok"]
    assert case["max_rel_diff"] <= 1e-5 and case["str_term"] == pytest.approx(
        case["str_term_plain"], rel=1e-5
    )
    sys.path.insert(0, str(script.parent))
    from gpu_zero_check import RTOL, compare

    expected = {"w": torch.tensor([1.0, -2.0])}
    assert compare({"w": torch.tensor([1.0, -2.0 + 1e-6])}, expected)[1]
    assert not compare({"w": torch.tensor([1.0, -2.0 + 4 * RTOL * 2.0])}, expected)[1]
