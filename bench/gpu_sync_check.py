"""On a CUDA device: is STR's per-micro-batch path free of host synchronization? (tests/test_host_sync.py
checks the same on CPU with a dispatch-mode detector; this is the real thing.)

    python bench/gpu_sync_check.py --out bench/results/gpu_sync_check

For every reference source and anchor placement: attach to a small random-init Llama with LoRA (bf16), run two
optimizer steps of two micro-batches to reach steady state, then run one more step with
`torch.cuda.set_sync_debug_mode("error")` around each `StepDriver.penalty` (what the trainer adapters call per
micro-batch), and separately around `prepare_batch`. Writes OUT.json and OUT.md; exits 1 if a penalty synced.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import StubTokenizer, stub_tokens
from step_cost_modes import STRMode, make_mode


def mode_sections(name: str) -> dict[str, Any]:
    """The `penalty` and `reference` sections of a step-cost STR mode's config (`check` adds the rest)."""
    mode = make_mode(name)
    assert isinstance(mode, STRMode), name
    return {"penalty": mode.config["penalty"], "reference": mode.config["reference"]}


SETTINGS: dict[str, dict[str, Any]] = {
    "adapter mse": {"reference": {"source": "adapter"}},
    "adapter kl": {"penalty": {"form": "kl"}, "reference": {"source": "adapter"}},
    "model mse": {"reference": {"source": "model"}},
    "cache mse": {"reference": {"source": "cache"}},
    # The step-cost benchmark's anchors modes, so a setting checked here is the one timed there.
    "anchors separate mse": mode_sections("str-anchors-mse"),
    "anchors folded mse": mode_sections("str-anchors-folded"),
    "anchors folded kl, openings 4, benign": mode_sections("str-anchors-folded-kl-open4"),
}


def _under_sync_error(fn: Any) -> tuple[Any, str | None]:
    if not torch.cuda.is_available():
        return fn(), None  # the CPU run (tests/test_bench.py) checks the code path, not synchronization
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn(), None
    except RuntimeError as exc:
        return None, "".join(traceback.format_exception_only(type(exc), exc)).strip()[:400]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check(name: str, overrides: dict[str, Any], workdir: Path, device_name: str = "cuda") -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from str_hooks import build_reference_cache, register_str_hook
    from str_hooks.driver import HostNormalization, StepDriver

    torch.manual_seed(0)
    device = torch.device(device_name)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    tokens = stub_tokens(range(100, 132))
    tokenizer = StubTokenizer(32000, 24)
    batches = []
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(16, 32000, (4, 256), generator=gen)
        mask = torch.ones_like(input_ids)
        mask[:, 200 + 20 * seed :] = 0  # right padding
        labels = input_ids.masked_fill(mask == 0, -100)
        labels[:, :64] = -100
        batches.append(
            {
                "input_ids": input_ids.to(device),
                "attention_mask": mask.to(device),
                "labels": labels.to(device),
            }
        )
    cfg: dict[str, Any] = {"coef": 1.0, "verify_projection": False, **json.loads(json.dumps(overrides))}
    reference_model = None
    if cfg["reference"]["source"] == "cache":
        sequences = [
            {"input_ids": b["input_ids"][r].cpu(), "attention_mask": b["attention_mask"][r].cpu()}
            for b in batches
            for r in range(4)
        ]
        cfg["reference"]["cache_path"] = str(
            build_reference_cache(model, tokens, sequences, workdir / "c.safetensors", progress=False)
        )
    if cfg["reference"]["source"] == "model":
        reference_model = (
            AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).requires_grad_(False).eval()
        )
    if cfg["reference"]["source"] == "anchors":
        anchors = workdir / "anchors.txt"
        anchors.write_text("\n".join(f"anchor prompt {i}" for i in range(32)) + "\n")
        cfg["reference"]["anchors_path"] = str(anchors)
        if cfg["reference"].get("benign_weight"):
            benign = workdir / "benign.txt"
            benign.write_text("\n".join(f"benign prompt {i}" for i in range(32)) + "\n")
            cfg["reference"]["benign_anchors_path"] = str(benign)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    result: dict[str, Any] = {"setting": name}
    with register_str_hook(
        model, cfg, tokens=tokens, tokenizer=tokenizer, reference_model=reference_model
    ) as handle:
        driver = StepDriver(handle)
        normalization = HostNormalization(accumulation_steps=2, host_divides_by=2)
        for step in range(3):
            checked = step == 2
            for batch in batches:
                if checked:
                    prepared, error = _under_sync_error(lambda b=batch: driver.prepare_batch(b))
                    result.setdefault("prepare_batch", error)
                    if error is not None:
                        prepared = driver.prepare_batch(batch)
                else:
                    prepared = driver.prepare_batch(batch)
                out = model(**{"use_cache": False, **prepared})
                if checked:
                    term, error = _under_sync_error(lambda: driver.penalty(normalization))
                    if error is not None:
                        result["penalty"] = error
                        return result
                else:
                    term = driver.penalty(normalization)
                (out.loss / 2 + term).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            driver.end_step()
        result["penalty"] = None
        result["logged"] = driver.log_metrics()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/results/gpu_sync_check")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in SETTINGS.items():
            workdir = Path(tmp) / name.replace(" ", "_").replace(",", "")
            workdir.mkdir()
            results.append(check(name, overrides, workdir))
            status = "free" if results[-1]["penalty"] is None else "SYNCS"
            print(
                f"{name}: penalty {status}; prepare_batch {'free' if results[-1].get('prepare_batch') is None else 'syncs'}",
                flush=True,
            )
    device = torch.cuda.get_device_name(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"device": device, "torch": torch.__version__, "results": results}, indent=2)
    )
    lines = [
        f"# Host synchronization on {device} (torch {torch.__version__})",
        "",
        "Command: `python bench/gpu_sync_check.py`. Under `torch.cuda.set_sync_debug_mode('error')`, third optimizer step.",
        "",
        "| setting | `StepDriver.penalty` (per micro-batch) | `prepare_batch` |",
        "|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['setting']} | {'no sync' if r['penalty'] is None else 'syncs: ' + r['penalty'].splitlines()[0]} | "
            f"{'no sync' if r.get('prepare_batch') is None else 'syncs: ' + str(r['prepare_batch']).splitlines()[0]} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["penalty"] is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
