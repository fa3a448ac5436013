"""STR with Lightning (runs on CPU in seconds with a tiny model).

python examples/lightning_module.py
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch

from str_hooks.integrations.lightning import STRCallback
from str_hooks.testing import make_batch, make_lora, make_model, make_tokenizer


class LitLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = make_lora(make_model("llama"))  # any HF causal LM, PEFT-wrapped or not

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        return self.model(**batch).loss  # a tensor, or a dict with "loss"

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


tok = make_tokenizer()
batch = make_batch(tok, n=8)  # input_ids, attention_mask, labels (-100 on prompt tokens)
rows = [{key: value[i] for key, value in batch.items()} for i in range(8)]
trainer = L.Trainer(
    callbacks=[STRCallback({"coef": 0.1}, tokenizer=tok)],
    accumulate_grad_batches=4,
    max_steps=2,
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
)
trainer.fit(LitLM(), torch.utils.data.DataLoader(rows, batch_size=2))
print({key: round(float(value), 4) for key, value in trainer.callback_metrics.items()})
