"""`SafetyTokens`: the mined safety-token set, a small JSON artifact tied to one tokenizer."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from str_hooks.errors import STRTokensError

FORMAT_NAME = "str-hooks-safety-tokens"
FORMAT_VERSION = 1


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer str-hooks uses (duck-typed: the core imports no framework)."""

    def get_vocab(self) -> dict[str, int]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class TokenizerFingerprint:
    """Identifies a tokenizer: vocabulary size and a hash of its id -> token map."""

    vocab_size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "sha256": self.sha256}

    def __str__(self) -> str:
        return f"vocab_size={self.vocab_size}, sha256={self.sha256[:12]}"


def tokenizer_fingerprint(tokenizer: TokenizerLike) -> TokenizerFingerprint:
    """Fingerprint a tokenizer by its vocabulary size and the hash of its id -> token map."""
    vocab = tokenizer.get_vocab()
    by_id = sorted((int(idx), tok) for tok, idx in vocab.items())
    digest = hashlib.sha256(json.dumps(by_id, ensure_ascii=False).encode("utf-8")).hexdigest()
    return TokenizerFingerprint(vocab_size=len(tokenizer), sha256=digest)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spells each byte as a printable character (space as 'Ġ', newline as 'Ċ');
    this maps those characters back to their bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()


# Characters a metric key keeps as they are: the ones every common logger stores unchanged. MLflow accepts
# only letters, digits, `_`, `-`, `.`, ` ` and `/` (so not `'`), TensorBoard's tag cleaning keeps `[-/\w.]`,
# and W&B reads `/` as a section; `\w` would also take non-ASCII letters, which not every store indexes alike.
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
# `surrogateescape` decodes a byte that is not valid UTF-8 to U+DC80 + the byte: distinct bytes stay distinct.
_ESCAPED_BYTES = range(0xDC80, 0xDD00)


def _key_char(char: str) -> str:
    if char in _KEY_CHARS:
        return char
    if char == " ":
        return "_"
    code = ord(char)
    # Hex code point between hyphens: deterministic, in `_KEY_CHARS`, and readable as an escape.
    return f"-x{code - 0xDC00 if code in _ESCAPED_BYTES else code:02x}-"


def readable_token(piece: str) -> str:
    """A token as a person reads it in a metric key, in characters every logger stores (TensorBoard, W&B,
    MLflow): the text the tokenizer's piece stands for, with

    - a space written `_` ('ĠI' and '▁I', i.e. ' I', -> '_I'; 'I' -> 'I');
    - letters, digits, `_`, `-` and `.` as they are;
    - any other character as its code point in hex between hyphens (`'` -> '-x27-', '\\n' -> '-x0a-',
      '’' -> '-x2019-', '/' -> '-x2f-'), and a byte that is not valid UTF-8 as its value;
    - a name that is only `.` or `..` escaped too (MLflow reads it as a path).

    A pure function of `piece`. Distinct pieces can share a name ('_I' is also the piece '_I'):
    `SafetyTokens.readable_names` makes the names of one token set unique."""
    if piece and all(c in _BYTE_LEVEL for c in piece):
        text = bytes(_BYTE_LEVEL[c] for c in piece).decode("utf-8", errors="surrogateescape")
    else:
        text = piece.replace("\u2581", " ")
    if text in (".", ".."):
        return "".join(f"-x{ord(c):02x}-" for c in text)
    return "".join(_key_char(c) for c in text)


