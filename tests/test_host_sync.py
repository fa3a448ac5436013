"""No host synchronization in the penalty path (docs/design.md section 3).

`helpers.syncs.no_host_sync` makes every op that would make the host wait for an accelerator raise (a device
value read on the host, data-dependent output sizes, host data copied to the device). Inside it: `loss()` for
every source, form and anchor placement, and the adapters' per-micro-batch calls through the HF Trainer, TRL's
SFTTrainer and Lightning. The values are the ones the equality tests check (unchanged code paths); here only
the absence of synchronization is checked, plus the device-side cache lookup against the host one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.factory import make_batch, make_lora, make_model
from helpers.hf import common_args, examples, make_trainer
from helpers.syncs import HostSyncError, no_host_sync

from str_hooks import build_reference_cache, register_str_hook
from str_hooks.cache import ReferenceCache
from str_hooks.device_index import sequence_keys
from str_hooks.driver import HostNormalization, StepDriver

SETTINGS = {
    "adapter": {"reference": {"source": "adapter"}},
    "adapter-first_n": {
        "penalty": {"positions": "first_n", "first_n": 2},
        "reference": {"source": "adapter"},
    },
    "model": {"reference": {"source": "model"}},
    "cache": {"reference": {"source": "cache"}},
    "anchors-separate": {"reference": {"source": "anchors", "anchor_batch_size": 3}},
    "anchors-rows": {"reference": {"source": "anchors", "anchor_batch_size": 3, "rows": "adapter"}},
    # Anchors sharing a long prompt prefix: the anchor step runs it once on a KV cache (str_hooks/prefix.py).
    "anchors-shared-prefix": {
        "reference": {"source": "anchors", "anchor_batch_size": 6, "share_anchor_prefix": "yes"}
    },
    # Folded without reading the batch on the host (`auto` does so on accelerators; on CPU it reads).
    "anchors-folded": {
        "reference": {
            "source": "anchors",
            "anchor_batch_size": 3,
            "anchor_placement": "folded",
            "fold_into_padding": "no",
        }
    },
    "anchors-folded-openings-benign": {
        "reference": {
            "source": "anchors",
            "anchor_batch_size": 3,
            "anchor_placement": "folded",
            "anchor_tokens": 3,
            "benign_weight": 0.5,
            "fold_into_padding": "no",
        }
    },
}


def build(
    setting: str, form: str, tmp_path: Path, tokenizer: Any, tokens: Any
) -> tuple[Any, dict[str, Any], Any]:
    """(model, config, reference model or None) for a setting, with its cache built when it needs one."""
    model = make_lora(make_model("llama"))
    cfg: dict[str, Any] = {"coef": 0.5, **{k: dict(v) for k, v in SETTINGS[setting].items()}}
    cfg["penalty"] = {**cfg.get("penalty", {}), "form": form}
    reference = None
    if setting == "model":
        reference = make_model("llama").requires_grad_(False)
    if setting == "anchors-shared-prefix":
        from test_prefix import OPENING, REQUESTS

        for key, requests in (
            ("anchors_path", REQUESTS),
            ("benign_anchors_path", ["bake bread", "fix a bike"]),
        ):
            path = tmp_path / f"{key}.txt"
            path.write_text("\n".join(OPENING + r for r in requests) + "\n")
            cfg["reference"][key] = str(path)
    if setting == "cache":
        rows = examples(tokenizer)
        path = build_reference_cache(
            model, tokens, [r["input_ids"] for r in rows], tmp_path / "c.safetensors", progress=False
        )
        cfg["reference"]["cache_path"] = str(path)
    return model, cfg, reference


# Every setting with mse and kl (the schema refuses kl with a cache: tested in test_config).
@pytest.mark.parametrize(
    ("setting", "form"),
    [
        (s, f)
        for s in SETTINGS
        for f in ("mse", "kl")
        if (s, f) not in (("cache", "kl"), ("anchors-rows", "mse"))
    ],
)
def test_loss_and_driver_never_synchronize(
    setting: str, form: str, tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    model, cfg, reference = build(setting, form, tmp_path, tokenizer, tokens)
    rows = examples(tokenizer)
    from helpers.hf import PadCollator

    batch = PadCollator(tokenizer.pad_token_id)(rows[:3])
    with register_str_hook(
        model, cfg, tokens=tokens, tokenizer=tokenizer, reference_model=reference
    ) as handle:
        driver = StepDriver(handle)
        if setting == "anchors-shared-prefix":
            assert handle.anchors is not None and handle.anchors.share_prefix
        for _step in range(2):  # the second step runs on what the first one built (steady state)
            for micro in range(2):
                with no_host_sync():
                    prepared = driver.prepare_batch(batch)
                out = model(**prepared)
                with no_host_sync():
                    term = driver.penalty(HostNormalization(accumulation_steps=2, host_divides_by=2))
                    total = out.loss + term
                total.backward()
                assert micro == 1 or driver.term_computed
            driver.end_step()
        logged = driver.log_metrics()
    assert logged["str/penalty"] > 0 and logged["str/skipped"] == 0.0


def test_the_detector_catches_what_it_must() -> None:
    x = torch.randn(4)
    for sync in (
        lambda: x.sum().item(),
        lambda: bool(x.sum() > 0),
        lambda: x[x > 0],
        lambda: x.tolist(),
        lambda: x.nonzero(),
        lambda: torch.tensor([1, 2]),
    ):
        with pytest.raises(HostSyncError), no_host_sync():
            sync()
    with no_host_sync():
        torch.where(x > 0, x, 0.0).sum()  # masked math is fine
        torch.tensor([])  # an empty host tensor moves no bytes (a KV cache layer's start)


@contextlib.contextmanager
def penalty_without_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every `StepDriver.prepare_batch` and `StepDriver.penalty` call (the adapters' per-micro-batch hooks)
    runs under `no_host_sync`; yields the list of penalty calls."""
    calls: list[int] = []
    original_penalty, original_prepare = StepDriver.penalty, StepDriver.prepare_batch

    def penalty(self: StepDriver, *args: Any, **kwargs: Any) -> torch.Tensor:
        with no_host_sync():
            value = original_penalty(self, *args, **kwargs)
        calls.append(1)
        return value

    def prepare_batch(self: StepDriver, *args: Any, **kwargs: Any) -> Any:
        with no_host_sync():
            return original_prepare(self, *args, **kwargs)

    monkeypatch.setattr(StepDriver, "penalty", penalty)
    monkeypatch.setattr(StepDriver, "prepare_batch", prepare_batch)
    yield calls


