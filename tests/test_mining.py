"""`mine_safety_tokens` against independent computations.

The helpers here never call str-hooks: response variants are built from the chat template's rendered
text (split as text, not as ids), word tokens are recognised with `str.isalnum`, and the contrastive
log-probs come from one unbatched forward per prompt.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.factory import make_model, make_tokenizer

from str_hooks.errors import STRConfigError, STRTokensError
from str_hooks.mining import mine_safety_tokens
from str_hooks.prompts import default_texts
from str_hooks.tokens import SafetyTokens

SCAFFOLDING = ("<|user|>", "<|assistant|>", "<|end|>")


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def chat_ids(encoded: Any) -> list[int]:
    """transformers v5 returns a BatchEncoding from apply_chat_template(tokenize=True), v4 a list."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def variants_by_hand(tokenizer: Any, response: str) -> list[list[int]]:
    """The response bare, with a leading space, and as the assistant turn (split on the rendered text)."""
    out = [ids_of(tokenizer, response), ids_of(tokenizer, " " + response)]
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
        )
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": response}], tokenize=False
        )
        assert full.startswith(prompt)
        out.append(ids_of(tokenizer, full[len(prompt) :]))
    return [v for v in out if v]


def scaffolding_by_hand(tokenizer: Any) -> set[int]:
    """Ids the chat template adds around a user turn, plus every special id."""
    out = {int(i) for i in tokenizer.all_special_ids}
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
        )
        out |= set(ids_of(tokenizer, prompt)) - set(ids_of(tokenizer, "Hello"))
    return out


def is_word(tokenizer: Any, token_id: int) -> bool:
    text = tokenizer.decode([token_id])
    return "\ufffd" not in text and any(ch.isalnum() for ch in text)


def candidates_by_hand(tokenizer: Any, templates: Sequence[str]) -> set[int]:
    seen = {tid for t in templates for v in variants_by_hand(tokenizer, t) for tid in v}
    return {tid for tid in seen - scaffolding_by_hand(tokenizer) if is_word(tokenizer, tid)}


def frequency_by_hand(tokenizer: Any, templates: Sequence[str], benign: Sequence[str]) -> dict[int, float]:
    """Position weight 1/(1+j), best variant per template, mean over templates; drop a token whose
    benign document frequency is not below its template document frequency."""
    candidates = candidates_by_hand(tokenizer, templates)
    score: dict[int, float] = {}
    template_df: dict[int, int] = {}
    for template in templates:
        best: dict[int, float] = {}
        for variant in variants_by_hand(tokenizer, template):
            per_variant: dict[int, float] = {}
            for j, tid in enumerate(variant):
                if tid in candidates:
                    per_variant[tid] = per_variant.get(tid, 0.0) + 1.0 / (1.0 + j)
            for tid, w in per_variant.items():
                best[tid] = max(best.get(tid, 0.0), w)
        for tid, w in best.items():
            score[tid] = score.get(tid, 0.0) + w / len(templates)
            template_df[tid] = template_df.get(tid, 0) + 1
    benign_sets = [{tid for v in variants_by_hand(tokenizer, text) for tid in v} for text in benign]
    benign_df = {tid: sum(tid in ids for ids in benign_sets) for tid in score}
    return {
        tid: s
        for tid, s in score.items()
        if s > 0 and benign_df[tid] / len(benign) < template_df[tid] / len(templates)
    }


def top_k(scores: dict[int, float], k: int) -> list[int]:
    return [tid for tid, _ in sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]]


def max_k(tokenizer: Any, **kwargs: Any) -> int:
    """The largest k mining accepts, read from the error a too-large k raises."""
    with pytest.raises(STRTokensError, match=r"at most (\d+)") as info:
        mine_safety_tokens(tokenizer, k=100_000, **kwargs)
    found = re.search(r"at most (\d+)", str(info.value))
    assert found is not None
    return int(found.group(1))


def assert_weights_follow_scores(tokens: SafetyTokens) -> None:
    assert all(w >= 0 for w in tokens.weights)
    assert sum(tokens.weights) == pytest.approx(1.0, abs=1e-12)
    total = sum(tokens.scores)
    for w, s in zip(tokens.weights, tokens.scores, strict=True):
        assert w == pytest.approx(s / total, rel=1e-9, abs=1e-15)
    assert all(a >= b for a, b in itertools.pairwise(tokens.scores))
    assert all(a >= b - 1e-15 for a, b in itertools.pairwise(tokens.weights))


# --- frequency ----------------------------------------------------------------------------------------


