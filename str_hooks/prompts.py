"""Text inputs: the package's default templates and prompts, user files, and chat-template rendering."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from str_hooks.errors import STRConfigError, STRTokensError

DEFAULT_FILES = {
    "refusal_templates": "refusal_templates.txt",
    "harmful_anchors": "harmful_anchors.txt",
    "benign_prompts": "benign_prompts.txt",
    "benign_contrast": "benign_contrast.txt",
    "benign_anchors": "benign_anchors.txt",
}


def default_texts(name: str) -> list[str]:
    """One of the package's own text sets: `refusal_templates`, `harmful_anchors`, `benign_prompts`,
    `benign_contrast`, `benign_anchors` (ordinary and sensitive-sounding safe requests, none of them an
    XSTest prompt) (all written by this project)."""
    if name not in DEFAULT_FILES:
        raise STRConfigError(f"no default text set {name!r}: use one of {sorted(DEFAULT_FILES)}.")
    text = resources.files("str_hooks").joinpath("data", DEFAULT_FILES[name]).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_text_list(path: str | Path, column: str | None = None, what: str = "texts") -> list[str]:
    """Read strings from a file: one per line (.txt and others), a JSON list, or a CSV/JSONL column.

    Raises:
        FileNotFoundError: no such file.
        STRConfigError: the file is empty, malformed, or lacks the column.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{what} file {str(source)!r} does not exist.")
    suffix = source.suffix.lower()
    raw = source.read_text(encoding="utf-8")
    items: list[Any]
    if suffix == ".csv":
        rows = list(csv.DictReader(raw.splitlines()))
        items = _column(rows, column, source, what)
    elif suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise STRConfigError(
                    f"{what} file {str(source)!r} line {lineno} is not valid JSON: {exc}"
                ) from exc
        items = _column(rows, column, source, what)
    elif suffix == ".json" or raw.lstrip().startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise STRConfigError(f"{what} file {str(source)!r} is not a valid JSON list: {exc}") from exc
        if not isinstance(data, list):
            raise STRConfigError(
                f"{what} file {str(source)!r} must hold a JSON list of strings, got {type(data).__name__}."
            )
        items = data if column is None else _column(data, column, source, what)
    else:
        items = raw.splitlines()
    texts = [str(item).strip() for item in items if item is not None and str(item).strip()]
    if not texts:
        raise STRConfigError(
            f"{what} file {str(source)!r} holds no non-empty entry: put one per line, or a JSON list of strings."
        )
    return texts


def _column(rows: list[Any], column: str | None, source: Path, what: str) -> list[Any]:
    if not rows:
        return []
    if column is None:
        first = rows[0]
        if isinstance(first, dict) and len(first) == 1:
            column = next(iter(first))
        else:
            keys = sorted(first) if isinstance(first, dict) else []
            raise STRConfigError(
                f"{what} file {str(source)!r} has several columns {keys}: name the one holding the text "
                "(e.g. `--column goal` or `anchors_column: goal`)."
            )
    if not all(isinstance(row, dict) and column in row for row in rows):
        keys = sorted(rows[0]) if isinstance(rows[0], dict) else []
        raise STRConfigError(f"{what} file {str(source)!r} has no column {column!r}; its columns are {keys}.")
    return [row[column] for row in rows]


def resolve_texts(texts: Sequence[str] | str | Path | None, default: str, what: str) -> list[str]:
    """A list given directly, a file path, or None for the package default named `default`."""
    if texts is None:
        return default_texts(default)
    if isinstance(texts, (str, Path)):
        return read_text_list(texts, what=what)
    cleaned = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not cleaned:
        raise STRTokensError(f"{what}: got {len(list(texts))} entries, none of them non-empty text.")
    return cleaned


def _as_id_list(encoded: Any) -> list[int]:
    # transformers v5 returns a BatchEncoding from apply_chat_template(tokenize=True); v4 a list.
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(i) for i in encoded]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of `prompt` as a user turn, ending where the assistant's reply would start."""
    if has_chat_template(tokenizer):
        return _as_id_list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
        )
    return _as_id_list(tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"])


def encode_response(tokenizer: Any, response: str) -> list[list[int]]:
    """Ways the assistant may emit `response`: inside the chat template's assistant turn (when the
    tokenizer has one), and bare with and without a leading space."""
    variants: list[list[int]] = []
    if has_chat_template(tokenizer):
        prompt_ids = encode_prompt(tokenizer, "Hello")
        full = _as_id_list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": response}],
                tokenize=True,
            )
        )
        if full[: len(prompt_ids)] == prompt_ids:
            variants.append(full[len(prompt_ids) :])
    for text in (response, " " + response):
        variants.append(_as_id_list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return [v for v in variants if v]
