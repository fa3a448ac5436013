"""`make demo`: a small end-to-end LoRA fine-tune with and without STR, on a tiny model built on the spot.

It shows the mechanics (the penalty, and how far the safety-token logits drift from the model before
fine-tuning), not refusal retention: the tiny model here is randomly initialized, not aligned. Uses only
the package's own texts. Needs the `hf` extra. Run: `python -m str_hooks.demo [--steps N]`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from str_hooks import mine_safety_tokens, register_str_hook
from str_hooks.prompts import default_texts, encode_prompt
from str_hooks.testing import make_lora, make_model, make_tokenizer


def _benign_batches(tokenizer: Any, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Benign prompt -> answer pairs from the package's own texts, prompt tokens masked."""
    prompts, answers = default_texts("benign_prompts"), default_texts("benign_contrast")
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    examples = []
    for i, answer in enumerate(answers):
        prompt_ids = encode_prompt(tokenizer, prompts[i % len(prompts)])
        answer_ids = [*tokenizer(answer, add_special_tokens=False)["input_ids"], end_id]
        examples.append((prompt_ids, answer_ids))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = [examples[j] for j in order[start : start + batch_size]]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (p, a) in enumerate(rows):
            ids[r, : len(p) + len(a)] = torch.tensor(p + a)
            mask[r, : len(p) + len(a)] = 1
            labels[r, len(p) : len(p) + len(a)] = torch.tensor(a)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


@torch.no_grad()
def _anchor_drift(model: Any, tokenizer: Any, ids: list[int]) -> float:
    """Mean |z - r| of the safety logits at the decision point of held-out harmful prompts, where z is
    the fine-tuned model and r the model before fine-tuning (adapters disabled)."""
    prompts = default_texts("harmful_anchors")[::4]
    model.eval()
    total = 0.0
    for prompt in prompts:
        x = torch.tensor([encode_prompt(tokenizer, prompt)])
        z = model(input_ids=x).logits[0, -1, ids]
        with model.disable_adapter():
            r = model(input_ids=x).logits[0, -1, ids]
        total += float((z - r).abs().mean())
    model.train()
    return total / len(prompts)


def run(steps: int, seed: int) -> list[dict[str, Any]]:
    tokenizer = make_tokenizer()
    tokens = mine_safety_tokens(tokenizer, k=16)
    print(f"safety tokens (frequency mining, k=16): {tokens.strings}")
    batches = _benign_batches(tokenizer, batch_size=8, seed=seed)
    configs: list[tuple[str, dict[str, Any] | None]] = [
        ("plain LoRA SFT", None),
        ("STR adapter mse coef 1", {"coef": 1.0, "reference": {"source": "adapter"}}),
        ("STR anchors mse coef 10", {"coef": 10.0, "reference": {"source": "anchors"}}),
    ]
    results = []
    for name, cfg in configs:
        model = make_lora(make_model("llama", seed=seed, hidden_size=64, intermediate_size=128), seed=seed)
        with torch.no_grad():  # start exactly at the "aligned" model: LoRA B = 0
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.zero_()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        # With coef 0 the hook still measures the drift on training positions, and adds nothing.
        handle = register_str_hook(
            model,
            cfg or {"coef": 0.0, "reference": {"source": "adapter"}},
            tokens=tokens,
            tokenizer=tokenizer,
        )
        model.train()
        start = time.perf_counter()
        ce = penalty = 0.0
        for step in range(steps):
            batch = batches[step % len(batches)]
            out = model(**batch)
            extra = handle.loss()
            (out.loss + extra).backward()
            optimizer.step()
            optimizer.zero_grad()
            handle.step()
            ce, penalty = float(out.loss.detach()), float(extra.detach())
            if step % max(steps // 4, 1) == 0 or step == steps - 1:
                m = handle.metrics()
                print(
                    f"  [{name}] step {step:3d}  CE {ce:.3f}  penalty {penalty:.4f}  "
                    f"|drift| {m.get('abs_drift', float('nan')):.3f}"
                )
        elapsed = (time.perf_counter() - start) / steps
        handle.remove()
        results.append(
            {
                "run": name,
                "final CE": ce,
                "final penalty": penalty,
                "anchor |drift|": _anchor_drift(model, tokenizer, tokens.ids),
                "s/step": elapsed,
            }
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    results = run(args.steps, args.seed)
    print()
    print(
        "| run | final CE | final penalty | safety-logit |drift| at harmful-prompt decision points | s/step |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['run']} | {r['final CE']:.3f} | {r['final penalty']:.4f} | {r['anchor |drift|']:.3f} | "
            f"{r['s/step']:.3f} |"
        )
    print(
        "\n|drift| = mean |z - r| over the safety tokens, z after fine-tuning, r before (adapters disabled)."
        "\nThe tiny model is random, not aligned: this shows the mechanics, not refusal retention."
    )


if __name__ == "__main__":
    main()