def test_frequency_matches_hand_computation_on_default_texts(tokenizer: Any) -> None:
    templates = default_texts("refusal_templates")
    expected = frequency_by_hand(tokenizer, templates, default_texts("benign_contrast"))
    assert len(expected) > 20
    mined = mine_safety_tokens(tokenizer, k=20)
    assert mined.ids == top_k(expected, 20)
    assert mined.scores == pytest.approx([expected[i] for i in mined.ids], rel=1e-12)
    assert mined.strings == tokenizer.convert_ids_to_tokens(mined.ids)
    assert mined.method == "frequency"
    assert mined.metadata["n_templates"] == len(templates)
    assert mined.metadata["n_candidates"] == len(candidates_by_hand(tokenizer, templates))
    assert_weights_follow_scores(mined)
    # Every positive-scoring token is reachable, and no more.
    assert max_k(tokenizer) == len(expected)


def test_frequency_tokens_occur_in_the_templates(tokenizer: Any) -> None:
    templates = default_texts("refusal_templates")
    mined = mine_safety_tokens(tokenizer, k=max_k(tokenizer))
    occurring = {tid for t in templates for tid in ids_of(tokenizer, t) + ids_of(tokenizer, " " + t)}
    assert set(mined.ids) <= occurring
    assert len(set(mined.ids)) == mined.k


def test_no_special_scaffolding_or_punctuation_token_is_chosen(tokenizer: Any) -> None:
    # Punctuation and scaffolding lead every template, so a miner that kept them would rank them first.
    templates = [
        "<|assistant|>!! I cannot help with that... <|end|>",
        "<|user|>?! (No) -- I will not help with this. </s>",
        "<s>... I cannot, sorry!! <|end|>",
        '"!?" I will not do that; no.',
    ]
    benign = ["Fine weather."]
    kwargs = {"templates": templates, "benign_texts": benign}
    mined = mine_safety_tokens(tokenizer, k=max_k(tokenizer, **kwargs), **kwargs)
    special = {int(i) for i in tokenizer.all_special_ids}
    scaffolding = {tokenizer.convert_tokens_to_ids(t) for t in SCAFFOLDING}
    assert scaffolding <= special | scaffolding and len(scaffolding) == 3
    # The templates really contain those tokens, so excluding them is the miner's doing.
    present = {tid for t in templates for tid in ids_of(tokenizer, t)}
    punctuation = {tid for tid in present if not any(ch.isalnum() for ch in tokenizer.decode([tid]))}
    assert scaffolding <= present and punctuation
    chosen = set(mined.ids)
    assert not chosen & special
    assert not chosen & scaffolding
    assert not chosen & punctuation
    for tid in mined.ids:
        text = tokenizer.decode([tid])
        assert text.strip() and any(ch.isalnum() for ch in text), repr(text)
    assert mined.ids == top_k(frequency_by_hand(tokenizer, templates, benign), mined.k)


def test_plain_text_chat_scaffolding_is_never_chosen() -> None:
    """A chat template whose scaffolding is ordinary words, not special tokens: the words it adds
    around a user turn are excluded even when a template starts with them."""
    tok = make_tokenizer(chat=False)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
        "{% else %}Reply: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Reply:{% endif %}"
    )
    templates = ["Reply: I cannot help with that.", "Question: I will not help with this."]
    benign = ["Fine weather."]
    scaffolding = scaffolding_by_hand(tok) - {int(i) for i in tok.all_special_ids}
    in_templates = {tid for t in templates for tid in ids_of(tok, t)}
    assert scaffolding & in_templates, "the test needs scaffolding ids inside the templates"
    kwargs = {"templates": templates, "benign_texts": benign}
    mined = mine_safety_tokens(tok, k=max_k(tok, **kwargs), **kwargs)
    assert not set(mined.ids) & scaffolding
    assert mined.ids == top_k(frequency_by_hand(tok, templates, benign), mined.k)


def test_first_position_token_outranks_a_late_one(tokenizer: Any) -> None:
    templates = [
        "I will not do this for you or your people",
        "I can not help with that for the people",
        "I refuse to do it and that is how it is for people",
    ]
    first, late = tokenizer.convert_tokens_to_ids("I"), tokenizer.convert_tokens_to_ids("Ġpeople")
    for t in templates:
        bare = ids_of(tokenizer, t)
        assert bare[0] == first and bare.count(first) == 1
        assert late in bare and bare.index(late) >= 5 and bare.count(late) == 1
    kwargs = {"templates": templates, "benign_texts": ["Fine weather."]}
    mined = mine_safety_tokens(tokenizer, k=max_k(tokenizer, **kwargs), **kwargs)
    score = dict(zip(mined.ids, mined.scores, strict=True))
    assert score[first] == pytest.approx(1.0)
    late_expected = sum(1.0 / (1 + ids_of(tokenizer, t).index(late)) for t in templates) / len(templates)
    assert score[late] == pytest.approx(late_expected)
    assert mined.ids.index(first) < mined.ids.index(late)
    weight = dict(zip(mined.ids, mined.weights, strict=True))
    assert weight[first] > weight[late]


