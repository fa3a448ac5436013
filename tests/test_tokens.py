"""`SafetyTokens` files and tokenizer fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re
from pathlib import Path
from typing import Any

import pytest
from helpers.factory import make_tokenizer

from str_hooks.errors import STRTokensError
from str_hooks.tokens import SafetyTokens, TokenizerFingerprint, readable_token, tokenizer_fingerprint


@pytest.fixture(scope="module")
def other_tokenizer() -> Any:
    return make_tokenizer(vocab_size=400)


def fingerprint_by_hand(tokenizer: Any) -> TokenizerFingerprint:
    by_id = sorted((idx, tok) for tok, idx in tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(by_id, ensure_ascii=False).encode("utf-8")).hexdigest()
    return TokenizerFingerprint(vocab_size=len(tokenizer), sha256=digest)


def small_tokens(tokenizer: Any, ids: list[int]) -> SafetyTokens:
    raw = [float(len(ids) - i) for i in range(len(ids))]
    return SafetyTokens(
        ids=ids,
        strings=tokenizer.convert_ids_to_tokens(ids),
        weights=[r / sum(raw) for r in raw],
        scores=raw,
        method="list",
        fingerprint=tokenizer_fingerprint(tokenizer),
        metadata={"note": "ünïcode", "n": 3},
    )


def test_save_load_round_trip(tokenizer: Any, tokens: SafetyTokens, tmp_path: Path) -> None:
    path = tokens.save(tmp_path / "sub" / "tokens.json")
    assert path == tmp_path / "sub" / "tokens.json" and path.is_file()
    loaded = SafetyTokens.load(path)
    for f in dataclasses.fields(SafetyTokens):
        assert getattr(loaded, f.name) == getattr(tokens, f.name), f.name
    assert loaded == tokens
    assert SafetyTokens.load(path, tokenizer=tokenizer) == tokens
    assert json.loads(path.read_text(encoding="utf-8"))["tokenizer_fingerprint"] == {
        "vocab_size": 512,
        "sha256": fingerprint_by_hand(tokenizer).sha256,
    }


def test_round_trip_without_fingerprint_and_with_unicode(tokenizer: Any, tmp_path: Path) -> None:
    tokens = dataclasses.replace(small_tokens(tokenizer, [40, 7, 300]), fingerprint=None)
    loaded = SafetyTokens.load(tokens.save(tmp_path / "t.json"))
    assert loaded == tokens
    assert loaded.fingerprint is None and loaded.metadata == {"note": "ünïcode", "n": 3}
    assert loaded.k == 3


def test_fingerprint_is_stable_and_tells_tokenizers_apart(tokenizer: Any, other_tokenizer: Any) -> None:
    fp = tokenizer_fingerprint(tokenizer)
    assert fp == tokenizer_fingerprint(tokenizer)
    assert fp == tokenizer_fingerprint(make_tokenizer())  # a fresh instance of the same vocabulary
    assert fp == fingerprint_by_hand(tokenizer)
    other = tokenizer_fingerprint(other_tokenizer)
    assert other.vocab_size == 400 and fp.vocab_size == 512
    assert other.sha256 != fp.sha256 and other != fp
    assert len(fp.sha256) == 64 and int(fp.sha256, 16) >= 0


def test_fingerprint_differs_for_same_size_other_mapping(tokenizer: Any) -> None:
    """Same vocabulary size, two tokens swapped: the hash must change."""

    class Swapped:
        def __init__(self, base: Any) -> None:
            self.vocab = dict(base.get_vocab())
            a, b = "Ġthe", "Ġwith"
            self.vocab[a], self.vocab[b] = self.vocab[b], self.vocab[a]

        def get_vocab(self) -> dict[str, int]:
            return self.vocab

        def __len__(self) -> int:
            return len(self.vocab)

    swapped = tokenizer_fingerprint(Swapped(tokenizer))
    fp = tokenizer_fingerprint(tokenizer)
    assert swapped.vocab_size == fp.vocab_size
    assert swapped.sha256 != fp.sha256


def test_load_with_another_tokenizer_names_both_fingerprints(
    tokenizer: Any, other_tokenizer: Any, tmp_path: Path
) -> None:
    tokens = small_tokens(tokenizer, [40, 7, 300])  # ids inside both vocabularies
    path = tokens.save(tmp_path / "t.json")
    ours, theirs = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(other_tokenizer)
    with pytest.raises(STRTokensError, match=r"mined with another tokenizer") as info:
        SafetyTokens.load(path, tokenizer=other_tokenizer)
    message = str(info.value)
    assert str(ours) in message and str(theirs) in message
    assert ours.sha256[:12] in message and theirs.sha256[:12] in message
    assert "vocab_size=512" in message and "vocab_size=400" in message


def test_load_with_ids_outside_the_other_vocabulary(
    tokenizer: Any, other_tokenizer: Any, tmp_path: Path
) -> None:
    path = small_tokens(tokenizer, [40, 450, 511]).save(tmp_path / "t.json")
    with pytest.raises(STRTokensError, match=r"ids \[450, 511\] are outside the vocabulary .*size 400"):
        SafetyTokens.load(path, tokenizer=other_tokenizer)
    assert SafetyTokens.load(path, tokenizer=tokenizer).ids == [40, 450, 511]


def test_load_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"format": "str-hooks-safety-tokens", "ids": [1, 2,, 3]}', encoding="utf-8")
    with pytest.raises(STRTokensError, match=r"bad\.json.* is not valid JSON"):
        SafetyTokens.load(path)


def test_load_truncated_file(tokens: SafetyTokens, tmp_path: Path) -> None:
    full = tokens.save(tmp_path / "full.json").read_text(encoding="utf-8")
    path = tmp_path / "half.json"
    path.write_text(full[: len(full) // 2], encoding="utf-8")
    with pytest.raises(STRTokensError, match=r"half\.json.* is not valid JSON .*may be truncated"):
        SafetyTokens.load(path)


def test_load_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(STRTokensError, match=r"not valid JSON"):
        SafetyTokens.load(path)


@pytest.mark.parametrize(
    "data",
    [
        {"ids": [1], "weights": [1.0]},
        [1, 2, 3],
        {"format": "something-else", "version": 1},
        "str-hooks-safety-tokens",
    ],
    ids=["object-without-format", "list", "other-format", "string"],
)
def test_load_json_of_another_format(tmp_path: Path, data: Any) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(STRTokensError, match=r"other\.json.* is not a str-hooks safety-token file"):
        SafetyTokens.load(path)


def test_load_other_version_and_missing_keys(tokens: SafetyTokens, tmp_path: Path) -> None:
    data = tokens.to_dict()
    path = tmp_path / "t.json"
    path.write_text(json.dumps({**data, "version": 99}), encoding="utf-8")
    with pytest.raises(STRTokensError, match=r"format version 99"):
        SafetyTokens.load(path)
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "weights"}), encoding="utf-8")
    with pytest.raises(STRTokensError, match=r"lacks the key\(s\) \['weights'\]"):
        SafetyTokens.load(path)
    path.write_text(json.dumps({**data, "ids": "abc"}), encoding="utf-8")
    with pytest.raises(STRTokensError, match=r"malformed field"):
        SafetyTokens.load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        SafetyTokens.load(tmp_path / "nope.json")


def test_save_refuses_to_overwrite(tokenizer: Any, tokens: SafetyTokens, tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text("original content\n", encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"t\.json.* exists; pass overwrite=True"):
        tokens.save(path)
    assert path.read_text(encoding="utf-8") == "original content\n"
    tokens.save(path, overwrite=True)
    assert SafetyTokens.load(path) == tokens
    other = small_tokens(tokenizer, [40, 7, 300])
    with pytest.raises(FileExistsError):
        other.save(path)
    assert SafetyTokens.load(path) == tokens


def valid_fields() -> dict[str, Any]:
    return {
        "ids": [10, 20, 30],
        "strings": ["a", "b", "c"],
        "weights": [0.5, 0.3, 0.2],
        "scores": [5.0, 3.0, 2.0],
        "method": "frequency",
    }


def test_constructor_accepts_valid_fields() -> None:
    tokens = SafetyTokens(**valid_fields())
    assert tokens.k == 3 and tokens.fingerprint is None and tokens.metadata == {}


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"weights": [0.5, 0.3, 0.3]}, r"`weights` must sum to 1, got 1\.1"),
        ({"weights": [0.2, 0.2, 0.2]}, r"`weights` must sum to 1, got 0\.6"),
        ({"weights": [1.2, -0.4, 0.2]}, r"`weights` must be finite and >= 0, got \[1\.2, -0\.4, 0\.2\]"),
        ({"weights": [float("nan"), 0.5, 0.5]}, r"`weights` must be finite and >= 0"),
        ({"ids": [10, 20, 10]}, r"`ids` repeat a token: \[10, 20, 10\]"),
        ({"ids": [10, -2, 30]}, r"`ids` must be non-negative integers, got \[10, -2, 30\]"),
        ({"strings": ["a", "b"]}, r"`strings` has 2 entries but `ids` has 3"),
        ({"weights": [0.5, 0.5]}, r"`weights` has 2 entries but `ids` has 3"),
        ({"scores": [1.0, 2.0, 3.0, 4.0]}, r"`scores` has 4 entries but `ids` has 3"),
        (
            {"ids": [], "strings": [], "weights": [], "scores": []},
            r"needs at least one token id",
        ),
    ],
)
def test_constructor_validation(change: dict[str, Any], pattern: str) -> None:
    with pytest.raises(STRTokensError, match=pattern):
        SafetyTokens(**{**valid_fields(), **change})


@pytest.mark.parametrize("vocab_size", [30, 25, 11])
def test_check_vocab(vocab_size: int) -> None:
    tokens = SafetyTokens(**valid_fields())
    bad = [i for i in (10, 20, 30) if i >= vocab_size]
    pattern = re.escape(f"ids {bad} are outside the vocabulary of the model (size {vocab_size})")
    with pytest.raises(STRTokensError, match=pattern):
        tokens.check_vocab(vocab_size)
    tokens.check_vocab(31)


# What every logger stores unchanged: MLflow's name check (`^[/\w.\- ]*$`, and no `.`/`..` path segment)
# and TensorBoard's tag cleaning (`[^-/\w.]` replaced), in ASCII.
LOGGER_SAFE = re.compile(r"[A-Za-z0-9_.\-]+")


def logger_safe(name: str) -> bool:
    key = f"str/drift/{name}"
    return LOGGER_SAFE.fullmatch(name) is not None and posixpath.normpath(key) == key


def tokens_named(strings: list[str], ids: list[int]) -> SafetyTokens:
    return SafetyTokens(
        ids=ids, strings=strings, weights=[1 / len(ids)] * len(ids), scores=[1.0] * len(ids), method="list"
    )


@pytest.mark.parametrize(
    ("piece", "readable"),
    [
        ("I", "I"),  # a piece without a leading space reads as itself
        ("Sorry", "Sorry"),
        ("ĠSorry", "_Sorry"),  # byte-level BPE (GPT-2, Llama 3, SmolLM2): 'Ġ' is the space byte
        ("ĠI", "_I"),
        ("\u2581cannot", "_cannot"),  # SentencePiece (Llama 2, Gemma): '▁' is the space
        ("Ġ", "_"),
        ("can-not_x.y", "can-not_x.y"),  # letters, digits, `_`, `-`, `.` kept
        ("'m", "-x27-m"),  # MLflow rejects `'`
        ("âĢĻ", "-x2019-"),  # a multi-byte character spelled byte by byte: ’
        ("ĠÃ©", "_-xe9-"),  # é: non-ASCII, escaped
        ("\u2581你", "_-x4f60-"),
        ("Ċ", "-x0a-"),  # whitespace other than a space: escaped, never an empty name
        ("ĉĉ", "-x09--x09-"),
        ("Ġ/", "_-x2f-"),  # `/` would open a section (W&B) or a path (MLflow)
        ("âĢ", "-xe2--x80-"),  # bytes that are not valid UTF-8 alone: their values
        (".", "-x2e-"),  # MLflow reads 'drift/.' and 'drift/..' as paths
        ("..", "-x2e--x2e-"),
        ("...", "..."),
    ],
)
def test_tokens_are_named_as_they_read(piece: str, readable: str) -> None:
    assert readable_token(piece) == readable
    assert logger_safe(readable)


def test_colliding_pieces_get_their_ids() -> None:
    # ' I' and the literal '_I' read alike; 'I' does not collide with ' I'.
    tokens = tokens_named(["ĠI", "_I", "I", "ĠSorry"], [40, 314, 7, 9])
    assert tokens.readable_names == ["_I-40", "_I-314", "I", "_Sorry"]
    # A suffixed name that meets another token's own name is disambiguated again, by each one's id.
    tokens = tokens_named(["ĠI", "_I", "_I-40"], [40, 314, 5])
    assert tokens.readable_names == ["_I-40-40", "_I-314", "_I-40-5"]
    assert tokens_named(["", "a"], [3, 4]).readable_names == ["-3", "a"]


def test_every_piece_gets_a_unique_logger_safe_name(other_tokenizer: Any) -> None:
    # All 256 byte-level single-byte pieces (space and '_' collide, as do U+00E9 and a lone 0xE9 byte) and a
    # whole trained vocabulary.
    from tokenizers.pre_tokenizers import ByteLevel

    byte_pieces = sorted(ByteLevel.alphabet())
    vocab = sorted(other_tokenizer.get_vocab().items(), key=lambda item: item[1])
    for strings, ids in (
        (byte_pieces, list(range(len(byte_pieces)))),
        ([piece for piece, _ in vocab], [idx for _, idx in vocab]),
    ):
        names = tokens_named(strings, ids).readable_names
        assert len(set(names)) == len(names)
        assert all(logger_safe(name) for name in names), [n for n in names if not logger_safe(n)]


def test_names_are_a_function_of_the_tokens_not_their_order() -> None:
    strings, ids = ["ĠI", "_I", "I", "Ċ", "âĢĻ", "ĠSorry", "'m"], [40, 314, 7, 198, 447, 9, 1101]
    expected = {40: "_I-40", 314: "_I-314", 7: "I", 198: "-x0a-", 447: "-x2019-", 9: "_Sorry", 1101: "-x27-m"}
    for order in ([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [3, 1, 5, 0, 6, 2, 4]):
        tokens = tokens_named([strings[i] for i in order], [ids[i] for i in order])
        assert dict(zip(tokens.ids, tokens.readable_names, strict=True)) == expected
