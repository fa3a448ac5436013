"""Worker for the 2-process CPU (gloo) tests, launched with `python -m torch.distributed.run`.

Usage: dist_worker.py MODE OUTDIR, MODE one of
  trainer / sft : HF Trainer / TRL SFTTrainer under DDP, per-device batch 4, one SGD step (lr 1).
  fsdp2         : plain loop, `fully_shard` on every decoder layer and the root, full fine-tuning with a
                  frozen reference copy; the head is a sharded DTensor outside the forward.
  fsdp2_frozen_head : as fsdp2 but the head is frozen (rows read once from DTensor shards).
  trainer_folded / trainer_folded_decision : the HF Trainer with folded anchors (the second with the
                  coarse KL, 3-token openings and benign anchors).
  trainer_fsdp2 : the HF Trainer with accelerate's FSDP plugin (fsdp_version 2), full fine-tuning with a
                  frozen reference copy, one SGD step (lr 1).
  trainer_zero2 / trainer_zero3 / trainer_zero3_offload : the HF Trainer under DeepSpeed ZeRO-2 / ZeRO-3 /
                  ZeRO-3 with the optimizer state offloaded to CPU (DS_ACCELERATOR=cpu), LoRA, every parameter
                  partitioned under ZeRO-3 (the frozen head's safety rows gathered once).
  trainer_zero3_folded_decision / trainer_zero3_default : ZeRO-3 with folded decision-point anchors / `{}`.
  trainer_zero3_full_head : ZeRO-3, full fine-tuning (a trainable partitioned head): STR refuses it at train
                  begin; rank 0 writes the error to OUTDIR/error.txt.
Rank 0 writes the update / gradient of every trainable parameter to OUTDIR/result.safetensors.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from helpers.configs import training_positions
from helpers.hf import (
    COEF,
    PadCollator,
    anchor_config,
    common_args,
    examples,
    make_trainer,
    trainable_snapshot,
    zero_config,
)

from str_hooks import mine_safety_tokens, register_str_hook
from str_hooks.testing import make_lora, make_model, make_tokenizer

ZERO_MODES = (
    "trainer_zero2",
    "trainer_zero3",
    "trainer_zero3_offload",
    "trainer_zero3_folded_decision",
    "trainer_zero3_default",
    "trainer_zero3_full_head",
)
HF_MODES = ("trainer", "sft", "trainer_fsdp2", "trainer_folded", "trainer_folded_decision", *ZERO_MODES)


def hf_mode(mode: str, out: Path) -> None:

    from str_hooks.integrations.hf import attach

    tokenizer = make_tokenizer()
    tokens = mine_safety_tokens(tokenizer, k=12)
    rows = examples(tokenizer)
    reference = None
    # Training positions against the adapter (mse): the loss the one-process comparison writes by hand.
    cfg: dict[str, object] = training_positions({"coef": COEF})
    if mode == "trainer_fsdp2":
        model = make_model("llama")
        reference = copy.deepcopy(model).requires_grad_(False)
        torch.manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        cfg["reference"] = {"source": "model"}
    else:
        model = make_lora(make_model("llama"))
    if mode in ("trainer_folded", "trainer_folded_decision", "trainer_zero3_folded_decision"):
        # Every rank folds the same anchors into its first micro-batch; DDP averages identical terms.
        cfg = anchor_config("folded", decision_point=mode != "trainer_folded")
    if mode == "trainer_zero3_default":
        cfg = {}  # the package defaults, its own anchors, as a user attaches them
    if mode == "trainer_zero3_full_head":
        model = make_model("llama")  # full fine-tuning: the head is trainable and partitioned
        reference = copy.deepcopy(model).requires_grad_(False)
        cfg["reference"] = {"source": "model"}
    before = trainable_snapshot(model)
    args = common_args(out / "run", batch=4, ga=1, ddp_backend="gloo")
    if mode in ZERO_MODES:
        args.update(deepspeed=zero_config(3 if "zero3" in mode else 2, mode.endswith("_offload")))
    if mode == "trainer_fsdp2":
        args.update(
            fsdp="full_shard",
            fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        )
    kind = "sft" if mode == "sft" else "trainer"
    trainer = make_trainer(kind, model, tokenizer, rows, args)
    attach(trainer, cfg, tokens=None if cfg == {} else tokens, tokenizer=tokenizer, reference_model=reference)
    if mode == "trainer_zero3_full_head":
        from str_hooks.errors import STRAttachError

        try:
            trainer.train()
        except STRAttachError as error:  # expected, at train begin: written for the test to read
            if dist.get_rank() == 0:
                (out / "error.txt").write_text(str(error))
        dist.barrier()
        dist.destroy_process_group()
        return
    trainer.train()
    assert trainer.args.world_size == 2
    if mode in ZERO_MODES:
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            after = trainable_snapshot(model)
        if "zero3" in mode:  # the head really was partitioned, so the gathered-rows path ran
            assert model.base_model.model.lm_head.weight.numel() == 0
    else:
        after = {
            n: p.full_tensor() if hasattr(p, "full_tensor") else p
            for n, p in trainable_snapshot(model).items()
        }
    if dist.get_rank() == 0:
        save_file({n: (before[n] - after[n]).contiguous() for n in before}, str(out / "result.safetensors"))
        (out / "log.json").write_text(json.dumps(trainer.state.log_history[0]))
    # Leave together and close the group: a rank exiting while gloo threads still run can abort
    # ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def fsdp2_mode(mode: str, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = make_tokenizer()
    tokens = mine_safety_tokens(tokenizer, k=12)
    rows = examples(tokenizer)
    model = make_model("llama")
    reference = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if mode == "fsdp2_frozen_head":
        model.lm_head.weight.requires_grad_(False)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert type(model.lm_head.weight).__name__ == "DTensor"
    batch = PadCollator(tokenizer.pad_token_id)(rows)
    n_global = int((batch["labels"][:, 1:] != -100).sum())
    local = {k: v[rank * 4 : (rank + 1) * 4] for k, v in batch.items()}
    with register_str_hook(
        model,
        training_positions({"coef": COEF, "reference": {"source": "model"}}),
        tokens=tokens,
        reference_model=reference,
    ) as handle:
        model.train()
        logits_out = model(input_ids=local["input_ids"], attention_mask=local["attention_mask"])
        shifted = local["labels"][:, 1:]
        ce_sum = torch.nn.functional.cross_entropy(
            logits_out.logits[:, :-1].reshape(-1, logits_out.logits.shape[-1]).float(),
            shifted.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        # The forward got no labels (the CE is computed here), so hand them to the penalty.
        loss = ce_sum / n_global + handle.loss(num_items_in_batch=n_global, labels=local["labels"])
        # FSDP averages gradients over ranks; each rank's term is already a share of the global sum.
        (loss * world).backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            full = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = full.detach().clone().contiguous()
    if rank == 0:
        save_file(grads, str(out / "result.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    if mode in HF_MODES:
        hf_mode(mode, out)
    else:
        fsdp2_mode(mode, out)
    if os.environ.get("RANK", "0") == "0":
        print(f"{mode}: ok")
    # Results are written and the process group is closed: skip interpreter teardown, where gloo's
    # C++ threads sometimes abort the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