def test_token_as_common_in_benign_texts_is_dropped(tokenizer: Any) -> None:
    the, with_ = tokenizer.convert_tokens_to_ids("Ġthe"), tokenizer.convert_tokens_to_ids("Ġwith")
    templates = ["I cannot help with the plan", "I will not go with the idea", "No, not with the rest"]
    shared = ["We walked to the park", "Put the kettle on", "Open the window"]
    rare = ["We walked to the park", "Put it on", "Open it"]  # " the" in 1 of 3 (templates: 3 of 3)
    for t in templates:
        assert the in ids_of(tokenizer, t) and with_ in ids_of(tokenizer, t)
    for text in shared:
        assert the in ids_of(tokenizer, text) and with_ not in ids_of(tokenizer, " " + text)

    def mine_all(benign: list[str]) -> SafetyTokens:
        kwargs = {"templates": templates, "benign_texts": benign}
        return mine_safety_tokens(tokenizer, k=max_k(tokenizer, **kwargs), **kwargs)

    dropped = mine_all(shared)
    assert the not in dropped.ids
    assert with_ in dropped.ids
    kept = mine_all(rare)
    assert the in kept.ids and with_ in kept.ids
    unrelated = mine_all(["Fine weather."])
    assert the in unrelated.ids
    assert set(dropped.ids) < set(unrelated.ids)
    assert dropped.ids == top_k(frequency_by_hand(tokenizer, templates, shared), dropped.k)


def test_templates_from_txt_and_json_files_equal_the_list(tokenizer: Any, tmp_path: Path) -> None:
    templates = default_texts("refusal_templates")[:12]
    txt = tmp_path / "templates.txt"
    txt.write_text("\n" + "\n\n".join(f"  {t}  " for t in templates) + "\n\n", encoding="utf-8")
    as_json = tmp_path / "templates.json"
    as_json.write_text(json.dumps(templates), encoding="utf-8")
    from_list = mine_safety_tokens(tokenizer, templates=templates, k=10)
    assert from_list.metadata["n_templates"] == 12
    assert mine_safety_tokens(tokenizer, templates=txt, k=10) == from_list
    assert mine_safety_tokens(tokenizer, templates=str(as_json), k=10) == from_list
    other = mine_safety_tokens(tokenizer, templates=default_texts("refusal_templates")[12:24], k=10)
    assert other != from_list


# --- contrastive --------------------------------------------------------------------------------------


def mean_first_response_logprobs(model: torch.nn.Module, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = chat_ids(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                )
            )
            assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            rows.append(torch.log_softmax(logits, dim=-1))
    return torch.stack(rows).mean(dim=0)


def test_contrastive_scores_are_harmful_minus_benign_logprobs(tokenizer: Any) -> None:
    model = make_model("llama")
    model.train()
    templates = default_texts("refusal_templates")
    harmful = default_texts("harmful_anchors")[:5]
    benign = default_texts("benign_prompts")[:7]
    mined = mine_safety_tokens(
        tokenizer,
        k=8,
        method="contrastive",
        model=model,
        harmful_prompts=harmful,
        benign_prompts=benign,
        batch_size=3,  # several right-padded batches, the last one partial
    )
    assert model.training, "mining must restore the model's training mode"
    model.eval()
    diff = mean_first_response_logprobs(model, tokenizer, harmful) - mean_first_response_logprobs(
        model, tokenizer, benign
    )
    candidates = candidates_by_hand(tokenizer, templates)
    assert mined.metadata["n_candidates"] == len(candidates)
    assert mined.method == "contrastive"
    assert set(mined.ids) <= candidates
    for tid, score in zip(mined.ids, mined.scores, strict=True):
        assert score == pytest.approx(float(diff[tid]), abs=1e-4)
        assert score > 0
    # The chosen ones are the best candidates: nothing left out scores above the lowest chosen.
    left_out = max(float(diff[tid]) for tid in candidates - set(mined.ids))
    assert min(float(diff[tid]) for tid in mined.ids) >= left_out - 1e-4
    expected = top_k({tid: float(diff[tid]) for tid in candidates}, 8)
    head = sorted((float(diff[t]) for t in candidates), reverse=True)[:9]
    assert min(a - b for a, b in itertools.pairwise(head)) > 1e-4, "near-tie: the order is moot"
    assert mined.ids == expected
    assert_weights_follow_scores(mined)


