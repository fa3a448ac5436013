"""Shared pieces of the cost benchmarks: the live-bytes memory tracker, a stub tokenizer for random-init
models, the anchors settings the bench pins, machine facts, statistics and result files.

Not part of the installed package: the scripts beside this file import it by name (their own folder is
on `sys.path` when run as `python bench/<script>.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# PEFT calls a transformers method deprecated in v5 on every get_peft_model; not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
# Renamed in transformers 5.2x; the old name keeps working on the older transformers of GPU images.
warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)

MiB = 1024**2
GiB = 1024**3


class LiveBytes(TorchDispatchMode):
    """Peak of the bytes held by tensors allocated while the mode is active (CPU has no allocator peak).

    Every op goes through `__torch_dispatch__`; an output whose storage is not one of the op's inputs
    (so not a view or an in-place result) is a new allocation: its storage's bytes are added to the live
    count, and a weakref finalizer on the storage subtracts them when the storage is freed. Storages
    allocated before the mode (parameters, optimizer state) are never counted, so `peak` is the peak of
    what the tracked code allocated on top of them. Autograd's backward runs under the mode too (the
    engine propagates the dispatch-mode stack to its threads), and so does checkpoint recomputation.

    Costs one Python call per op: run it on separate, untimed steps.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.current

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and not t.is_meta
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            key = storage.data_ptr()
            if nbytes == 0 or key in inputs or key in self._live:
                continue
            self._live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class StubTokenizer:
    """Just enough of a tokenizer for anchor prompts on a random-init model of any vocabulary.

    Each text maps to `length` pseudo-random ids (a hash of the text seeds them), so every anchor prompt
    has exactly the length the cost anchors assume (docs/design.md section 4 used 8 x 128). There is no chat
    template: `encode_prompt` then tokenizes `text + "\\n"`, which this maps the same way.
    """

    def __init__(self, vocab_size: int, length: int, low: int = 16) -> None:
        self.vocab_size = vocab_size
        self.length = length
        self.low = low
        self.pad_token_id = 0
        self.chat_template = None
        self._vocab: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = {f"<t{i}>": i for i in range(self.vocab_size)}
        return self._vocab

    def encode(self, text: str) -> list[int]:
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        gen = torch.Generator().manual_seed(seed % (2**63))
        return torch.randint(self.low, self.vocab_size, (self.length,), generator=gen).tolist()

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return f"<t{int(token_id)}>"


def stub_tokens(ids: Sequence[int]) -> Any:
    """SafetyTokens for the given ids of a random-init model, weighted equally (names `<t{id}>`, as
    `StubTokenizer` spells them): what the bench scripts penalize instead of mined tokens."""
    from str_hooks import SafetyTokens

    return SafetyTokens(
        ids=list(ids),
        strings=[f"<t{i}>" for i in ids],
        weights=[1.0 / len(ids)] * len(ids),
        scores=[1.0] * len(ids),
        method="list",
    )


def pinned_anchors(form: str = "mse", **reference: Any) -> dict[str, Any]:
    """The `penalty` and `reference` sections of an anchors setting, `reference` overriding: every bench mode
    and check on anchors ran at the decision point alone (`anchor_tokens` 1, no benign anchors) with form mse
    unless it says otherwise, as before 4-token openings, benign anchors and the coarse KL became the package
    defaults. Pinned here, once, so a mode's name keeps meaning what its recorded results measured."""
    return {
        "penalty": {"form": form},
        "reference": {"source": "anchors", "anchor_tokens": 1, "benign_weight": 0.0, **reference},
    }


def machine_info(device: str) -> dict[str, Any]:
    import peft
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / GiB, 1)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def summarize(times: Sequence[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
    }


def output_stem(out: str) -> Path:
    """`bench/results/cpu` or `bench/results/cpu.json` -> `bench/results/cpu` (JSON and .md beside)."""
    path = Path(out)
    return path.with_suffix("") if path.suffix in (".json", ".md") else path


def check_writable(stem: Path, suffixes: Sequence[str], overwrite: bool) -> None:
    existing = [
        str(stem.with_name(stem.name + s)) for s in suffixes if stem.with_name(stem.name + s).exists()
    ]
    if existing and not overwrite:
        raise SystemExit(
            f"{', '.join(existing)} exist; pass --overwrite to replace them, or choose another --out."
        )


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
