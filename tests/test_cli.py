"""`str-hooks mine` and `str-hooks cache` on local model directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from factory import make_batch, make_model

from str_hooks import ReferenceCache, SafetyTokens, mine_safety_tokens
from str_hooks.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    path = tmp_path_factory.mktemp("aligned")
    make_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_mine_writes_the_same_tokens_as_the_api(model_dir: Path, tmp_path: Path, tokenizer: Any) -> None:
    out = tmp_path / "tokens.json"
    assert main(["mine", "--model", str(model_dir), "-k", "10", "--out", str(out)]) == 0
    assert SafetyTokens.load(out).ids == mine_safety_tokens(tokenizer, k=10).ids
    # No user file is overwritten without being asked.
    assert main(["mine", "--model", str(model_dir), "-k", "5", "--out", str(out)]) == 2
    assert len(SafetyTokens.load(out).ids) == 10


def test_cache_from_jsonl(
    model_dir: Path, tmp_path: Path, tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens_file = tmp_path / "tokens.json"
    mine_safety_tokens(tokenizer, k=8).save(tokens_file)
    batch = make_batch(tokenizer, n=3)
    data = tmp_path / "train.jsonl"
    with data.open("w") as fh:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            fh.write(json.dumps({"input_ids": ids[mask.bool()].tolist()}) + "\n")
    out = tmp_path / "ref.safetensors"
    args = [
        "cache",
        "--model",
        str(model_dir),
        "--tokens",
        str(tokens_file),
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert len(ReferenceCache(out)) == 3
    assert main([*args[:-2], "--column", "text", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no column 'text'" in capsys.readouterr().err
