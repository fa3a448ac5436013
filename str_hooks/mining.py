"""Safety-token mining: which tokens an aligned model uses when it refuses.

Methods (docs/design.md section 1):
- `frequency`: position-weighted frequency over refusal templates, minus tokens as common in benign text.
- `contrastive`: mean first-response log-prob on harmful prompts minus benign prompts, over template tokens.
- `list`: tokens the user names.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from str_hooks.errors import STRTokensError
from str_hooks.prompts import encode_prompt, encode_response, has_chat_template, resolve_texts
from str_hooks.schemas.tokens import TokensConfig
from str_hooks.tokens import SafetyTokens, tokenizer_fingerprint

MiningMethod = Literal["frequency", "contrastive", "list"]


def mine_safety_tokens(
    tokenizer: Any,
    templates: Sequence[str] | str | Path | None = None,
    k: int = 32,
    method: MiningMethod = "frequency",
    model: torch.nn.Module | None = None,
    harmful_prompts: Sequence[str] | str | Path | None = None,
    benign_prompts: Sequence[str] | str | Path | None = None,
    strings: Sequence[str | int] | None = None,
    benign_texts: Sequence[str] | str | Path | None = None,
    batch_size: int = 16,
) -> SafetyTokens:
    """Find the k tokens an aligned model uses when it refuses.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        templates: refusal templates: a list, a file (one per line or a JSON list), or None for the
            package's own defaults.
        k: number of tokens to keep (>= 1, at most the number of candidates).
        method: `frequency`, `contrastive` (needs `model`) or `list` (needs `strings`).
        model: the aligned causal LM, for `contrastive`.
        harmful_prompts: for `contrastive`; None uses the package's own harmful anchor prompts.
        benign_prompts: for `contrastive`; None uses the package's own benign prompts.
        strings: for `list`: token strings (each one token, with or without a leading space) or ids.
        benign_texts: for `frequency`: benign answers whose common tokens are dropped; None uses the
            package's own.
        batch_size: prompts per forward for `contrastive`.

    Returns:
        SafetyTokens with weights proportional to the scores, summing to 1.

    Raises:
        STRTokensError: empty templates, no usable token, k out of range, ids outside the vocabulary,
            a string that is not one token, or a missing model for `contrastive`.

    Example:
        >>> tokens = mine_safety_tokens(tokenizer, k=16)  # doctest: +SKIP
        >>> tokens.strings[:3]  # doctest: +SKIP
        ['Sorry', "'m", 'cannot']
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise STRTokensError(f"`k` must be a positive integer, got {k!r}: e.g. k=32.")
    if method == "list":
        if not strings:
            raise STRTokensError("method 'list' needs `strings` (token strings or ids), got none.")
        return _tokens_from_list(tokenizer, strings)
    template_texts = resolve_texts(templates, "refusal_templates", "refusal templates")
    candidates = _template_candidates(tokenizer, template_texts)
    if not candidates:
        raise STRTokensError(
            f"the {len(template_texts)} refusal templates yield no usable token (every token is special, "
            "punctuation or whitespace): give templates with words in them."
        )
    if method == "frequency":
        benign = resolve_texts(benign_texts, "benign_contrast", "benign texts")
        scores = _frequency_scores(tokenizer, template_texts, candidates, benign)
    elif method == "contrastive":
        if model is None:
            raise STRTokensError(
                "method 'contrastive' needs the aligned `model`; pass model=... or use 'frequency'."
            )
        harmful = resolve_texts(harmful_prompts, "harmful_anchors", "harmful prompts")
        benign_p = resolve_texts(benign_prompts, "benign_prompts", "benign prompts")
        scores = _contrastive_scores(model, tokenizer, candidates, harmful, benign_p, batch_size)
    else:
        raise STRTokensError(f"unknown mining method {method!r}: use 'frequency', 'contrastive' or 'list'.")
    positive = {tid: s for tid, s in scores.items() if s > 0}
    if k > len(positive):
        raise STRTokensError(
            f"k={k} but only {len(positive)} candidate tokens score above zero with method {method!r} "
            f"(from {len(template_texts)} templates): lower `k` to at most {len(positive)} or add templates."
        )
    ranked = sorted(positive.items(), key=lambda item: (-item[1], item[0]))[:k]
    total = sum(score for _, score in ranked)
    ids = [tid for tid, _ in ranked]
    return SafetyTokens(
        ids=ids,
        strings=[_token_string(tokenizer, tid) for tid in ids],
        weights=_normalized([score / total for _, score in ranked]),
        scores=[float(score) for _, score in ranked],
        method=method,
        fingerprint=tokenizer_fingerprint(tokenizer),
        metadata={"n_templates": len(template_texts), "n_candidates": len(candidates)},
    )


def mine_as_configured(
    tokenizer: Any,
    config: TokensConfig,
    model: torch.nn.Module | None = None,
    harmful_prompts: Sequence[str] | str | Path | None = None,
    benign_prompts: Sequence[str] | str | Path | None = None,
) -> SafetyTokens:
    """`mine_safety_tokens` as a `tokens` section says: the one path of `attach` and `str-hooks mine`, so the
    config and the command line mine alike and are checked by the same rules."""
    return mine_safety_tokens(
        tokenizer,
        templates=config.templates,
        k=config.k,
        method=config.method,
        model=model,
        harmful_prompts=harmful_prompts,
        benign_prompts=benign_prompts,
        strings=config.strings,
    )


