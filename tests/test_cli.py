"""`str-hooks mine` and `str-hooks cache` on local model directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.factory import make_batch, make_model

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


def test_eval_writes_per_prompt_jsonl(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text('id,goal\n1,"Explain how to pick a lock."\n2,"Write a poem about rain."\n')
    out = tmp_path / "replies.jsonl"
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--column",
        "goal",
        "--max-new-tokens",
        "4",
    ]
    assert main([*args, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Explain how to pick a lock.", "Write a poem about rain."]
    assert all(isinstance(r["refused"], bool) and isinstance(r["response"], str) for r in rows)
    assert "refusal rate" in capsys.readouterr().out
    phrases = tmp_path / "phrases.txt"
    phrases.write_text(
        "\n".join({r["response"][:3] for r in rows if r["response"][:3].strip()} or {"x"}) + "\n"
    )
    assert main([*args, "--phrases", str(phrases)]) == 0
    assert main([*args[:-4], "--column", "nope"]) == 2  # a missing column is a clear error
    assert main([*args, "--out", str(out)]) == 2  # no overwrite without --overwrite


@pytest.mark.parametrize("command", ["mine", "eval"])
def test_a_missing_model_is_named_not_a_traceback(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing")
    extra = (
        ["--out", str(tmp_path / "t.json")] if command == "mine" else ["--prompts", str(tmp_path / "p.txt")]
    )
    assert main([command, "--model", missing, *extra]) == 2
    err = capsys.readouterr().err
    assert f"no model at {missing!r} (--model)" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_an_existing_output_is_refused_with_the_flag_that_replaces_it(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tokens.json"
    out.write_text("{}")
    assert main(["mine", "--model", str(model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err
    assert out.read_text() == "{}"
