"""Mining time for 1,000 refusal templates, and reference-cache build throughput versus a plain no-grad
forward of the same model over the same sequences (plus the cache's bytes per supervised token).

    python bench/mining_and_cache.py --out bench/results/mining_and_cache

CPU only, random-init model from config (no download); see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from benchlib import (
    check_writable,
    fmt_bytes,
    load_average,
    machine_info,
    markdown_table,
    output_stem,
    stub_tokens,
    write_json,
)

PREFIXES = ["", "I'm sorry, but ", "Sorry, ", "I apologize, but ", "Unfortunately, ", "As an AI, ", "No. "]
SUFFIXES = [
    "",
    " Is there anything else I can help you with?",
    " I hope you understand.",
    " Please ask me something else.",
    " Let me know if you have another question.",
]


def template_variants(n: int, seed: int = 0) -> list[str]:
    """`n` distinct refusal templates: the package's own, with varied openings and closings."""
    from str_hooks.prompts import default_texts

    base = default_texts("refusal_templates")
    combos = [p + t + s for t, p, s in itertools.product(base, PREFIXES, SUFFIXES)]
    unique = list(dict.fromkeys(combos))
    if n > len(unique):
        raise SystemExit(f"--n-templates {n}: only {len(unique)} distinct variants can be generated.")
    random.Random(seed).shuffle(unique)
    return unique[:n]


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times: list[float] = []
    result: Any = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def bench_mining(n_templates: int, repeats: int, k: int) -> dict[str, Any]:
    from str_hooks import mine_safety_tokens
    from str_hooks.testing import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    templates = template_variants(n_templates)
    out: dict[str, Any] = {
        "n_templates": n_templates,
        "tokenizer_vocab": len(tokenizer),
        "k": k,
        "methods": {},
    }
    freq_times, tokens = timed(lambda: mine_safety_tokens(tokenizer, templates=templates, k=k), repeats)
    out["methods"]["frequency"] = {
        "times_s": freq_times,
        "median_s": statistics.median(freq_times),
        "templates_per_s": n_templates / statistics.median(freq_times),
        "top_tokens": tokens.strings[:8],
    }
    model = make_model("llama", vocab_size=len(tokenizer)).eval()
    con_times, tokens = timed(
        lambda: mine_safety_tokens(tokenizer, templates=templates, k=k, method="contrastive", model=model),
        repeats,
    )
    out["methods"]["contrastive"] = {
        "times_s": con_times,
        "median_s": statistics.median(con_times),
        "templates_per_s": n_templates / statistics.median(con_times),
        "model": "tiny random Llama (str_hooks.testing.make_model), package default harmful/benign prompts",
    }
    return out