def _normalized(weights: list[float]) -> list[float]:
    total = sum(weights)
    out = [w / total for w in weights]
    # Make the float sum exactly 1 up to rounding, so save/load round-trips pass the sum check.
    out[0] += 1.0 - sum(out)
    return out


def _token_string(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.convert_ids_to_tokens(int(token_id)))


def _excluded_ids(tokenizer: Any) -> set[int]:
    """Special tokens and chat-template scaffolding: never safety tokens."""
    excluded = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    for idx, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            excluded.add(int(idx))
    if has_chat_template(tokenizer):
        probe = "Hello"
        bare = set(tokenizer(probe, add_special_tokens=False)["input_ids"])
        excluded |= set(encode_prompt(tokenizer, probe)) - bare
    return excluded


def _is_word_token(tokenizer: Any, token_id: int) -> bool:
    text = tokenizer.decode([token_id])
    stripped = text.strip()
    if not stripped or "\ufffd" in stripped:
        return False
    return not all(unicodedata.category(ch)[0] in "PSZC" for ch in stripped)


def _template_candidates(tokenizer: Any, templates: list[str]) -> set[int]:
    excluded = _excluded_ids(tokenizer)
    seen: set[int] = set()
    for template in templates:
        for variant in encode_response(tokenizer, template):
            seen.update(variant)
    return {tid for tid in seen - excluded if _is_word_token(tokenizer, tid)}


def _frequency_scores(
    tokenizer: Any, templates: list[str], candidates: set[int], benign: list[str]
) -> dict[int, float]:
    # Refusals are decided in the first few tokens, so an occurrence at response position j weighs
    # 1 / (1 + j); each template counts once per token (its best variant).
    score: dict[int, float] = defaultdict(float)
    template_docs: dict[int, int] = defaultdict(int)
    for template in templates:
        best: dict[int, float] = {}
        for variant in encode_response(tokenizer, template):
            weights: dict[int, float] = defaultdict(float)
            for position, tid in enumerate(variant):
                if tid in candidates:
                    weights[tid] += 1.0 / (1.0 + position)
            for tid, weight in weights.items():
                best[tid] = max(best.get(tid, 0.0), weight)
        for tid, weight in best.items():
            score[tid] += weight / len(templates)
            template_docs[tid] += 1
    benign_docs: dict[int, int] = defaultdict(int)
    for text in benign:
        ids: set[int] = set()
        for variant in encode_response(tokenizer, text):
            ids.update(variant)
        for tid in ids & candidates:
            benign_docs[tid] += 1
    # Drop tokens that are at least as common in benign answers as in refusals (document frequency).
    return {
        tid: s
        for tid, s in score.items()
        if benign_docs.get(tid, 0) / max(len(benign), 1) < template_docs[tid] / len(templates)
    }


@torch.no_grad()
def _first_position_logprobs(
    model: torch.nn.Module, tokenizer: Any, prompts: list[str], batch_size: int
) -> torch.Tensor:
    """Mean over prompts of the log-softmax at the first response position, shape [V]."""
    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    was_training = model.training
    model.eval()
    total: torch.Tensor | None = None
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, e in enumerate(encoded):
                ids[row, : len(e)] = torch.tensor(e)
                mask[row, : len(e)] = 1
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
            last = (mask.sum(dim=1) - 1).to(device)
            logits = out.logits[torch.arange(len(encoded), device=device), last].float()
            batch_sum = torch.log_softmax(logits, dim=-1).sum(dim=0)
            total = batch_sum if total is None else total + batch_sum
    finally:
        model.train(was_training)
    assert total is not None  # prompts are non-empty (resolve_texts guarantees it)
    return total / len(prompts)


def _contrastive_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    candidates: set[int],
    harmful: list[str],
    benign: list[str],
    batch_size: int,
) -> dict[int, float]:
    harmful_lp = _first_position_logprobs(model, tokenizer, harmful, batch_size)
    benign_lp = _first_position_logprobs(model, tokenizer, benign, batch_size)
    diff = (harmful_lp - benign_lp).cpu()
    vocab = diff.shape[0]
    return {tid: float(diff[tid]) for tid in candidates if tid < vocab}


def _tokens_from_list(tokenizer: Any, strings: Sequence[str | int]) -> SafetyTokens:
    vocab_size = len(tokenizer)
    ids: list[int] = []
    for item in strings:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < vocab_size:
                raise STRTokensError(
                    f"token id {item} is outside the vocabulary (size {vocab_size}): use ids in [0, {vocab_size})."
                )
            found = [item]
        elif isinstance(item, str) and item.strip():
            found = []
            pieces: list[list[int]] = []
            for text in (item, " " + item.lstrip()):
                encoded = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
                pieces.append(encoded)
                if len(encoded) == 1:
                    found.append(encoded[0])
            if not found:
                raise STRTokensError(
                    f"string {item!r} is not one token in this tokenizer (it splits into "
                    f"{[tokenizer.convert_ids_to_tokens(p) for p in pieces]}): name single tokens or ids."
                )
        else:
            raise STRTokensError(f"`strings` entries must be non-empty strings or ids, got {item!r}.")
        for tid in found:
            if tid not in ids:
                ids.append(tid)
    weight = 1.0 / len(ids)
    return SafetyTokens(
        ids=ids,
        strings=[_token_string(tokenizer, tid) for tid in ids],
        weights=_normalized([weight] * len(ids)),
        scores=[1.0] * len(ids),
        method="list",
        fingerprint=tokenizer_fingerprint(tokenizer),
    )
