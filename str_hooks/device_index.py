"""Reference-cache lookups on the training device, with no host synchronization.

The cache keys an example by a blake2b digest of its token ids, which only the host can compute: a lookup
per micro-batch would copy the batch's ids to the host and wait for the device. Caches built by this
version also store a *device key* per example, a pair of polynomial hashes of its unpadded ids modulo the
Mersenne prime 2^31 - 1 computed with tensor ops (`sequence_keys`), so that a batch's keys, the search in the
sorted key table, the length check and the gather of the [B, T, k] reference logits all run on the device.
An example that is not in the cache is not a silent zero: its rows are marked, the penalty leaves them out, and
the count is read once per optimizer step (`DeviceIndex.read_missing`), which raises.
"""

from __future__ import annotations

import torch


class DeviceCopies:
    """A constant host tensor, copied to each device that asks for it once and reused: a copy per micro-batch
    would be a host-to-device transfer, a synchronization point, every call."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host
        self._copies: dict[str, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = self.host.to(device)
        return copy


_MODULUS = 2_147_483_647  # 2^31 - 1: products of two residues fit in int64
_BASES = (1_000_003, 998_244_353)


def power_tables(size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """base^t mod M for t < size, one table per hash base, on `device` (built once: a host copy)."""
    tables = []
    for base in _BASES:
        values, power = [], 1
        for _ in range(max(size, 1)):
            values.append(power)
            power = power * base % _MODULUS
        tables.append(torch.tensor(values, dtype=torch.long).to(device))
    return tuple(tables)


def sequence_keys(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    tables: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """[B] int64 key of each row's unpadded ids (the positions where `attention_mask` is 1, in order, so
    left, right or no padding give the same key), computed on the ids' device with `tables`
    (`power_tables`; built for the batch's width when None). Rows longer than the tables get keys that
    match nothing."""
    ids = input_ids.long()
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if tables is None:
        tables = power_tables(ids.shape[1], ids.device)
    index = (mask.long().cumsum(dim=1) - 1).clamp(min=0, max=tables[0].shape[0] - 1)
    keys = []
    for table in tables:
        term = ((ids + 1) % _MODULUS) * table[index] % _MODULUS
        keys.append(torch.where(mask, term, 0).sum(dim=1) % _MODULUS)
    return keys[0] * _MODULUS + keys[1]


class DeviceIndex:
    """A reference cache's keys, offsets and logits on one device.

    Args:
        keys: [n] device keys of the cached examples (`sequence_keys` of each).
        offsets: [n + 1] start of each example in `logits`.
        logits: [P, k] every position of every example, concatenated.
        device: where lookups run.
    """

    def __init__(
        self, keys: torch.Tensor, offsets: torch.Tensor, logits: torch.Tensor, device: torch.device
    ) -> None:
        order = torch.argsort(keys)
        self.sorted_keys = keys[order].to(device)
        self.order = order.to(device)
        self.offsets = offsets.to(device)
        self.logits = logits.to(device)
        # Positions past the longest cached example never match, so the tables need no more.
        self.tables = power_tables(int((offsets[1:] - offsets[:-1]).max()), device)
        self._missing: torch.Tensor | None = None

    def lookup(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference safety logits [B, T, k] float32, [B] found): padding positions and the rows of examples
        not in the cache are 0 (the penalty leaves those rows out; `read_missing` counts them)."""
        batch, width = input_ids.shape
        mask = (
            torch.ones((batch, width), dtype=torch.bool, device=input_ids.device)
            if attention_mask is None
            else attention_mask.bool()
        )
        keys = sequence_keys(input_ids, mask, self.tables)
        slot = torch.searchsorted(self.sorted_keys, keys).clamp(max=self.sorted_keys.shape[0] - 1)
        example = self.order[slot]
        start, end = self.offsets[example], self.offsets[example + 1]
        lengths = mask.long().sum(dim=1)
        found = (self.sorted_keys[slot] == keys) & (end - start == lengths)
        index = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
        rows = (start.unsqueeze(1) + index).clamp(max=self.logits.shape[0] - 1)
        table = self.logits[rows].float()
        table = torch.where(mask.unsqueeze(-1), table, 0.0)
        table = torch.where(found.view(batch, 1, 1), table, 0.0)
        missing = (~found).sum()
        self._missing = missing if self._missing is None else self._missing + missing
        return table, found

    def read_missing(self) -> int:
        """Rows looked up but not found since the last read (a host read)."""
        if self._missing is None:
            return 0
        count, self._missing = int(self._missing), None
        return count