@dataclass(frozen=True)
class SafetyTokens:
    """The safety tokens of one model + tokenizer, with their weights.

    Args:
        ids: token ids, unique.
        strings: the token strings (as the tokenizer spells them), for reports.
        weights: non-negative weights that sum to 1.
        scores: the mining scores the weights came from (method-specific units).
        method: how they were found (`frequency`, `contrastive` or `list`).
        fingerprint: the tokenizer they belong to; None when unknown (ids given without a tokenizer).

    Raises:
        STRTokensError: lengths differ, ids repeat or are negative, weights are negative or do not sum to 1.
    """

    ids: list[int]
    strings: list[str]
    weights: list[float]
    scores: list[float]
    method: str
    fingerprint: TokenizerFingerprint | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def readable_names(self) -> list[str]:
        """One metric-key name per token (`drift/<name>`), as `readable_token` spells it: 'ĠSorry' ->
        '_Sorry', 'I' -> 'I', "'m" -> '-x27-m'. Unique within the set: tokens whose names are equal (or
        empty) all get `-<id>` appended ('_I-40', '_I-314'), repeated until none are equal. A pure function
        of the (string, id) pairs: the same names in every run and whatever the tokens' order."""
        names = [readable_token(s) for s in self.strings]
        # Every round appends each clashing token's own id (digits after a `-`), so two tokens that clashed
        # once never clash again: at most one round per pair of tokens, plus one for empty names, plus the
        # last check (a single round when no names are equal, as in every real token set).
        while True:
            counts = Counter(names)
            clashing = [i for i, name in enumerate(names) if counts[name] > 1 or not name]
            if not clashing:
                return names
            for i in clashing:
                names[i] = f"{names[i]}-{self.ids[i]}"

    def __post_init__(self) -> None:
        n = len(self.ids)
        if n == 0:
            raise STRTokensError("SafetyTokens needs at least one token id, got none.")
        for name in ("strings", "weights", "scores"):
            if len(getattr(self, name)) != n:
                raise STRTokensError(
                    f"SafetyTokens `{name}` has {len(getattr(self, name))} entries but `ids` has {n}."
                )
        if len(set(self.ids)) != n:
            raise STRTokensError(f"SafetyTokens `ids` repeat a token: {self.ids}.")
        if any((not isinstance(i, int)) or i < 0 for i in self.ids):
            raise STRTokensError(f"SafetyTokens `ids` must be non-negative integers, got {self.ids}.")
        if any((not math.isfinite(w)) or w < 0 for w in self.weights):
            raise STRTokensError(f"SafetyTokens `weights` must be finite and >= 0, got {self.weights}.")
        total = sum(self.weights)
        if abs(total - 1.0) > 1e-6:
            raise STRTokensError(
                f"SafetyTokens `weights` must sum to 1, got {total:.6g}: normalize them (w / sum(w))."
            )

    @property
    def k(self) -> int:
        return len(self.ids)

    def check_vocab(self, vocab_size: int, what: str = "the model") -> None:
        """Raise if an id is outside `[0, vocab_size)`."""
        bad = [i for i in self.ids if i >= vocab_size]
        if bad:
            raise STRTokensError(
                f"safety token ids {bad} are outside the vocabulary of {what} (size {vocab_size}): the tokens "
                "were mined for another tokenizer; mine them again with this model's tokenizer."
            )

    def check_tokenizer(self, tokenizer: TokenizerLike) -> None:
        """Raise if these tokens were mined with another tokenizer (compares fingerprints)."""
        current = tokenizer_fingerprint(tokenizer)
        self.check_vocab(current.vocab_size, "this tokenizer")
        if self.fingerprint is not None and self.fingerprint != current:
            raise STRTokensError(
                "these safety tokens were mined with another tokenizer: the file says "
                f"({self.fingerprint}) but this tokenizer is ({current}). Mine them again with "
                "`str-hooks mine` for this tokenizer."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "method": self.method,
            "ids": list(self.ids),
            "strings": list(self.strings),
            "weights": list(self.weights),
            "scores": list(self.scores),
            "tokenizer_fingerprint": None if self.fingerprint is None else self.fingerprint.to_dict(),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "the data") -> SafetyTokens:
        """Build from `to_dict()` output. Raises `STRTokensError` naming what is missing or wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise STRTokensError(
                f"{source} is not a str-hooks safety-token file (expected a JSON object with "
                f'"format": "{FORMAT_NAME}"); write one with SafetyTokens.save or `str-hooks mine`.'
            )
        if data.get("version") != FORMAT_VERSION:
            raise STRTokensError(
                f"{source} has safety-token format version {data.get('version')!r}; this str-hooks reads "
                f"version {FORMAT_VERSION}. Mine the tokens again with this version."
            )
        missing = [key for key in ("ids", "strings", "weights", "scores", "method") if key not in data]
        if missing:
            raise STRTokensError(
                f"{source} lacks the key(s) {missing}: the file is incomplete; mine it again."
            )
        fp = data.get("tokenizer_fingerprint")
        try:
            fingerprint = (
                None if fp is None else TokenizerFingerprint(int(fp["vocab_size"]), str(fp["sha256"]))
            )
            return cls(
                ids=[int(i) for i in data["ids"]],
                strings=[str(s) for s in data["strings"]],
                weights=[float(w) for w in data["weights"]],
                scores=[float(s) for s in data["scores"]],
                method=str(data["method"]),
                fingerprint=fingerprint,
                metadata=dict(data.get("metadata") or {}),
            )
        except (TypeError, KeyError, ValueError) as exc:
            if isinstance(exc, STRTokensError):
                raise
            raise STRTokensError(f"{source} has a malformed field: {exc}") from exc

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write as JSON. Refuses to replace an existing file unless `overwrite=True`."""
        target = Path(path)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{str(target)!r} exists; pass overwrite=True to replace it.")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | Path, tokenizer: TokenizerLike | None = None) -> SafetyTokens:
        """Read a JSON file written by `save`; with `tokenizer`, check that it is the one they were mined with.

        Raises:
            FileNotFoundError: no such file.
            STRTokensError: malformed or truncated JSON, or another tokenizer's tokens.
        """
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"safety-token file {str(source)!r} does not exist.")
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise STRTokensError(
                f"safety-token file {str(source)!r} is not valid JSON ({exc}); it may be truncated: mine it again."
            ) from exc
        tokens = cls.from_dict(data, source=f"safety-token file {str(source)!r}")
        if tokenizer is not None:
            tokens.check_tokenizer(tokenizer)
        return tokens
