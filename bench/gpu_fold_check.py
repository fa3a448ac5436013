"""Is the folded-anchor check's failure on GPU bf16 numerical noise or leakage between packed segments?

`register_str_hook` with `anchor_placement: folded` compares an anchor folded in front of a prompt against
the two run separately (`str_hooks.attach._verify_folding`) and refuses past 2 % of max |logit| in bf16.
This attaches the same folded config to one random-init model of a bench shape in fp32 and in bf16, with
each attention implementation, and prints the error each reports (or "ok"). Leakage shows in fp32 too;
rounding noise shows in bf16 only. GPU only:

    python bench/gpu_fold_check.py --shape qwen2.5-1.5b --out bench/results/gpu_fold_check
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import StubTokenizer, pinned_anchors, stub_tokens
from step_cost_model import SHAPES, model_config


def check(shape_name: str, dtype: torch.dtype, attn: str, workdir: Path, device: str) -> str:
    from transformers import AutoModelForCausalLM

    from str_hooks import STRAttachError, register_str_hook

    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            model_config(shape, shape.vocab), dtype=dtype, attn_implementation=attn
        )
    anchors = workdir / "anchors.txt"
    anchors.write_text("\n".join(f"anchor prompt {i}" for i in range(8)) + "\n")
    config: dict[str, Any] = {
        "verify_projection": False,
        **pinned_anchors(anchors_path=str(anchors), anchor_placement="folded", anchor_batch_size=8),
    }
    tokens = stub_tokens(range(16, 80))
    try:
        handle = register_str_hook(
            model, config, tokens=tokens, tokenizer=StubTokenizer(shape.vocab, shape.anchor_len)
        )
        handle.remove()
        return "ok"
    except STRAttachError as exc:
        return str(exc).split(":")[0] + ": " + str(exc).split("changes the logits by ")[-1].split(":")[0]
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", nargs="+", default=["qwen2.5-1.5b"], choices=list(SHAPES))
    parser.add_argument("--attn", nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    rows = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shape:
            for dtype in (torch.float32, torch.bfloat16):
                for attn in args.attn:
                    result = check(shape, dtype, attn, Path(tmp), args.device)
                    rows.append({"shape": shape, "dtype": str(dtype), "attn": attn, "result": result})
                    print(rows[-1], flush=True)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
