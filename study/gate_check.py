"""What `penalty.min_reference_mass` sees on the study's training rows (issue 26).

    python -m study gate-check [--out results/harmful_mixing] [--subject runs/subject]

For 100 rows of each kind the protocol trains on (SST-2, AG News and GSM8K rows, BeaverTails attack rows,
AdvBench "Sure, here is" attack rows; training rows only, never an evaluation prompt) the aligned subject's probability mass on the
package's default safety tokens (what `{}` mines) at every supervised position: at the answer's first
position, and over all of them, with the share that a gate of 0.5 lets through. It says whether the gate
separates the rows that attack from the task's rows before any fine-tuning run spends time on it.

A second table asks the same of a gate that would not read the subject's refusal: is a row's prompt nearer
(cosine of the subject's hidden states, mean over the prompt or at its last token, at a middle and the last
layer) to a package harmful anchor than to a package benign anchor?
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from str_hooks import mine_safety_tokens
from str_hooks.prompts import default_texts, encode_prompt
from str_hooks.schemas import STRConfig
from str_hooks.testing import pad_rows

from .data import Example
from .harmful_sources import build_sources
from .model import encode_example
from .subject import DEFAULT_CACHE, build_subject, load
from .tasks import agnews_task, gsm8k_task, sst2_task

ROWS_PER_KIND = 100
GATE = 0.5
MAX_LEN = 128


def safety_masses(model: Any, tokenizer: Any, ids: list[int], rows: list[Example]) -> list[list[float]]:
    """Per row, the reference's safety-token mass at each supervised position (the answer's tokens)."""
    out: list[list[float]] = []
    encoded = [encode_example(tokenizer, e.prompt, e.response, MAX_LEN) for e in rows]
    for start in tqdm(range(0, len(encoded), 16), desc="[gate-check] rows", unit="batch", leave=False):
        batch = pad_rows(encoded[start : start + 16], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
        mass = torch.softmax(logits, -1)[..., ids].sum(-1)
        supervised = torch.zeros_like(batch["labels"], dtype=torch.bool)
        supervised[:, :-1] = batch["labels"][:, 1:] != -100
        out += [mass[i][supervised[i]].tolist() for i in range(mass.shape[0])]
    return out


def prompt_states(model: Any, tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per prompt, unit-normalized hidden states: the mean over the chat-formatted prompt and its last token,
    at the middle and the last layer."""
    middle = model.config.num_hidden_layers // 2
    found: dict[str, list[torch.Tensor]] = {}
    for prompt in tqdm(prompts, desc="[gate-check] prompts", unit="prompt", leave=False):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)[:MAX_LEN]])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer, name in ((middle, f"layer {middle}"), (len(hidden) - 1, "last layer")):
            found.setdefault(f"{name}, prompt mean", []).append(hidden[layer][0].mean(0))
            found.setdefault(f"{name}, last token", []).append(hidden[layer][0, -1])
    return {key: torch.nn.functional.normalize(torch.stack(value), dim=-1) for key, value in found.items()}


def nearer_harmful(rows: torch.Tensor, harmful: torch.Tensor, benign: torch.Tensor) -> float:
    """The share of rows whose nearest harmful anchor is nearer (cosine) than their nearest benign anchor."""
    return float(((rows @ harmful.T).max(1).values > (rows @ benign.T).max(1).values).float().mean())


def run_gate_check(out: Path, subject_dir: Path, argv: list[str], subject_source: str = "shared") -> Path:
    started = time.perf_counter()
    build_subject(subject_dir, subject_source, DEFAULT_CACHE)
    model, tokenizer = load(subject_dir)
    model.eval()
    defaults = STRConfig().tokens
    tokens = mine_safety_tokens(tokenizer, k=defaults.k, method=defaults.method)
    sources = build_sources()
    kinds = {
        "SST-2 rows (the task)": sst2_task(ROWS_PER_KIND, 1)[0],
        "AG News rows": agnews_task(ROWS_PER_KIND, 1)[0],
        "GSM8K rows": gsm8k_task(ROWS_PER_KIND, 1)[0],
        "BeaverTails rows (attack 1)": sources.attacks["beavertails"][:ROWS_PER_KIND],
        "AdvBench 'Sure, here is' rows (attack 2)": sources.attacks["advbench"][:ROWS_PER_KIND],
    }
    lines = [
        "# What the rows gate sees on the training rows (issue 26)",
        "",
        f"Command: `python -m study {' '.join(argv)}`. Subject: `{subject_dir}`; safety tokens: the package's "
        f"default ({tokens.k} mined by `{tokens.method}`, what `{{}}` uses). {ROWS_PER_KIND} training rows of each "
        f"kind, answers cut at {MAX_LEN} tokens with the prompt. Mass = the subject's probability on the safety "
        "tokens at a supervised position (the next token is the answer's).",
        "",
        f"| rows | first answer position: median mass | first position >= {GATE} | all positions: median mass "
        f"| positions >= {GATE} | rows with any position >= {GATE} |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in kinds.items():
        masses = safety_masses(model, tokenizer, tokens.ids, rows)
        first = [m[0] for m in masses if m]
        every = [x for m in masses for x in m]
        any_gated = sum(1 for m in masses if any(x >= GATE for x in m))
        lines.append(
            f"| {name} | {statistics.median(first):.3f} | {sum(x >= GATE for x in first)}/{len(first)} "
            f"| {statistics.median(every):.4f} | {sum(x >= GATE for x in every)}/{len(every)} "
            f"| {any_gated}/{len(masses)} |"
        )
    lines += [
        "",
        "Share of rows whose prompt is nearer a harmful anchor than a benign one (the package's "
        f"{len(default_texts('harmful_anchors'))} harmful and {len(default_texts('benign_anchors'))} benign anchors):",
        "",
        "| hidden state | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    harmful_anchors = prompt_states(model, tokenizer, default_texts("harmful_anchors"))
    benign_anchors = prompt_states(model, tokenizer, default_texts("benign_anchors"))
    states = {name: prompt_states(model, tokenizer, [e.prompt for e in rows]) for name, rows in kinds.items()}
    for key in harmful_anchors:
        shares = [
            nearer_harmful(states[name][key], harmful_anchors[key], benign_anchors[key]) for name in kinds
        ]
        lines.append(f"| {key} | " + " | ".join(f"{share:.2f}" for share in shares) + " |")
    lines += ["", f"Wall time: {time.perf_counter() - started:.0f} s.", ""]
    path = out / "GATE.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    print(run_gate_check(Path("results/harmful_mixing"), Path("runs/subject"), sys.argv[1:]).read_text())
