"""Reference cache: the aligned model's safety logits precomputed over a training set.

File format (safetensors, no pickle): `logits` [P, k] fp16 (every position of every example, concatenated),
`offsets` [n + 1] int64, `digests` [n, 16] uint8 (blake2b of each example's token ids), `keys` [n] int64
(device keys, `device_index.sequence_keys`: lookups without host synchronization; caches written before
they existed lack them and are looked up on the host), `token_ids` [k]; metadata: format name and version,
the model fingerprint and the safety tokens' tokenizer fingerprint.
An example is keyed by the hash of its token ids (padding removed), so the cache does not depend on the
batch order, the batch size or the padding side.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from str_hooks.device_index import DeviceIndex, sequence_keys
from str_hooks.errors import STRCacheError
from str_hooks.modules import ModuleSpec, full_shape, peft_model_of
from str_hooks.tap import ModelTap, eval_mode
from str_hooks.tokens import SafetyTokens

FORMAT_NAME = "str-hooks-reference-cache"
FORMAT_VERSION = "1"


def sequence_digest(ids: Sequence[int]) -> bytes:
    """16-byte key of one example: blake2b over its token ids as int64."""
    return hashlib.blake2b(array("q", [int(i) for i in ids]).tobytes(), digest_size=16).digest()


def model_fingerprint(tap: ModelTap) -> dict[str, Any]:
    """Identity of the model a cache was built with: architecture facts and checksums of the k head rows."""
    config = getattr(tap.causal_lm, "config", None)
    with torch.no_grad():
        rows, _ = tap.rows.rows()
        rows64 = rows.detach().to(torch.float64)
        return {
            "model_type": str(getattr(config, "model_type", type(tap.causal_lm).__name__)),
            "vocab_size": full_shape(tap.rows.weight)[0],
            "hidden_size": full_shape(tap.rows.weight)[1],
            "head_rows_abs_sum": float(rows64.abs().sum()),
            "head_rows_sum": float(rows64.sum()),
        }


def fingerprints_match(a: dict[str, Any], b: dict[str, Any], rtol: float = 1e-2) -> bool:
    for key in ("model_type", "vocab_size", "hidden_size"):
        if a.get(key) != b.get(key):
            return False
    # Checksums are compared loosely: a cache built in fp32 must match training in bf16.
    x, y = float(a["head_rows_abs_sum"]), float(b["head_rows_abs_sum"])
    return abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12)


def _as_ids(item: Any) -> list[int]:
    if isinstance(item, dict) or hasattr(item, "keys"):
        ids = item["input_ids"]
        mask = item.get("attention_mask") if hasattr(item, "get") else None
        ids_list = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if mask is not None:
            mask_list = mask.tolist() if hasattr(mask, "tolist") else list(mask)
            ids_list = [i for i, m in zip(ids_list, mask_list, strict=True) if m]
        return [int(i) for i in ids_list]
    if isinstance(item, torch.Tensor):
        return [int(i) for i in item.flatten().tolist()]
    return [int(i) for i in item]


def build_reference_cache(
    model: nn.Module,
    tokens: SafetyTokens,
    sequences: Iterable[Any],
    path: str | Path,
    *,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    pad_token_id: int = 0,
    decoder: ModuleSpec = None,
    head: ModuleSpec = None,
) -> Path:
    """Compute the reference safety logits of every example once and write them to `path`.

    Args:
        model: the aligned model (a PEFT model is run with its adapters disabled).
        tokens: the safety tokens the cache is for.
        sequences: token-id sequences: lists, 1-D tensors, or dicts with `input_ids` (and optional
            `attention_mask`, whose zeros are dropped).
        path: the `.safetensors` file to write.
        batch_size: examples per no-grad forward.
        overwrite: replace an existing file (otherwise an existing file is an error).
        progress: show a tqdm progress bar.
        pad_token_id: id used to right-pad batches (masked out, so any valid id works).
        decoder, head: overrides, as for `register_str_hook`.

    Returns:
        The path written.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        STRCacheError: no sequences, or an empty sequence.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise STRCacheError(f"`batch_size` must be >= 1, got {batch_size}.")
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"reference cache {str(target)!r} exists; pass overwrite=True to replace it.")
    tap = ModelTap(model, tokens.ids, decoder=decoder, head=head)
    peft = peft_model_of(model)
    adapters_off = peft.disable_adapter() if peft is not None else contextlib.nullcontext()  # type: ignore[operator]
    seen: dict[bytes, int] = {}
    keys: list[torch.Tensor] = []
    chunks: list[torch.Tensor] = []
    lengths: list[int] = []
    digests: list[bytes] = []
    total = len(sequences) if hasattr(sequences, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, desc="reference cache", unit="seq", disable=not progress)
    tap.attach()
    try:
        with adapters_off, torch.no_grad(), eval_mode(tap.causal_lm):
            fingerprint = model_fingerprint(tap)
            pending: list[list[int]] = []
            for item in sequences:
                ids = _as_ids(item)
                if not ids:
                    raise STRCacheError(
                        "an example has no tokens; drop empty examples before building the cache."
                    )
                key = sequence_digest(ids)
                bar.update(1)
                if key in seen:
                    continue
                seen[key] = len(digests)
                digests.append(key)
                keys.append(sequence_keys(torch.tensor([ids], dtype=torch.long), None))
                pending.append(ids)
                if len(pending) == batch_size:
                    _run_batch(tap, pending, pad_token_id, chunks, lengths)
                    pending = []
            if pending:
                _run_batch(tap, pending, pad_token_id, chunks, lengths)
    finally:
        tap.detach()
        bar.close()
    if not digests:
        raise STRCacheError("no sequences were given; pass the tokenized training examples.")
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), dim=0)
    tensors = {
        "logits": torch.cat(chunks, dim=0).contiguous(),
        "offsets": offsets,
        "digests": torch.tensor(list(b"".join(digests)), dtype=torch.uint8).view(-1, 16),
        "keys": torch.cat(keys),
        "token_ids": torch.tensor(tokens.ids, dtype=torch.long),
    }
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_fingerprint": json.dumps(fingerprint, sort_keys=True),
        "tokenizer_fingerprint": json.dumps(
            None if tokens.fingerprint is None else tokens.fingerprint.to_dict()
        ),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, target)
    return target