@pytest.mark.parametrize("kind", ["trainer", "sft"])
@pytest.mark.parametrize("setting", ["adapter", "cache", "anchors-separate", "anchors-folded"])
def test_hf_trainer_micro_batches_never_synchronize(
    kind: str, setting: str, tmp_path: Path, tokenizer: Any, tokens: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from str_hooks.integrations.hf import attach

    model, cfg, _ = build(setting, "mse", tmp_path, tokenizer, tokens)
    trainer = make_trainer(kind, model, tokenizer, examples(tokenizer), common_args(tmp_path, 2, 2, steps=2))
    attach(trainer, cfg, tokens=tokens, tokenizer=tokenizer)
    with penalty_without_sync(monkeypatch) as calls:
        trainer.train()
    assert len(calls) == 4
    logged = [e for e in trainer.state.log_history if "str/penalty" in e]
    assert logged and all(e["str/penalty"] > 0 for e in logged)


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
@pytest.mark.parametrize("setting", ["adapter", "anchors-separate", "anchors-folded"])
def test_lightning_micro_batches_never_synchronize(
    setting: str, tmp_path: Path, tokenizer: Any, tokens: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning.pytorch as L
    from lightning_ddp_worker import LitLM, collate, trainer_kwargs
    from lightning_ddp_worker import examples as lightning_examples
    from torch.utils.data import DataLoader

    from str_hooks.integrations.lightning import STRCallback

    _, cfg, _ = build(setting, "mse", tmp_path, tokenizer, tokens)
    trainer = L.Trainer(
        **trainer_kwargs(
            callbacks=[STRCallback(cfg, tokens=tokens, tokenizer=tokenizer)],
            accumulate_grad_batches=2,
            max_steps=2,
        )
    )
    with penalty_without_sync(monkeypatch) as calls:
        trainer.fit(LitLM(), DataLoader(lightning_examples(tokenizer), batch_size=2, collate_fn=collate))
    assert len(calls) == 4


def test_device_keys_ignore_padding_and_lookups_match_the_host(
    tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    right = torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    left = torch.tensor([[0, 5, 6, 7, 8]]), torch.tensor([[0, 1, 1, 1, 1]])
    key = sequence_keys(ids, None)
    assert torch.equal(sequence_keys(*right), key) and torch.equal(sequence_keys(*left), key)
    assert not torch.equal(sequence_keys(torch.tensor([[5, 6, 8, 7]]), None), key)
    model = make_lora(make_model("llama"))
    batch = make_batch(tokenizer, n=3)
    seqs = [row[mask.bool()] for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    cache = ReferenceCache(
        build_reference_cache(model, tokens, seqs, tmp_path / "c.safetensors", progress=False)
    )
    index = cache.device_index(torch.device("cpu"))
    assert index is not None
    with no_host_sync():
        on_device, found = index.lookup(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(on_device, cache.lookup(batch["input_ids"], batch["attention_mask"]))
    assert bool(found.all())
    assert index.read_missing() == 0


def test_the_row_screen_reads_one_count_per_micro_batch(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """`reference.screen_mass` is the documented exception (docs/host_sync.md): choosing the rows the reference
    forward runs on reads how many there are. The same setting without the screen never synchronizes (above)."""
    model, cfg, _ = build("anchors-rows", "kl", tmp_path, tokenizer, tokens)
    cfg["reference"]["screen_mass"] = 0.05
    from helpers.hf import PadCollator

    batch = PadCollator(tokenizer.pad_token_id)(examples(tokenizer)[:3])
    with register_str_hook(model, cfg, tokens=tokens, tokenizer=tokenizer) as handle:
        model(**batch)
        with pytest.raises(HostSyncError, match="nonzero"), no_host_sync():
            handle.loss()