def make_sequences(n: int, length: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) pairs of lengths length/2..length; the first 1/8..1/2 of each is a masked prompt."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        size = int(torch.randint(length // 2, length + 1, (1,), generator=gen))
        ids = torch.randint(16, vocab, (size,), generator=gen).tolist()
        prompt = int(torch.randint(size // 8, size // 2, (1,), generator=gen))
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def padded_batches(
    sequences: Sequence[list[int]], batch_size: int, pad: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same right-padded batches `build_reference_cache` runs."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        batches.append((ids, mask))
    return batches


def bench_cache(args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from step_cost_model import SHAPES, model_config
    from transformers import AutoModelForCausalLM

    from str_hooks import build_reference_cache
    from str_hooks.cache import ReferenceCache, sequence_digest
    from str_hooks.penalty import supervised_mask

    shape = SHAPES[args.shape]
    vocab = args.vocab or shape.vocab
    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_config(model_config(shape, vocab), attn_implementation="sdpa")
    model: Any = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = (torch.randperm(vocab - 16, generator=gen)[: args.k] + 16).tolist()
    tokens = stub_tokens(ids)
    pairs = make_sequences(args.sequences, args.length, vocab, args.seed)
    sequences = [p[0] for p in pairs]
    batches = padded_batches(sequences, args.batch_size)
    n_tokens = sum(len(s) for s in sequences)

    def forward(keep_one: bool) -> None:
        with torch.no_grad(), model.disable_adapter():
            for ids_, mask in batches:
                model(input_ids=ids_, attention_mask=mask, **({"logits_to_keep": 1} if keep_one else {}))

    with tempfile.TemporaryDirectory(prefix="str-cache-bench-") as tmp:
        path = Path(tmp) / "ref.safetensors"

        def build() -> None:
            build_reference_cache(
                model, tokens, sequences, path, batch_size=args.batch_size, progress=False, overwrite=True
            )

        runners = {
            "cache build": build,
            "forward, full logits": lambda: forward(False),
            "forward, logits_to_keep=1": lambda: forward(True),
        }
        times: dict[str, list[float]] = {name: [] for name in runners}
        build()  # warm-up (also the file measured below)
        forward(False)
        from tqdm.auto import tqdm

        for r in tqdm(range(args.repeats), desc="cache vs forward", disable=args.no_progress):
            names = list(runners)
            names = names[r % len(names) :] + names[: r % len(names)]  # rotate: load drift hits all alike
            for name in names:
                start = time.perf_counter()
                runners[name]()
                times[name].append(time.perf_counter() - start)
        file_bytes = path.stat().st_size
        supervised = sum(int(supervised_mask(torch.tensor([labels])).sum()) for _, labels in pairs)
        cache = ReferenceCache(path)
        lookup_ids, lookup_mask = batches[0]
        lookup_times, _ = timed(lambda: cache.lookup(lookup_ids, lookup_mask), 20)
    long_ids = torch.randint(16, vocab, (2048,)).tolist()
    digest_times, _ = timed(lambda: sequence_digest(long_ids), 50)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "shape": shape.name,
        "hidden": shape.hidden,
        "layers": shape.layers,
        "vocab": vocab,
        "k": args.k,
        "sequences": len(sequences),
        "tokens": n_tokens,
        "batch_size": args.batch_size,
        "length": f"{args.length // 2}..{args.length}",
        "times_s": times,
        "median_s": median,
        "tokens_per_s": {name: n_tokens / m for name, m in median.items()},
        "sequences_per_s": {name: len(sequences) / m for name, m in median.items()},
        "throughput_ratio_vs_full_forward": median["forward, full logits"] / median["cache build"],
        "throughput_ratio_vs_keep1_forward": median["forward, logits_to_keep=1"] / median["cache build"],
        "file_bytes": file_bytes,
        "supervised_tokens": supervised,
        "bytes_per_supervised_token": file_bytes / supervised,
        "bytes_per_position": file_bytes / n_tokens,
        "lookup_ms_per_batch": 1e3 * statistics.median(lookup_times),
        "digest_ms_per_2048_ids": 1e3 * statistics.median(digest_times),
    }


def render_markdown(report: dict[str, Any]) -> str:
    meta, mining, cache = report["meta"], report["mining"], report["cache"]
    lines = [
        "# Mining time and reference-cache throughput",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['platform']}, {meta['processor']}, {meta['cpu_count']} CPUs; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peft {meta['peft']}, Python {meta['python']}; torch threads "
        f"{meta['torch_threads']}; {meta['date_utc']} UTC.",
        "",
        f"Load average (1, 5, 15 min) before: {report['load_before']}, after: {report['load_after']}.",
    ]
    if report.get("note"):
        lines += ["", report["note"]]
    lines += [
        "",
        f"## Mining ({mining['n_templates']} templates, k={mining['k']}, tokenizer vocab {mining['tokenizer_vocab']})",
        "",
        markdown_table(
            ["method", "median s", "min / max s", "templates/s"],
            [
                [
                    f"`{name}`",
                    f"{m['median_s']:.3f}",
                    f"{min(m['times_s']):.3f} / {max(m['times_s']):.3f}",
                    f"{m['templates_per_s']:.0f}",
                ]
                for name, m in mining["methods"].items()
            ],
        ),
        "",
        f"Top frequency tokens: {', '.join(repr(t) for t in mining['methods']['frequency']['top_tokens'])}.",
        "",
        f"## Reference cache vs a plain no-grad forward ({cache['shape']} shape: hidden {cache['hidden']}, "
        f"{cache['layers']} layers, vocab {cache['vocab']}; {cache['sequences']} sequences of "
        f"{cache['length']} tokens, batch {cache['batch_size']}, k={cache['k']})",
        "",
        markdown_table(
            ["pass", "median s", "min / max s", "sequences/s", "tokens/s", "cache build throughput / this"],
            [
                [
                    name,
                    f"{cache['median_s'][name]:.3f}",
                    f"{min(t):.3f} / {max(t):.3f}",
                    f"{cache['sequences_per_s'][name]:.1f}",
                    f"{cache['tokens_per_s'][name]:.0f}",
                    f"{cache['median_s'][name] / cache['median_s']['cache build']:.3f}",
                ]
                for name, t in cache["times_s"].items()
            ],
        ),
        "",
        f"File: {fmt_bytes(cache['file_bytes'])} for {cache['tokens']} positions "
        f"({cache['bytes_per_position']:.1f} B per position; fp16 x k = {2 * cache['k']} B plus a 16-byte "
        f"digest and an 8-byte offset per example), {cache['supervised_tokens']} supervised tokens: "
        f"**{cache['bytes_per_supervised_token']:.1f} B per supervised token**.",
        "",
        f"Lookup of one batch ({cache['batch_size']} examples) during training: {cache['lookup_ms_per_batch']:.2f} ms; "
        f"hashing one 2,048-token example: {cache['digest_ms_per_2048_ids']:.3f} ms.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-templates", type=int, default=1000)
    parser.add_argument("--mining-k", type=int, default=32)
    parser.add_argument("--shape", default="small", choices=["tiny", "small"])
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--length", type=int, default=256, help="longest sequence (shortest is half)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=None, help="output stem: writes STEM.json and STEM.md")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    stem = output_stem(args.out) if args.out else None
    if stem is not None:
        check_writable(stem, (".json", ".md"), args.overwrite)
    torch.set_num_threads(args.threads)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    load_before = load_average()
    mining = bench_mining(args.n_templates, args.repeats, args.mining_k)
    cache = bench_cache(args)
    report = {
        "meta": machine_info("cpu"),
        "load_before": load_before,
        "load_after": load_average(),
        "note": args.note,
        "args": vars(args),
        "mining": mining,
        "cache": cache,
    }
    if stem is not None:
        write_json(stem.with_name(stem.name + ".json"), report)
        stem.with_name(stem.name + ".md").write_text(render_markdown(report))
    else:
        print(render_markdown(report))
    return report


if __name__ == "__main__":
    main()