def _run_batch(
    tap: ModelTap, batch: list[list[int]], pad_token_id: int, chunks: list[torch.Tensor], lengths: list[int]
) -> None:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    device = tap.device()
    sink = tap.run(input_ids=input_ids.to(device), attention_mask=mask.to(device), **tap.lean_kwargs())
    assert sink.safety_logits is not None  # tap.run guarantees it
    logits = sink.safety_logits.to(torch.float16).cpu()
    for row, ids in enumerate(batch):
        chunks.append(logits[row, : len(ids)])
        lengths.append(len(ids))


class ReferenceCache:
    """A loaded reference cache: looks up the reference safety logits of a batch by example hash.

    Raises:
        STRCacheError: (on load) the file is missing, truncated, malformed, or not a str-hooks cache.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise STRCacheError(
                f"reference cache {str(self.path)!r} does not exist: build it with `str-hooks cache` or "
                "build_reference_cache(...)."
            )
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types for truncation and bad headers
            raise STRCacheError(
                f"reference cache {str(self.path)!r} cannot be read ({type(exc).__name__}: {exc}); it is "
                "truncated or not a safetensors file: rebuild it with `str-hooks cache`."
            ) from exc
        if metadata.get("format") != FORMAT_NAME:
            raise STRCacheError(
                f"{str(self.path)!r} is a safetensors file but not a str-hooks reference cache (metadata format "
                f"{metadata.get('format')!r}); build one with `str-hooks cache`."
            )
        if metadata.get("version") != FORMAT_VERSION:
            raise STRCacheError(
                f"reference cache {str(self.path)!r} has format version {metadata.get('version')!r}; this "
                f"str-hooks reads version {FORMAT_VERSION}: rebuild it."
            )
        missing = {"logits", "offsets", "digests", "token_ids"} - set(tensors)
        if missing:
            raise STRCacheError(
                f"reference cache {str(self.path)!r} lacks tensors {sorted(missing)}: rebuild it."
            )
        self.logits = tensors["logits"]
        self.offsets = tensors["offsets"]
        self.token_ids = [int(i) for i in tensors["token_ids"].tolist()]
        digests = tensors["digests"]
        n = digests.shape[0]
        if (
            self.logits.dim() != 2
            or self.logits.shape[1] != len(self.token_ids)
            or self.offsets.shape != (n + 1,)
            or int(self.offsets[-1]) != self.logits.shape[0]
            or bool((self.offsets[1:] < self.offsets[:-1]).any())
        ):
            raise STRCacheError(
                f"reference cache {str(self.path)!r} has inconsistent tensor shapes: rebuild it."
            )
        try:
            self.model_fingerprint: dict[str, Any] = json.loads(metadata["model_fingerprint"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise STRCacheError(
                f"reference cache {str(self.path)!r} has no readable model fingerprint."
            ) from exc
        self._index = {bytes(digests[i].tolist()): i for i in range(n)}
        keys = tensors.get("keys")
        if keys is not None and keys.shape != (n,):
            raise STRCacheError(
                f"reference cache {str(self.path)!r} has inconsistent tensor shapes: rebuild it."
            )
        self.keys = keys
        self._device_indexes: dict[str, DeviceIndex] = {}

    def device_index(self, device: torch.device) -> DeviceIndex | None:
        """The cache on `device` for lookups without host synchronization (copied there once), or None for a
        cache written without device keys."""
        if self.keys is None:
            return None
        index = self._device_indexes.get(str(device))
        if index is None:
            index = self._device_indexes[str(device)] = DeviceIndex(
                self.keys, self.offsets, self.logits, device
            )
        return index

    def read_missing(self) -> int:
        """Looked-up examples not in the cache since the last read, on every device (a host read)."""
        return sum(index.read_missing() for index in self._device_indexes.values())

    def __len__(self) -> int:
        return len(self._index)

    def check_compatible(self, token_ids: list[int], fingerprint: dict[str, Any]) -> None:
        """Raise unless the cache was built for these safety tokens and this model."""
        if token_ids != self.token_ids:
            raise STRCacheError(
                f"reference cache {str(self.path)!r} was built for safety tokens {self.token_ids[:8]}"
                f"{'...' if len(self.token_ids) > 8 else ''} (k={len(self.token_ids)}) but the hook uses "
                f"{token_ids[:8]}{'...' if len(token_ids) > 8 else ''} (k={len(token_ids)}): rebuild the cache "
                "with these tokens (`str-hooks cache --tokens FILE`)."
            )
        if not fingerprints_match(self.model_fingerprint, fingerprint):
            raise STRCacheError(
                f"reference cache {str(self.path)!r} was built for another model: cache {self.model_fingerprint} "
                f"vs this model {fingerprint}. Rebuild it from this model's aligned weights."
            )

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Reference safety logits [B, T, k] (float32, on the ids' device); padding positions are 0.

        Raises:
            STRCacheError: an example is not in the cache (never a silent zero).
        """
        batch, width = input_ids.shape
        out = torch.zeros((batch, width, len(self.token_ids)), dtype=torch.float32)
        ids_cpu = input_ids.detach().cpu()
        mask_cpu = None if attention_mask is None else attention_mask.detach().cpu().bool()
        for row in range(batch):
            keep = mask_cpu[row] if mask_cpu is not None else torch.ones(width, dtype=torch.bool)
            ids = ids_cpu[row][keep].tolist()
            index = self._index.get(sequence_digest(ids))
            if index is None:
                raise STRCacheError(
                    f"an example of {len(ids)} tokens (first ids {ids[:8]}) is not in reference cache "
                    f"{str(self.path)!r} ({len(self)} examples): the cache was built over other data or another "
                    "tokenization; rebuild it over this training set with `str-hooks cache`."
                )
            start, end = int(self.offsets[index]), int(self.offsets[index + 1])
            if end - start != len(ids):
                raise STRCacheError(f"reference cache {str(self.path)!r} entry {index} has the wrong length.")
            out[row, keep] = self.logits[start:end].float()
        return out.to(input_ids.device)