def test_contrastive_without_model_errors(tokenizer: Any) -> None:
    with pytest.raises(STRTokensError, match=r"'contrastive' needs the aligned `model`"):
        mine_safety_tokens(tokenizer, k=4, method="contrastive")


# --- list ---------------------------------------------------------------------------------------------


def test_list_with_strings_and_ids(tokenizer: Any) -> None:
    with_id = tokenizer.convert_tokens_to_ids("Ġwith")
    mined = mine_safety_tokens(tokenizer, method="list", strings=["help", with_id, " the", "I", " help"])
    # "help" is only one token with a leading space; "I" is one token both ways; repeats are dropped.
    expected = [tokenizer.convert_tokens_to_ids(t) for t in ("Ġhelp", "Ġwith", "Ġthe", "I", "ĠI")]
    assert len(ids_of(tokenizer, "help")) > 1
    assert mined.ids == expected
    assert mined.strings == ["Ġhelp", "Ġwith", "Ġthe", "I", "ĠI"]
    assert mined.weights == pytest.approx([0.2] * 5)
    assert sum(mined.weights) == pytest.approx(1.0, abs=1e-12)
    assert mined.method == "list"


@pytest.mark.parametrize("bad_id", [512, 10_000, -1])
def test_list_ids_outside_vocabulary(tokenizer: Any, bad_id: int) -> None:
    with pytest.raises(STRTokensError, match=rf"token id {bad_id} is outside the vocabulary \(size 512\)"):
        mine_safety_tokens(tokenizer, method="list", strings=[5, bad_id])


@pytest.mark.parametrize("text", ["Sorry", "cannot", "help me"])
def test_list_string_that_is_not_one_token(tokenizer: Any, text: str) -> None:
    assert len(ids_of(tokenizer, text)) > 1 and len(ids_of(tokenizer, " " + text)) > 1
    with pytest.raises(STRTokensError, match=rf"string {re.escape(repr(text))} is not one token"):
        mine_safety_tokens(tokenizer, method="list", strings=["I", text])


def test_list_without_strings(tokenizer: Any) -> None:
    with pytest.raises(STRTokensError, match=r"method 'list' needs `strings`"):
        mine_safety_tokens(tokenizer, method="list")


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("templates", [[], ["", "   ", "\n\t"]])
def test_empty_or_blank_template_list(tokenizer: Any, templates: list[str]) -> None:
    with pytest.raises(STRTokensError, match=rf"refusal templates: got {len(templates)} entries, none"):
        mine_safety_tokens(tokenizer, templates=templates, k=4)


@pytest.mark.parametrize("content", ["", "   \n\n\t \n"])
def test_empty_or_blank_template_file(tokenizer: Any, tmp_path: Path, content: str) -> None:
    path = tmp_path / "templates.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(
        STRConfigError, match=r"refusal templates file .*templates\.txt.* holds no non-empty entry"
    ):
        mine_safety_tokens(tokenizer, templates=path, k=4)


def test_missing_template_file(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        mine_safety_tokens(tokenizer, templates=tmp_path / "nope.txt", k=4)


def test_templates_with_no_usable_token(tokenizer: Any) -> None:
    with pytest.raises(STRTokensError, match=r"the 2 refusal templates yield no usable token"):
        mine_safety_tokens(tokenizer, templates=["!!! ... ???", "<|end|> -- ?!"], k=1)


@pytest.mark.parametrize("k", [0, -1])
def test_k_not_positive(tokenizer: Any, k: int) -> None:
    with pytest.raises(STRTokensError, match=rf"`k` must be a positive integer, got {k}"):
        mine_safety_tokens(tokenizer, k=k)


def test_k_larger_than_candidates_gives_the_max(tokenizer: Any) -> None:
    templates = ["I cannot help with that", "I will not help with this"]
    kwargs = {"templates": templates, "benign_texts": ["Fine weather."]}
    n = len(frequency_by_hand(tokenizer, templates, ["Fine weather."]))
    assert 0 < n < 20
    with pytest.raises(STRTokensError, match=rf"k={n + 1} but only {n} candidate.*at most {n}\b"):
        mine_safety_tokens(tokenizer, k=n + 1, **kwargs)
    assert mine_safety_tokens(tokenizer, k=n, **kwargs).k == n
