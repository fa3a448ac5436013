"""DeepSpeed ZeRO-2/3 on one accelerator: STR's optimizer step under ZeRO equals the plain Trainer's (issue 29).

The CPU tests (tests/test_deepspeed.py) run two ranks on DeepSpeed's CPU accelerator with gloo; a lent GPU
has one device, and NCCL refuses two ranks on one device, so here one rank runs each ZeRO stage on CUDA with
NCCL: ZeRO-3 still partitions every parameter (`stage3_param_persistence_threshold: 0`) and frees it outside
its module's forward, so STR's gathered head rows, anchor references and folded batches run on gathered
weights as they do on many GPUs. Per case, one optimizer step (SGD, lr 1: the update is the gradient) of a
small random-init LoRA Llama, fp32 with TF32 off, is compared with the same step without DeepSpeed.

    python bench/gpu_zero_check.py --out bench/results/gpu_zero_check            # on a CUDA device (4 cases)
    DS_ACCELERATOR=cpu python bench/gpu_zero_check.py --device cpu --out DIR     # the same on the CPU (tests)

Writes OUT.json and OUT.md; exits 1 when a case differs beyond the tolerance or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' exact-step helpers

from helpers.configs import training_positions
from helpers.hf import PadCollator, common_args, examples, trainable_snapshot, zero_config

from str_hooks.testing import make_lora, make_model, make_tokenizer

RTOL = 1e-5
# (name, ZeRO stage, optimizer state offloaded to the CPU, STR config)
CASES: tuple[tuple[str, int, bool, str], ...] = (
    ("zero2 {}", 2, False, "defaults"),
    ("zero3 {}", 3, False, "defaults"),
    ("zero3 training positions (adapter mse)", 3, False, "training_positions"),
    ("zero3 offload {}", 3, True, "defaults"),
)


def str_config(name: str) -> dict[str, Any]:
    return {} if name == "defaults" else training_positions({"coef": 0.7})


def one_step(
    case: tuple[str, int, bool, str] | None, config: str, device: str, workdir: Path
) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    """One SGD step (lr 1) of the LoRA model with STR attached as `config`; under DeepSpeed when `case` is
    given. Returns the update of every trainable parameter and the logged STR term and loss."""
    from transformers import Trainer, TrainingArguments

    from str_hooks import mine_safety_tokens
    from str_hooks.integrations.hf import attach

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = make_lora(make_model("llama"))
    before = {n: p.cpu() for n, p in trainable_snapshot(model).items()}
    args = common_args(workdir, batch=8, ga=1)
    args.update(use_cpu=device == "cpu")
    if case is not None:
        _, stage, offload, _ = case
        args.update(deepspeed=zero_config(stage, offload), ddp_backend="gloo" if device == "cpu" else "nccl")
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=examples(tokenizer),
        data_collator=PadCollator(tokenizer.pad_token_id),
    )
    # `{}` mines its own tokens, as a user gets it; the training-positions case names the tests' 12.
    tokens = None if config == "defaults" else mine_safety_tokens(tokenizer, k=12)
    attach(trainer, str_config(config), tokens=tokens, tokenizer=tokenizer)
    trainer.train()
    if case is not None:
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            after = {n: p.cpu() for n, p in trainable_snapshot(model).items()}
        if case[1] == 3 and model.base_model.model.lm_head.weight.numel() != 0:
            raise RuntimeError("ZeRO-3 left the head whole: the gathered-rows path did not run")
    else:
        after = {n: p.cpu() for n, p in trainable_snapshot(model).items()}
    logged = trainer.state.log_history[0]
    terms = (float(logged.get("str/penalty", float("nan"))), float(logged["loss"]))
    return {n: before[n] - after[n] for n in before}, terms


def compare(update: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, bool]:
    """Largest |difference| over the largest |expected| of each parameter, and whether all are within RTOL."""
    worst = 0.0
    for name, value in expected.items():
        scale = float(value.abs().max()) or 1.0
        worst = max(worst, float((update[name] - value).abs().max()) / scale)
    return worst, worst <= RTOL


def run_case(index: int, device: str, workdir: Path) -> dict[str, Any]:
    """One ZeRO case in a process of its own (DeepSpeed's process group and Accelerate's state are per
    process): its update and STR term, read back from `workdir`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(port)
    cmd = [sys.executable, __file__, "--device", device, "--case", str(index), "--workdir", str(workdir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the case's process exited {done.returncode}: {done.stderr[-2000:]}")
    update = load_file(str(workdir / "update.safetensors"))
    return {"update": update, "term": tuple(json.loads((workdir / "term.json").read_text()))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_zero_check"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--cases", type=int, nargs="+", default=None, help="run only these cases (indices into CASES)"
    )
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)  # a child process's case
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.case is not None:
        case = CASES[args.case]
        update, term = one_step(case, case[3], args.device, args.workdir)
        save_file({n: t.contiguous() for n, t in update.items()}, str(args.workdir / "update.safetensors"))
        (args.workdir / "term.json").write_text(json.dumps(list(term)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="zero-check-"))
    chosen = [(i, CASES[i]) for i in (args.cases if args.cases is not None else range(len(CASES)))]
    configs = sorted({case[3] for _, case in chosen})
    expected = {name: one_step(None, name, args.device, workdir / name) for name in configs}
    results = []
    for index, (name, stage, offload, config) in chosen:
        record: dict[str, Any] = {
            "case": name,
            "stage": stage,
            "offload": offload,
            "config": str_config(config),
        }
        try:
            child = workdir / f"case{index}"
            child.mkdir()
            ran = run_case(index, args.device, child)
            (term, loss), (plain_term, plain_loss) = ran["term"], expected[config][1]
            record.update(str_term=term, str_term_plain=plain_term, loss=loss, loss_plain=plain_loss)
            if offload:
                # DeepSpeed steps offloaded optimizer state with its own CPU optimizer, not the Trainer's SGD:
                # the update is not the gradient, so the logged STR term and loss are what must agree.
                ok = abs(term - plain_term) <= RTOL * abs(plain_term) and abs(
                    loss - plain_loss
                ) <= RTOL * abs(plain_loss)
                record.update(
                    ok=ok, compared="STR term and loss (the update is DeepSpeed's own offloaded step)"
                )
            else:
                worst, ok = compare(ran["update"], expected[config][0])
                record.update(max_rel_diff=worst, ok=ok, compared="update")
        except Exception as error:  # a failing case is reported; the others still run
            record.update(
                ok=False, error=f"{type(error).__name__}: {error}", trace=traceback.format_exc()[-3000:]
            )
        results.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "trace"}), flush=True)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    import deepspeed
    import transformers

    header = {
        "device": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "rtol": RTOL,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**header, "cases": results}, indent=2))
    lines = [
        "# ZeRO-2/3 on one device: STR's optimizer step under DeepSpeed vs the plain Trainer",
        "",
        f"Command: `python bench/gpu_zero_check.py --device {args.device} --out {args.out}`; {device_name}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}.",
        f"Small random-init LoRA Llama, 8 rows, one SGD step (lr 1), fp32, TF32 off; tolerance {RTOL:g} of each "
        "parameter's largest update.",
        "",
        "| case | STR config | compared | max relative difference | STR term (ZeRO / plain) | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        diff = f"{r['max_rel_diff']:.2e}" if "max_rel_diff" in r else "-"
        terms = f"{r['str_term']:.4g} / {r['str_term_plain']:.4g}" if "str_term" in r else "-"
        verdict = "equal" if r["ok"] else r.get("error", "differs")
        lines.append(
            f"| {r['case']} | `{json.dumps(r['config'])}` | {r.get('compared', '-')} | {diff} | {terms} | {verdict} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
