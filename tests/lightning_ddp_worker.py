"""Lightning pieces shared by tests/test_lightning.py, and its 2-process DDP worker.

As a script, launched with `python -m torch.distributed.run --nproc_per_node 2 ... OUTDIR`: Lightning sees
the torchelastic environment and runs `strategy="ddp"` on 2 CPU processes (gloo), one optimizer step with
a micro-batch of 4 examples per rank (rank r gets rows r, r+2, ...), for two orderings of the same 8
examples (`ORDERS`). Rank 0 writes the gradients (after DDP's all-reduce) to OUTDIR/grads_<order>.pt and
each rank the batch it trained on to OUTDIR/batch_<order>_rank<r>.pt.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

# Run as a script under torchrun: the shared helpers (tests/helpers/) import as `helpers`.
sys.path.insert(0, str(Path(__file__).parent))

from helpers.configs import training_positions

from str_hooks import mine_safety_tokens
from str_hooks.integrations.lightning import STRCallback
from str_hooks.testing import make_batch, make_lora, make_model, make_tokenizer

COEF = 0.7
ORDERS = ("unequal", "equal")


def examples(tokenizer: Any, n: int = 8, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """n examples, one dict of 1-D tensors each, right-padded to a common width; their supervised counts
    all differ."""
    batch = make_batch(tokenizer, n=n, seed=seed)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def supervised_count(rows: list[dict[str, torch.Tensor]]) -> int:
    return sum(int((row["labels"][1:] != -100).sum()) for row in rows)


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack, then trim to the micro-batch's own longest example (each micro-batch has its own width)."""
    batch = {k: torch.stack([row[k] for row in rows]) for k in rows[0]}
    width = int(batch["attention_mask"].sum(dim=1).max())
    return {k: v[:, :width] for k, v in batch.items()}


def ordered(rows: list[dict[str, torch.Tensor]], order: str) -> list[dict[str, torch.Tensor]]:
    """`unequal`: as built (rows r, r+2, ... of each rank r have unequal supervised counts). `equal`:
    interleaved so that both ranks get the same total supervised count, where 2 ranks x 4 equal one
    batch of 8 (the per-micro-batch means then average to the big-batch mean)."""
    if order == "unequal":
        return rows
    counts = [supervised_count([row]) for row in rows]
    for group in itertools.combinations(range(len(rows)), len(rows) // 2):
        if 2 * sum(counts[i] for i in group) == sum(counts):
            rest = [i for i in range(len(rows)) if i not in group]
            return [rows[i] for pair in zip(group, rest, strict=True) for i in pair]
    raise AssertionError("no split of the examples has equal supervised counts; change the seed")


class LitLM(L.LightningModule):
    """A LightningModule holding a LoRA causal LM; `training_step` returns the HF mean cross-entropy."""

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        lr: float = 0.0,
        optimizer: str = "sgd",
        returns: str = "tensor",
        ce_scale: float = 1.0,
        fail_at: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model if model is not None else make_lora(make_model("llama"))
        self.lr = lr
        self.optimizer = optimizer
        self.returns = returns
        self.ce_scale = ce_scale
        self.fail_at = fail_at

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("boom inside training_step")
        loss = self.model(**batch).loss * self.ce_scale
        if self.returns == "dict":
            return {"loss": loss, "rows": batch["input_ids"].shape[0]}
        if self.returns == "none":
            return None
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr)


class GradCapture(L.Callback):
    """Records the gradients each optimizer step sees (after accumulation and DDP's all-reduce)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.batches: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append({k: v.detach().clone() for k, v in batch.items()})

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.grads.append(
            {
                name.removeprefix("model."): p.grad.detach().clone()
                for name, p in pl_module.named_parameters()
                if p.grad is not None
            }
        )


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


def main(out: Path) -> None:
    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    tokens = mine_safety_tokens(tokenizer, k=12)
    rank = int(os.environ["RANK"])
    for order in ORDERS:
        # Rank r trains on rows r, r+2, ...: Lightning's own DistributedSampler would shuffle them.
        rows = ordered(examples(tokenizer), order)[rank::2]
        capture = GradCapture()
        trainer = L.Trainer(
            **trainer_kwargs(
                devices=2,
                strategy="ddp",
                use_distributed_sampler=False,
                # Training positions against the adapter (mse): the loss the test writes by hand.
                callbacks=[STRCallback(training_positions({"coef": COEF}), tokens=tokens), capture],
            )
        )
        trainer.fit(LitLM(), DataLoader(rows, batch_size=4, collate_fn=collate))
        torch.save(capture.batches[0], out / f"batch_{order}_rank{trainer.global_rank}.pt")
        if trainer.global_rank == 0:
            torch.save(capture.grads[0], out / f"grads_{order}.pt")
    # Leave together and close the group: a rank exiting while gloo threads still run can abort.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Results are written and the process group is closed: skip interpreter teardown, where gloo's
    # C++ threads sometimes abort the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
