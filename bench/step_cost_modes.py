"""The step-cost benchmark's modes: each mode's name, its one-line description (the report's "Modes:" list)
and what one step does (plain SFT, STR with each reference source and form, the naive gather from full
logits, KL-SFT). `make_mode(name)` is the table of their STR configs.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from typing import Any

import torch
from benchlib import GiB, fmt_bytes, pinned_anchors, storage_bytes
from step_cost_model import IGNORE, Bench
from torch import nn

MODES: dict[str, str] = {
    "plain": "LoRA SFT, cross-entropy only (the baseline).",
    "str-default": "the package defaults exactly as a user gets them: `register_str_hook(model, {})` "
    "(the shipped anchors and benign anchors, read through the bench's stub tokenizer).",
    "str-adapter-mse": "STR mse, reference = same model with adapters disabled (no-grad forward per step).",
    "str-adapter-hinge": "STR hinge (margin 0), adapter reference.",
    "str-model-mse": "STR mse, reference = a separate frozen copy of the base model (its bytes count).",
    "str-cache-mse": "STR mse, reference looked up in a prebuilt reference cache (no extra forward).",
    "str-anchors-mse": "STR mse on 8 anchor prompts, separate anchor forward+backward every step.",
    "str-anchors-mse-every8": "as str-anchors-mse, every 8th step (mean over 8-step blocks).",
    "str-logprob-adapter": "STR logprob (full-vocabulary log-softmax), adapter reference with full logits.",
    "gather-from-logits": "naive: out.logits[..., ids] at supervised positions, mse vs the same cache.",
    "kl-sft": "CE + full-vocabulary KL(p_ref || p_theta), reference = adapters disabled, no grad.",
    "str-anchors-folded": "STR mse, the 8 anchors of str-anchors-mse folded into the training forward "
    "(`reference.anchor_placement: folded`, packed segments before the rows, logits only for the training "
    "tokens), every step.",
    "str-anchors-folded-b2": "as str-anchors-folded with 2 anchors per step (`anchor_batch_size: 2`).",
    "str-anchors-folded-every8": "as str-anchors-folded, every 8th step (mean over 8-step blocks).",
    "str-anchors-folded-kl": "STR kl (coarse KL over the k safety tokens + rest) at the 8 folded anchors' "
    "decision points: the full softmax on [8, V] rows from their hidden states, none at training positions.",
    "str-anchors-folded-kl-open4": "as str-anchors-folded-kl with 4-token openings (`anchor_tokens: 4`, "
    "generated at attach, teacher-forced) and benign anchors (`benign_weight: 1`, half the set): [<=32, V].",
}
DEFAULT_MODES = list(MODES)


# -- modes -------------------------------------------------------------------------------------------
class Mode:
    """One objective. `enter`/`exit` attach and detach (untimed); `step` runs one optimizer step."""

    block = 1  # steps per timed repeat
    extra_tokens = 0.0  # share of extra tokens per step (folded anchors)

    def __init__(self, name: str) -> None:
        self.name = name
        self.skip: str | None = None

    def setup(self, b: Bench) -> None:
        return None

    def enter(self, b: Bench) -> None:
        return None

    def exit(self, b: Bench) -> None:
        return None

    def step(self, b: Bench) -> None:
        b.train_step(b.next_batch())

    def resident(self) -> list[torch.Tensor]:
        """Tensors this mode keeps between steps (reference copy, cache, anchor references)."""
        return []


class STRMode(Mode):
    def __init__(self, name: str, config: dict[str, Any], every: int = 1) -> None:
        super().__init__(name)
        self.config = config
        self.block = every
        self.handle: Any = None
        self.reference_model: nn.Module | None = None

    def source(self) -> str:
        from str_hooks import STRConfig

        # `{}` leaves the source to the schema's default; resolve it the way the package does.
        return str(STRConfig.model_validate(self.config).reference.source)

    def setup(self, b: Bench) -> None:
        if not self.config:
            return  # the defaults as shipped: nothing of the bench's own (anchor files) goes in
        source = self.config["reference"]["source"]
        if source == "cache":
            self.config["reference"]["cache_path"] = str(b.ensure_cache())
        if source == "anchors":
            reference = self.config["reference"]
            reference["anchors_path"] = str(b.anchors_path)
            if reference.get("benign_weight", 0) > 0:
                reference["benign_anchors_path"] = str(b.benign_anchors_path)
            if reference.get("anchor_placement") == "folded":
                # Folding adds a prefix to every row (every `anchor_every` steps): anchor j goes to row
                # j % B and shorter rows are padded to the longest prefix, so fewer anchors than rows pad.
                # An opening of n tokens adds its first n - 1 (teacher-forced) to the anchor.
                per_row = -(-reference["anchor_batch_size"] // b.shape.batch)
                anchor_len = b.shape.anchor_len + reference.get("anchor_tokens", 1) - 1
                self.extra_tokens = per_row * anchor_len / b.shape.seq / self.block
        if source == "model" and b.device.type == "cuda":
            param_bytes = storage_bytes(b.model.parameters())
            total = torch.cuda.get_device_properties(0).total_memory
            if 2 * param_bytes + 16 * GiB > total:
                self.skip = (
                    f"a second copy ({fmt_bytes(param_bytes)}) does not fit beside training on "
                    f"{fmt_bytes(total)}"
                )

    def enter(self, b: Bench) -> None:
        from str_hooks import register_str_hook

        source = self.source()
        if source == "model":
            # A frozen copy of the base weights (LoRA removed, not merged), made only while this mode runs
            # so its bytes count here and nowhere else. Copied before the hook exists (no hooks to copy).
            reference = copy.deepcopy(b.model).unload()
            reference.requires_grad_(False).eval()
            self.reference_model = reference
        self.handle = register_str_hook(
            b.model,
            self.config,
            tokens=b.tokens,
            tokenizer=b.tokenizer if source == "anchors" else None,
            reference_model=self.reference_model,
        )

    def exit(self, b: Bench) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.handle = None
        self.reference_model = None
        gc.collect()

    def step(self, b: Bench) -> None:
        handle = self.handle
        # A no-op unless `anchor_placement: folded` and an anchor step is due.
        b.train_step(handle.prepare_batch(b.next_batch()), lambda out: handle.loss())
        handle.step()

    def resident(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        if self.reference_model is not None:
            out += [*self.reference_model.parameters(), *self.reference_model.buffers()]
        handle = self.handle
        if handle is None:
            return out
        cache = getattr(handle.reference, "cache", None)
        if cache is not None:
            out += [cache.logits, cache.offsets]
        if handle.anchors is not None and handle.anchors.reference is not None:
            out.append(handle.anchors.reference)
        return out


class GatherMode(Mode):
    """The naive alternative: gather the k columns from the full logits the forward already built."""

    def setup(self, b: Bench) -> None:
        from str_hooks.cache import ReferenceCache

        self.cache = ReferenceCache(b.ensure_cache())
        self.ids = torch.tensor(b.tokens.ids, device=b.device)
        self.weights = torch.tensor(b.tokens.weights, device=b.device)

    def step(self, b: Bench) -> None:
        from str_hooks.penalty import supervised_mask, weighted_penalty_sum

        batch = b.next_batch()

        def penalty(out: Any) -> torch.Tensor:
            positions = supervised_mask(batch["labels"])
            reference = self.cache.lookup(batch["input_ids"], batch["attention_mask"])[positions]
            policy = out.logits[..., self.ids][positions]
            pen = weighted_penalty_sum(policy, reference, self.weights, "mse")
            return pen / positions.sum().clamp_min(1)

        b.train_step(batch, penalty)

    def resident(self) -> list[torch.Tensor]:
        return [self.cache.logits, self.cache.offsets]


class KLMode(Mode):
    """KL-regularized SFT: CE + KL(p_ref || p_theta) over the full vocabulary at supervised positions."""

    def step(self, b: Bench) -> None:
        batch = b.next_batch()
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

        def kl(out: Any) -> torch.Tensor:
            keep = batch["labels"][:, 1:] != IGNORE
            with torch.no_grad(), b.model.disable_adapter():
                ref = b.model(**inputs, use_cache=False).logits
                ref_logp = torch.log_softmax(ref[:, :-1][keep].float(), dim=-1)
                del ref
            logp = torch.log_softmax(out.logits[:, :-1][keep].float(), dim=-1)
            return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()

        b.train_step(batch, kl)


def make_mode(name: str) -> Mode:
    def cfg(source: str, form: str = "mse", **reference: Any) -> dict[str, Any]:
        sections = (
            pinned_anchors(form, **reference)
            if source == "anchors"
            else {"penalty": {"form": form}, "reference": {"source": source, **reference}}
        )
        return {"coef": 1.0, "verify_projection": False, **sections}

    table: dict[str, Callable[[], Mode]] = {
        "plain": lambda: Mode("plain"),
        "str-default": lambda: STRMode(name, {}),
        "str-adapter-mse": lambda: STRMode(name, cfg("adapter")),
        "str-adapter-hinge": lambda: STRMode(name, cfg("adapter", "hinge")),
        "str-model-mse": lambda: STRMode(name, cfg("model")),
        "str-cache-mse": lambda: STRMode(name, cfg("cache")),
        "str-anchors-mse": lambda: STRMode(name, cfg("anchors", anchor_batch_size=8)),
        "str-anchors-mse-every8": lambda: STRMode(
            name, cfg("anchors", anchor_batch_size=8, anchor_every=8), every=8
        ),
        "str-logprob-adapter": lambda: STRMode(name, cfg("adapter", "logprob")),
        "gather-from-logits": lambda: GatherMode(name),
        "kl-sft": lambda: KLMode(name),
        "str-anchors-folded": lambda: STRMode(
            name, cfg("anchors", anchor_batch_size=8, anchor_placement="folded")
        ),
        "str-anchors-folded-b2": lambda: STRMode(
            name, cfg("anchors", anchor_batch_size=2, anchor_placement="folded")
        ),
        "str-anchors-folded-every8": lambda: STRMode(
            name, cfg("anchors", anchor_batch_size=8, anchor_every=8, anchor_placement="folded"), every=8
        ),
        "str-anchors-folded-kl": lambda: STRMode(
            name, cfg("anchors", "kl", anchor_batch_size=8, anchor_placement="folded")
        ),
        "str-anchors-folded-kl-open4": lambda: STRMode(
            name,
            cfg(
                "anchors",
                "kl",
                anchor_batch_size=8,
                anchor_placement="folded",
                anchor_tokens=4,
                benign_weight=1.0,
            ),
        ),
    }
    return table[name]()
