"""`str-hooks` command line: `eval` (refusal rate), `mine` (safety tokens to JSON), `cache` (a reference
cache).

Both load a local model / tokenizer with transformers (the `hf` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from str_hooks.errors import STRError
from str_hooks.optional import require


def _local_dir(path: str, flag: str) -> str:
    """Every path flag takes a local directory; a missing one is named here, not 60 lines deep in a
    transformers traceback about hub repository ids."""
    if not Path(path).is_dir():
        found = "a file" if Path(path).exists() else "nothing"
        raise STRError(
            f"no model at {path!r} ({flag}): found {found} there; give the local directory that "
            "save_pretrained wrote."
        )
    return path


def _refuse_existing(out: str | None, overwrite: bool) -> None:
    """Checked before any model is loaded: no user file is replaced unless --overwrite says so."""
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it.")


def _load_tokenizer(path: str, flag: str) -> Any:
    transformers: Any = require("transformers", "hf")
    return transformers.AutoTokenizer.from_pretrained(_local_dir(path, flag))


def _load_model(path: str) -> Any:
    transformers: Any = require("transformers", "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(_local_dir(path, "--model"))
    return model.eval()


def _tokenizer_of(args: argparse.Namespace) -> Any:
    if args.tokenizer:
        return _load_tokenizer(args.tokenizer, "--tokenizer")
    return _load_tokenizer(args.model, "--model")


def _mine(args: argparse.Namespace) -> int:
    from str_hooks.mining import mine_as_configured
    from str_hooks.schemas.tokens import TokensConfig

    # The config's rules check the options (`-k 0`, `--method list` without `--strings`) before any loading.
    section = TokensConfig(method=args.method, k=args.k, templates=args.templates, strings=args.strings)
    _refuse_existing(args.out, args.overwrite)
    tokenizer = _tokenizer_of(args)
    model = _load_model(args.model) if args.method == "contrastive" else None
    tokens = mine_as_configured(
        tokenizer, section, model=model, harmful_prompts=args.harmful, benign_prompts=args.benign
    )
    tokens.save(args.out, overwrite=args.overwrite)
    width = max(len(repr(s)) for s in tokens.strings)
    print(f"{'token':<{width}}  {'id':>7}  {'weight':>8}  score")
    for tid, text, weight, score in zip(
        tokens.ids, tokens.strings, tokens.weights, tokens.scores, strict=True
    ):
        print(f"{text!r:<{width}}  {tid:>7}  {weight:8.4f}  {score:.4g}")
    print(f"wrote {tokens.k} safety tokens ({tokens.method}) to {args.out}")
    return 0


def _read_sequences(path: Path, column: str, tokenizer: Any) -> list[list[int]]:
    rows: list[Any] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise STRError(f"{path} line {lineno} is not valid JSON: {exc}") from exc
        if not isinstance(record, dict) or column not in record:
            raise STRError(f"{path} line {lineno} has no column {column!r}; pass --column NAME.")
        rows.append(record[column])
    sequences: list[list[int]] = []
    for value in rows:
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            sequences.append(value)
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            encoded = tokenizer.apply_chat_template(value, tokenize=True)
            ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
            sequences.append([int(i) for i in ids])
        elif isinstance(value, str):
            sequences.append([int(i) for i in tokenizer(value)["input_ids"]])
        else:
            raise STRError(
                f"column {column!r} must hold token ids, chat messages or text, got {type(value).__name__}."
            )
    return sequences


def _cache(args: argparse.Namespace) -> int:
    from str_hooks.cache import build_reference_cache
    from str_hooks.tokens import SafetyTokens

    _refuse_existing(args.out, args.overwrite)
    tokenizer = _tokenizer_of(args)
    tokens = SafetyTokens.load(args.tokens, tokenizer=tokenizer)
    model = _load_model(args.model)
    sequences = _read_sequences(Path(args.data), args.column, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    path = build_reference_cache(
        model,
        tokens,
        sequences,
        args.out,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        pad_token_id=pad,
    )
    print(f"wrote the reference cache of {len(sequences)} sequences to {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from str_hooks.probe import DEFAULT_REFUSAL_PHRASES, refusal_probe
    from str_hooks.prompts import read_text_list

    _refuse_existing(args.out, args.overwrite)
    tokenizer = _tokenizer_of(args)
    model = _load_model(args.model)
    if args.adapter:
        peft: Any = require("peft", "hf")
        model = peft.PeftModel.from_pretrained(model, _local_dir(args.adapter, "--adapter")).eval()
    prompts = read_text_list(args.prompts, column=args.column, what="prompts")
    if args.limit:
        prompts = prompts[: args.limit]
    phrases = (
        read_text_list(args.phrases, what="refusal phrases")
        if args.phrases
        else list(DEFAULT_REFUSAL_PHRASES)
    )
    out_path = Path(args.out) if args.out else None
    from tqdm.auto import tqdm

    responses: list[str] = []
    refused: list[bool] = []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="generating", unit="batch"):
        part = refusal_probe(
            model,
            tokenizer,
            prompts[start : start + args.batch_size],
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            phrases=phrases,
        )
        responses += part.responses
        refused += part.refused
    rate = sum(refused) / len(refused)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("w", encoding="utf-8") as fh:
            for prompt, response, flag in zip(prompts, responses, refused, strict=True):
                fh.write(json.dumps({"prompt": prompt, "response": response, "refused": flag}) + "\n")
    print(
        f"refusal rate {100 * rate:.1f} % ({sum(refused)}/{len(refused)}) on {args.prompts}; judge: "
        f"{len(phrases)} phrases, case-sensitive substring match; greedy, {args.max_new_tokens} new tokens"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="str-hooks", description="Safety Token Regularization tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser(
        "eval", help="refusal rate of a model on a prompt file (keyword-judged greedy replies)"
    )
    ev.add_argument("--model", required=True, help="local model directory")
    ev.add_argument("--tokenizer", help="local tokenizer directory (default: --model)")
    ev.add_argument("--adapter", help="a PEFT adapter directory to load on top of --model")
    ev.add_argument(
        "--prompts", required=True, help="prompts: .txt (one per line), .json list, .csv or .jsonl"
    )
    ev.add_argument("--column", help="column holding the prompt in a CSV/JSONL file")
    ev.add_argument("--phrases", help="refusal phrases file (default: the package's own list)")
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--limit", type=int, help="only the first N prompts")
    ev.add_argument("--out", help="per-prompt JSONL (prompt, response, refused)")
    ev.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ev.set_defaults(func=_eval)

    mine = sub.add_parser("mine", help="mine safety tokens and write them as JSON")
    mine.add_argument(
        "--model", required=True, help="local model directory (tokenizer too, unless --tokenizer)"
    )
    mine.add_argument("--tokenizer", help="local tokenizer directory (default: --model)")
    mine.add_argument("--method", choices=["frequency", "contrastive", "list"], default="frequency")
    mine.add_argument("-k", "--k", type=int, default=32, help="number of tokens (default 32)")
    mine.add_argument("--templates", help="refusal templates file (default: the package's own)")
    mine.add_argument("--harmful", help="harmful prompts file for contrastive (default: the package's own)")
    mine.add_argument("--benign", help="benign prompts file for contrastive (default: the package's own)")
    mine.add_argument("--strings", nargs="+", help="tokens for method list")
    mine.add_argument("--out", required=True, help="JSON file to write")
    mine.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    mine.set_defaults(func=_mine)

    cache = sub.add_parser("cache", help="precompute reference safety logits over a training set")
    cache.add_argument("--model", required=True, help="the aligned model's local directory")
    cache.add_argument("--tokenizer", help="local tokenizer directory (default: --model)")
    cache.add_argument("--tokens", required=True, help="safety tokens JSON from `str-hooks mine`")
    cache.add_argument(
        "--data",
        required=True,
        help="JSONL training set; examples are keyed by their exact token ids, so prefer pre-tokenized input_ids",
    )
    cache.add_argument("--column", default="input_ids", help="column with token ids, chat messages or text")
    cache.add_argument("--batch-size", type=int, default=8)
    cache.add_argument("--out", required=True, help=".safetensors file to write")
    cache.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    cache.set_defaults(func=_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (STRError, FileNotFoundError, FileExistsError) as exc:
        print(f"str-hooks {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
